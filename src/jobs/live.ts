import type { BlockDevice } from "../block/block-device";
import type { AddCowLayer } from "../addcow/addcow-layer";
import { type OpenOptions, openDisk } from "../chain/open-chain";
import { AddCowError } from "../util/errors";
import { CommitMirror } from "./commit-mirror";
import { type CommitOptions, checkBackingWritable, checkCommittable, commitDisk } from "./commit";
import { type MadeFile, defaultImageName, removeMade } from "../ops/create";
import type { Job, JobKind } from "./job";
import { explainReadOnlyBacking } from "./at-rest";
import { type SnapshotOptions, snapshotDisk } from "./snapshot";
import { checkStreamable } from "./stream";

/**
 * Block jobs on a mounted disk. The daemon's DiskEntry is the one swap point:
 * a job changes what requests go to only inside `exclusive`, with no request
 * running and none starting, so a request sees the old device or the new
 * one, never a half state.
 */
export interface LiveDisk {
  /** The .add-cow file the disk was mounted from. */
  readonly file: string;
  /** What FUSE requests go to: the top layer, or a filter in front of it during a live commit. */
  readonly target: BlockDevice;
  /** The disk's top add-cow layer: what jobs work on. */
  readonly top: AddCowLayer;
  /** How the mount opened the disk; every reopen of its layers uses the same options. */
  readonly openOptions: OpenOptions;
  /** Runs fn with no request running and none starting. */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  /** Inside exclusive: requests go to `target` from now on, which serves `top`. Returns the old target. */
  switchTo(target: BlockDevice, top: AddCowLayer): BlockDevice;
}

/** Refuses a live job that cannot run, before any work, with one line. */
export function checkLiveJob(kind: JobKind, live: LiveDisk, topFile: string): void {
  if (live.target !== live.top) {
    throw new AddCowError(`${topFile} is busy with another operation; try again`, {
      reason: "invalid",
    });
  }
  if (live.top.readOnly) {
    throw new AddCowError(`${topFile} is mounted read-only; remount it writable to run ${kind}`, {
      code: "EROFS",
      reason: "invalid",
    });
  }
  if (kind === "rebase") {
    throw new AddCowError(`rebase works on a disk at rest; unmount ${topFile} first`, {
      reason: "invalid",
    });
  }
  if (kind === "stream") checkStreamable(live.top);
  if (kind === "commit") {
    checkCommittable(live.top);
    checkBackingWritable(live.top);
  }
}

/**
 * Live snapshot: with every request held back, flush the mounted disk, create
 * NEW over it, open NEW with the already open disk as its backing (no second
 * open, no window without a lock) and the mount's own options, retire the old
 * layer (only read from now on: no writes, no copy-on-read, no bits), and
 * switch the mounted file to NEW. Writes before the switch are in the old
 * layer, writes after it in NEW.
 */
export async function liveSnapshot(
  live: LiveDisk,
  topFile: string,
  newFile: string,
  opts: SnapshotOptions = {},
): Promise<string> {
  return live.exclusive(async () => {
    const old = live.top;
    await old.flush();
    const image = opts.image ?? defaultImageName(newFile);
    const made: MadeFile[] = [];
    const message = await snapshotDisk(topFile, newFile, {
      ...opts,
      image,
      backingSize: old.size,
      backingIdentity: await old.identity(),
      confine: live.openOptions.confine,
      ...(live.openOptions.urls ? { urls: live.openOptions.urls } : {}),
      made,
    });
    let dev: AddCowLayer;
    try {
      dev = await openDisk(newFile, { ...live.openOptions, writable: true, backingDevice: old });
    } catch (err) {
      // Nothing switched: take the new files away again (only those, through their directory).
      removeMade(made);
      throw err;
    }
    await old.retire();
    live.switchTo(dev, dev);
    return `${message} (the mounted file switched to it)`;
  });
}

/**
 * Live commit: reopen the disk with its backing writable (in place, while
 * requests wait, with the mount's options), mirror user writes into the
 * backing during the copy, then sync the backing and empty the overlay with
 * requests held back.
 */
export async function liveCommit(
  live: LiveDisk,
  topFile: string,
  job: Job,
  opts: CommitOptions,
): Promise<string> {
  const reopen = { ...live.openOptions, writable: true };
  let dev!: AddCowLayer;
  let mirror: CommitMirror | undefined;
  await live.exclusive(async () => {
    const old = live.top;
    await old.flush();
    await old.close();
    try {
      dev = await openDisk(topFile, { ...reopen, writableBacking: true });
    } catch (err) {
      // Back to the disk as it was mounted; the commit is refused.
      const again = await openDisk(topFile, reopen);
      live.switchTo(again, again);
      throw await explainReadOnlyBacking(topFile, err);
    }
    if (!dev.backing || dev.backing.readOnly) {
      live.switchTo(dev, dev);
      return;
    }
    mirror = new CommitMirror(dev, dev.backing);
    live.switchTo(mirror, dev);
  });
  try {
    return await commitDisk(dev, job, {
      ...opts,
      ...(mirror ? { copyLock: mirror.lock } : {}),
      quiesce: (finish) =>
        live.exclusive(async () => {
          await mirror?.flush();
          await finish();
          live.switchTo(dev, dev);
        }),
    });
  } finally {
    if (live.target !== live.top) {
      await live.exclusive(async () => {
        live.switchTo(dev, dev);
      });
    }
  }
}
