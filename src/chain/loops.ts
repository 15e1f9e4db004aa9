import * as fs from "node:fs";
import type { BlockDevice } from "../block/block-device";
import { chainOf } from "../block/extents";
import { isUrlName } from "./access-policy";

/** Every local file a device's chain reads: the files of each layer. */
export function chainFiles(dev: BlockDevice): string[] {
  return chainOf(dev).flatMap((layer) => layer.describe().files);
}

function idOf(file: string): string | null {
  try {
    const st = fs.statSync(file);
    return `${st.dev}:${st.ino}`;
  } catch {
    return null;
  }
}

/**
 * The loop check for a chain opened apart from a disk (create, rebase, check):
 * the first file the chain reads that is one of `own` (by inode, whatever the
 * path, link or hard link), or null. Opening a chain catches loops inside it
 * (open-chain.ts); this catches a chain that leads back to files it is about
 * to sit under.
 */
export function sharedFile(
  chain: BlockDevice,
  own: readonly string[],
): { used: string; own: string } | null {
  const ids = new Map<string, string>();
  for (const f of own) {
    const id = idOf(f);
    if (id !== null) ids.set(id, f);
  }
  for (const used of chainFiles(chain)) {
    if (isUrlName(used)) continue;
    const id = idOf(used);
    const same = id === null ? undefined : ids.get(id);
    if (same !== undefined) return { used, own: same };
  }
  return null;
}
