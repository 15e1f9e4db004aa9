import type { BlockDevice, ExtentKind } from "../block/block-device";

/** Clusters asked about per block-status call while nothing wanted is found; it doubles from there. */
const FIRST_WINDOW_CLUSTERS = 64;

/**
 * The first run of whole clusters in [from, end) whose extents are of a wanted
 * kind, at most maxLen clusters long, or null. Asks the device's block status
 * in windows that start small (the answer is usually near) and double while
 * nothing wanted turns up, so long runs of the other kinds are skipped in few
 * calls and a fragmented disk never produces long extent lists.
 */
export async function findRun(
  dev: BlockDevice,
  clusterSize: number,
  from: number,
  end: number,
  wanted: ReadonlyArray<ExtentKind>,
  maxLen: number,
): Promise<[number, number] | null> {
  let c = from;
  let window = Math.max(FIRST_WINDOW_CLUSTERS, maxLen);
  while (c < end) {
    const start = c * clusterSize;
    const stop = Math.min(end * clusterSize, dev.size, start + window * clusterSize);
    const extents = await dev.blockStatus(start, stop - start);
    let runStart = -1;
    let runEnd = -1;
    for (const e of extents) {
      const hit = wanted.includes(e.kind);
      if (runStart < 0) {
        if (hit) {
          runStart = e.start;
          runEnd = e.start + e.length;
        }
      } else if (hit && e.start === runEnd) {
        runEnd += e.length;
      } else {
        break;
      }
    }
    if (runStart >= 0) {
      const c0 = Math.floor(runStart / clusterSize);
      const c1 = Math.min(end, Math.ceil(runEnd / clusterSize), c0 + maxLen);
      return [c0, c1];
    }
    const last = extents[extents.length - 1];
    const reached = last ? last.start + last.length : stop;
    c = Math.ceil(reached / clusterSize);
    window *= 2;
  }
  return null;
}
