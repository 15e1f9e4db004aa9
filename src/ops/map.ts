import { waitingForExitingDaemon } from "../open/exiting-daemon";
import type { BlockDevice } from "../block/block-device";
import { AddCowDevice, type ClusterSource } from "../addcow/addcow-device";
import { openDisk } from "../open/open-disk";

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
  source: ClusterSource;
  depth: number | null;
  file: string | null;
}

interface Run {
  start: number;
  end: number;
  source: ClusterSource;
}

async function runsOf(dev: AddCowDevice): Promise<Run[]> {
  const runs: Run[] = [];
  await dev.sourceRuns((start, length, source) => {
    runs.push({ start, end: start + length, source });
  });
  return runs;
}

/** Index of the first run that ends after pos (runs are sorted and contiguous). */
function firstRunAfter(runs: Run[], pos: number): number {
  let lo = 0;
  let hi = runs.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (runs[mid]!.end <= pos) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Resolves [start, end) of a backing device, found at `depth`, to the layers holding it. */
async function resolveBacking(
  dev: BlockDevice,
  depth: number,
  start: number,
  end: number,
  cache: Map<BlockDevice, Run[]>,
  out: (e: Extent) => void,
): Promise<void> {
  if (!(dev instanceof AddCowDevice)) {
    out({ start, length: end - start, source: "backing", depth, file: dev.describe().dataFile });
    return;
  }
  let runs = cache.get(dev);
  if (!runs) {
    runs = await runsOf(dev);
    cache.set(dev, runs);
  }
  for (let i = firstRunAfter(runs, start); i < runs.length && runs[i]!.start < end; i++) {
    const run = runs[i]!;
    const s = Math.max(start, run.start);
    const e = Math.min(end, run.end);
    if (run.source === "image") {
      out({ start: s, length: e - s, source: "backing", depth, file: dev.imagePath });
    } else if (run.source === "zero" || !dev.backing) {
      out({ start: s, length: e - s, source: "zero", depth: null, file: null });
    } else {
      await resolveBacking(dev.backing, depth + 1, s, e, cache, out);
    }
  }
}

/** The extents of an open disk, merged so neighbours always differ. */
export async function mapDevice(dev: AddCowDevice): Promise<Extent[]> {
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
  const cache = new Map<BlockDevice, Run[]>();
  for (const run of await runsOf(dev)) {
    const length = run.end - run.start;
    if (run.source === "image") {
      push({ start: run.start, length, source: "image", depth: 0, file: dev.imagePath });
    } else if (run.source === "zero" || !dev.backing) {
      push({ start: run.start, length, source: "zero", depth: null, file: null });
    } else {
      await resolveBacking(dev.backing, 1, run.start, run.end, cache, push);
    }
  }
  return extents;
}

export async function mapDisk(file: string, opts: { forceShare?: boolean } = {}) {
  const dev = await waitingForExitingDaemon(file, () =>
    openDisk(file, { writable: false, lock: !opts.forceShare }),
  );
  try {
    return await mapDevice(dev);
  } finally {
    await dev.close();
  }
}
