import type { BlockDevice } from "../block/block-device";
import { forEachExtent } from "../block/extents";
import { waitingForExitingDaemon } from "../open/exiting-daemon";
import { openDisk } from "../open/open-disk";
import type { Confinement } from "../open/access-policy";

/** Where the bytes of an extent come from, seen from the top disk. */
export type ExtentSource = "image" | "backing" | "zero";

/**
 * `addcow map`: the disk as merged extents. `source` says where the bytes come
 * from seen from this disk: its image file, its backing chain, or zeros.
 * `depth` and `file` say which layer holds them: 0 = this disk's image file,
 * 1 = its backing file (or, for an add-cow backing file, that disk's image
 * file), 2 = one layer further down, and so on. Zero extents have neither.
 */
export interface Extent {
  start: number;
  length: number;
  source: ExtentSource;
  depth: number | null;
  file: string | null;
}

/**
 * Walks [start, end) of `dev` (found at `depth`) by block status, handing
 * each range down the chain until a layer holds it or it reads as zeros.
 */
async function resolve(
  dev: BlockDevice,
  depth: number,
  start: number,
  end: number,
  out: (e: Extent) => void,
): Promise<void> {
  const file = dev.describe().dataFile;
  await forEachExtent(dev, start, end, async (e) => {
    const { start: s, length } = e;
    if (e.kind === "data") {
      out({ start: s, length, source: depth === 0 ? "image" : "backing", depth, file });
    } else if (e.kind === "zero" || !dev.backing) {
      out({ start: s, length, source: "zero", depth: null, file: null });
    } else {
      // Past the end of the layer below, the bytes read as zeros (the layer said "backing").
      const below = dev.backing;
      const split = Math.min(s + length, Math.max(s, below.size));
      if (split > s) await resolve(below, depth + 1, s, split, out);
      if (split < s + length) {
        out({ start: split, length: s + length - split, source: "zero", depth: null, file: null });
      }
    }
  });
}

/** The extents of an open disk, merged so neighbours always differ. */
export async function mapDevice(dev: BlockDevice): Promise<Extent[]> {
  const extents: Extent[] = [];
  const push = (e: Extent) => {
    if (e.length <= 0) return;
    const last = extents[extents.length - 1];
    if (
      last &&
      last.start + last.length === e.start &&
      last.source === e.source &&
      last.depth === e.depth &&
      last.file === e.file
    ) {
      last.length += e.length;
    } else {
      extents.push({ ...e });
    }
  };
  await resolve(dev, 0, 0, dev.size, push);
  return extents;
}

export async function mapDisk(
  file: string,
  opts: { forceShare?: boolean; confine?: Confinement | null } = {},
) {
  const dev = await waitingForExitingDaemon(file, () =>
    openDisk(file, { writable: false, lock: !opts.forceShare, confine: opts.confine }),
  );
  try {
    return await mapDevice(dev);
  } finally {
    await dev.close();
  }
}
