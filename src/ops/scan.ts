import type { BitmapCache } from "../addcow/bitmap-cache";

/**
 * The first run of clusters in [from, end) whose bit is `allocated`, at most
 * maxLen long, or null. Works one cached bitmap cluster at a time and skips
 * runs of the other state with runLength (whole bytes at once), never bit by
 * bit over long runs.
 */
export async function findRun(
  bitmap: BitmapCache,
  from: number,
  end: number,
  allocated: boolean,
  maxLen: number,
): Promise<[number, number] | null> {
  let c = from;
  while (c < end) {
    const entryEnd = Math.min(
      end,
      (Math.floor(c / bitmap.clustersPerEntry) + 1) * bitmap.clustersPerEntry,
    );
    const pinning = bitmap.pin(c, entryEnd);
    if (pinning) await pinning;
    try {
      while (c < entryEnd) {
        if (bitmap.isSet(c) === allocated) {
          const n = bitmap.runLength(c, Math.min(entryEnd, c + maxLen));
          return [c, c + n];
        }
        c += bitmap.runLength(c, entryEnd);
      }
    } finally {
      bitmap.unpin(entryEnd - 1, entryEnd);
    }
  }
  return null;
}
