import * as fs from "node:fs";
import { AddCowError, errnoCode, readOnlyError } from "../util/errors";
import type { AddCowLayer } from "../addcow/addcow-layer";
import type { RangeLock } from "../block/range-lock";
import { formatSize } from "../util/size";
import { CopyEngine, type CopyOptions } from "./copy-engine";
import { type Job, runUntilFull } from "./job";
import { findRun } from "./scan";
import { bytesOfKind } from "../block/extents";

export interface CommitOptions extends CopyOptions {
  /** Leave the overlay as it is (its clusters stay allocated) instead of emptying it. */
  keep?: boolean;
  /**
   * Held on the clusters of each copy (live commit: user writes take it too,
   * so a copy never puts older data into the backing over a newer write).
   */
  copyLock?: RangeLock;
  /**
   * Runs the last step (sync the backing, empty the overlay) with every user
   * request held back (live commit); at rest it runs directly.
   */
  quiesce?: (finish: () => Promise<void>) => Promise<void>;
}

/** Refuses a disk without backing file, or one that no longer reads it. */
export function checkCommittable(dev: AddCowLayer): void {
  if (dev.backingPath === null) {
    throw new AddCowError(`${dev.path} has no backing file: there is nothing to commit into`, {
      file: dev.path,
      code: "EINVAL",
    });
  }
  if (dev.allAllocated || !dev.backing) {
    throw new AddCowError(
      `${dev.path} was streamed: every cluster is in its image file ${dev.imagePath} ("all allocated"), which is now a standalone raw disk, and its backing file is no longer read, so there is nothing to commit; use ${dev.imagePath} as the disk (commit folds an overlay into its backing only before it is streamed)`,
      { file: dev.path, code: "EINVAL", reason: "invalid" },
    );
  }
}

/** The one line for a backing file commit cannot write. */
export function readOnlyBackingError(file: string, backing: string, code: string): AddCowError {
  const why = code === "EROFS" ? "read-only file system" : "permission denied";
  return new AddCowError(
    `cannot commit ${file}: backing file ${backing} cannot be opened for writing (${why}); commit writes into the backing file, so make it writable, or use stream to make the overlay standalone instead`,
    { file: backing, code },
  );
}

/** Checks before any work that the backing layer's files can be written (live commit). */
export function checkBackingWritable(dev: AddCowLayer): void {
  const files = dev.backing ? dev.backing.describe().files : [dev.backingPath!];
  for (const f of files) {
    try {
      fs.accessSync(f, fs.constants.W_OK);
    } catch (err) {
      throw readOnlyBackingError(dev.path, f, errnoCode(err) ?? "EACCES");
    }
  }
}

/**
 * Commit: writes every allocated cluster of the overlay into its backing disk
 * (opened writable for this job), makes the backing durable, and only then
 * empties the overlay's bitmap. A crash before the backing sync leaves the
 * overlay as it was (its bits still 1); a crash while the bitmap is being
 * zeroed leaves some bits 1 and some 0, and both read the same bytes because
 * the backing holds them durably. Running commit again is always safe.
 */
export async function commitDisk(
  dev: AddCowLayer,
  job: Job,
  opts: CommitOptions = {},
): Promise<string> {
  checkCommittable(dev);
  const backing = dev.backing!;
  if (dev.readOnly) throw readOnlyError(dev.path, "commit empties its bitmap");
  if (backing.readOnly) {
    throw readOnlyError(dev.backingPath ?? "", "commit needs to write it", "backing file");
  }
  // Data past the backing disk's end has nowhere to go: the backing is never grown.
  const beyond = await bytesPastEnd(dev, backing.size);
  if (beyond > 0) {
    throw new AddCowError(
      `${dev.path} has ${formatSize(beyond)} of data past the end of backing file ${dev.backingPath} (${backing.size} bytes); commit never grows a backing file: stream instead`,
      { file: dev.path, code: "EFBIG" },
    );
  }
  // The backing's bytes change: its pin says so before the first write, and is taken anew at the end.
  const pin = dev.pin;
  if (pin.kind === "pinned") await dev.repin(pin.record.identity, "committing");
  const total = await bytesOfKind(dev, ["data"]);
  const cs = dev.clusterSize;
  const engine = new CopyEngine(
    {
      clusterSize: cs,
      numClusters: dev.numClusters,
      size: dev.size,
      findRun: (from, maxLen) => findRun(dev, cs, from, dev.numClusters, ["data"], maxLen),
      copy: async (c0, c1, buf) => {
        const start = c0 * cs;
        // Clusters past the backing's end (written during a live commit) stay in the overlay.
        const stop = Math.min(c1 * cs, dev.size, backing.size);
        if (stop <= start) return;
        const data = buf.subarray(0, stop - start);
        const release = opts.copyLock ? await opts.copyLock.acquire(c0, c1) : undefined;
        try {
          // These clusters are allocated (bits only go 1 -> 0 at the very end): the image file's bytes.
          await dev.read(data, start);
          await backing.write(data, start);
        } finally {
          release?.();
        }
      },
    },
    { ...opts, total },
  );
  const outcome = await runUntilFull(job, engine, `commit of ${dev.path}`, {
    file: dev.backingPath ?? dev.path,
    keep: () => backing.flush(),
    advice: async () => "the overlay is unchanged: free some space and run commit again",
  });
  if (outcome === "cancelled") {
    await backing.flush();
    return `commit of ${dev.path} stopped; the overlay is unchanged and the backing file holds part of its data: run commit again`;
  }
  const finish = async () => {
    // The crash-order rule of commit: backing data durable before any bit is cleared.
    await backing.flush();
    if (opts.keep) return;
    // Live: a user may have written past the backing's end meanwhile; that must stay.
    const past = await bytesPastEnd(dev, backing.size);
    if (past > 0) {
      throw new AddCowError(
        `${dev.path} got ${formatSize(past)} of data past the end of backing file ${dev.backingPath} during the commit; the overlay was kept as it is`,
        { file: dev.path, code: "EFBIG" },
      );
    }
    await dev.clearAllocation();
  };
  if (opts.quiesce) await opts.quiesce(finish);
  else await finish();
  // The disk reads the same on the backing as it is now: that is the base it is pinned to.
  const now = pin.kind === "pinned" ? await backing.identity() : null;
  if (now) await dev.repin(now);
  if (opts.keep) {
    return `committed ${formatSize(total)} of ${dev.path} into ${dev.backingPath}; the overlay was kept as it is (--keep)`;
  }
  return `committed ${formatSize(total)} of ${dev.path} into ${dev.backingPath} and emptied the overlay: it now reads everything from its backing file`;
}

/** Bytes of allocated clusters lying past `limit` (the backing disk's size). */
function bytesPastEnd(dev: AddCowLayer, limit: number): Promise<number> {
  return limit >= dev.size ? Promise.resolve(0) : bytesOfKind(dev, ["data"], limit, dev.size);
}
