import type { BlockDevice } from "../block/block-device";
import { resolveExtents } from "../block/extents";
import { waitingForExitingDaemon } from "../chain/exiting-daemon";
import { openDisk } from "../chain/open-chain";
import type { Confinement } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";

/** Where the bytes of an extent come from, seen from the top disk. */
export type ExtentSource = "image" | "backing" | "zero";

/**
 * `addcow map`: the disk as merged extents. `source` says where the bytes come
 * from seen from this disk: its image file, its backing chain, or zeros.
 * `depth` and `file` say which layer holds them: 0 = this disk's image file,
 * 1 = its backing file (or, for an add-cow backing file, that disk's image
 * file), 2 = one layer further down, and so on. Zero extents have neither.
 */
export interface MapExtent {
  start: number;
  length: number;
  source: ExtentSource;
  depth: number | null;
  file: string | null;
}

/** The extents of an open disk, merged so neighbours always differ. */
export async function mapDevice(dev: BlockDevice): Promise<MapExtent[]> {
  const extents: MapExtent[] = [];
  const push = (e: MapExtent) => {
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
  await resolveExtents(dev, 0, dev.size, (e) => {
    const { start, length } = e;
    if (e.kind === "zero") push({ start, length, source: "zero", depth: null, file: null });
    else {
      const file = e.layer.describe().storage;
      push({ start, length, source: e.depth === 0 ? "image" : "backing", depth: e.depth, file });
    }
  });
  return extents;
}

export async function mapDisk(
  file: string,
  opts: { forceShare?: boolean; confine?: Confinement | null; urls?: UrlRules } = {},
) {
  const open = {
    writable: false,
    lock: !opts.forceShare,
    confine: opts.confine,
    ...(opts.urls ? { urls: opts.urls } : {}),
  };
  const dev = await waitingForExitingDaemon(file, () => openDisk(file, open), { forceShare: true });
  try {
    return await mapDevice(dev);
  } finally {
    await dev.close();
  }
}
