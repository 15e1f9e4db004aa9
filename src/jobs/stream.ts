import { AddCowError, readOnlyError } from "../util/errors";
import type { AddCowLayer } from "../addcow/addcow-layer";
import { formatSize } from "../util/size";
import { CopyEngine, type CopyOptions } from "./copy-engine";
import { type Job, runUntilFull } from "./job";
import { findRun } from "./scan";
import { bytesOfKind } from "../block/extents";

/** Bytes of the disk that its own layer does not hold yet (what stream still copies). */
export function bytesToStream(dev: AddCowLayer): Promise<number> {
  return bytesOfKind(dev, ["backing", "zero"]);
}

/** Refuses a disk without backing file: nothing to stream. */
export function checkStreamable(dev: AddCowLayer): void {
  if (dev.backingPath === null) {
    throw new AddCowError(
      `${dev.path} has no backing file: there is nothing to stream; its image file ${dev.imagePath} holds the whole disk already`,
      { file: dev.path, code: "EINVAL" },
    );
  }
}

/**
 * Stream: copies every cluster whose bit is 0 from the backing chain into the
 * image file and sets its bit, then sets "all allocated". Bits are the
 * progress: an interrupted stream resumes where it stopped. Works on a disk in
 * use too: a user's write racing a copy of the same cluster waits for it and
 * wins (copyFromBacking takes the allocation lock and skips set bits).
 */
export async function streamDisk(
  dev: AddCowLayer,
  job: Job,
  opts: CopyOptions = {},
): Promise<string> {
  checkStreamable(dev);
  if (dev.readOnly) throw readOnlyError(dev.path, "stream needs to write its image file");
  if (dev.allAllocated) {
    return `${dev.path} is complete already: image file ${dev.imagePath} is a standalone raw disk`;
  }
  const total = await bytesToStream(dev);
  const engine = new CopyEngine(
    {
      clusterSize: dev.clusterSize,
      numClusters: dev.numClusters,
      size: dev.size,
      findRun: (from, maxLen) =>
        findRun(dev, dev.clusterSize, from, dev.numClusters, ["backing", "zero"], maxLen),
      copy: async (c0, c1, buf) => {
        await dev.copyFromBacking(c0, c1, buf);
      },
      checkpoint: () => dev.flush(),
    },
    { ...opts, total },
  );
  const outcome = await runUntilFull(job, engine, `stream of ${dev.path}`, {
    file: dev.imagePath,
    // Bits are the progress: the clusters copied so far are kept.
    keep: () => dev.flush(),
    advice: async () =>
      `${formatSize(await bytesToStream(dev))} left to copy, the progress is kept: free some space and run it again`,
  });
  if (outcome === "cancelled") {
    const left = await bytesToStream(dev);
    return `stream of ${dev.path} stopped with ${formatSize(left)} left to copy; progress is kept: run it again to finish`;
  }
  await dev.markAllAllocated();
  return `${dev.path} is complete: every cluster is in image file ${dev.imagePath}, which is now a standalone raw disk (the .add-cow file and the backing chain are no longer needed)`;
}
