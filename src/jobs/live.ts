import * as fs from "node:fs";
import type { BlockDevice } from "../block/block-device";
import type { AddCowDevice } from "../addcow/addcow-device";
import { openDisk } from "../chain/open-chain";
import type { Confinement } from "../chain/access-policy";
import { AddCowError } from "../util/errors";
import { CommitMirror } from "./commit-mirror";
import { type CommitOptions, checkBackingWritable, checkCommittable, commitDisk } from "./commit";
import type { CopyOptions } from "./copy-engine";
import { defaultImageName } from "../ops/create";
import type { Job, JobKind } from "./job";
import { explainReadOnlyBacking } from "./at-rest";
import { type SnapshotOptions, snapshotDisk } from "./snapshot";
import { checkStreamable, streamDisk } from "./stream";

/**
 * Block jobs on a mounted disk. The daemon's DiskEntry is the one swap point:
 * a job changes what requests go to only inside `exclusive`, with no request
 * running and none starting, so a request sees the old device or the new
 * one, never a half state.
 */
export interface LiveDisk {
  /** The .add-cow file the disk was mounted from. */
  readonly file: string;
  /** What FUSE requests go to: the disk, or a mirror in front of it during a live commit. */
  readonly device: BlockDevice;
  /** The add-cow disk served: the top layer that jobs work on. */
  readonly disk: AddCowDevice;
  /** Runs fn with no request running and none starting. */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  /** Inside exclusive: requests go to `device` from now on, which serves `disk`. Returns the old device. */
  replaceDevice(device: BlockDevice, disk: AddCowDevice): BlockDevice;
}

/** Refuses a live job that cannot run, before any work, with one line. */
export function checkLiveJob(kind: JobKind, live: LiveDisk, top: string): void {
  if (live.device !== live.disk) {
    throw new AddCowError(`${top} is busy with another operation; try again`, {
      reason: "invalid",
    });
  }
  if (live.disk.readOnly) {
    throw new AddCowError(`${top} is mounted read-only; remount it writable to run ${kind}`, {
      code: "EROFS",
      reason: "invalid",
    });
  }
  if (kind === "rebase") {
    throw new AddCowError(`rebase works on a disk at rest; unmount ${top} first`, {
      reason: "invalid",
    });
  }
  if (kind === "stream") checkStreamable(live.disk);
  if (kind === "commit") {
    checkCommittable(live.disk);
    checkBackingWritable(live.disk);
  }
}

/** Live stream: copies run beside user writes; the allocation lock keeps user data winning. */
export function liveStream(live: LiveDisk, job: Job, opts: CopyOptions): Promise<string> {
  return streamDisk(live.disk, job, opts);
}

/**
 * Live snapshot: with every request held back, flush the mounted disk, create
 * NEW over it, open NEW with the already open disk as its backing (no second
 * open, no window without a lock), and switch the mounted file to NEW.
 * Writes before the switch are in the old layer, writes after it in NEW.
 */
export async function liveSnapshot(
  live: LiveDisk,
  top: string,
  newFile: string,
  opts: SnapshotOptions = {},
): Promise<string> {
  return live.exclusive(async () => {
    const old = live.disk;
    await old.flush();
    const image = opts.image ?? defaultImageName(newFile);
    const message = await snapshotDisk(top, newFile, { ...opts, image, backingSize: old.size });
    let dev: AddCowDevice;
    try {
      dev = await openDisk(newFile, {
        confine: opts.confine,
        writable: true,
        backingDevice: old,
        cacheMode: old.cacheMode,
      });
    } catch (err) {
      // Nothing switched: take the new files away again.
      fs.rmSync(newFile, { force: true });
      fs.rmSync(image, { force: true });
      throw err;
    }
    live.replaceDevice(dev, dev);
    return `${message} (the mounted file switched to it)`;
  });
}

/**
 * Live commit: reopen the disk with its backing writable (in place, while
 * requests wait), mirror user writes into the backing during the copy, then
 * sync the backing and empty the overlay with requests held back.
 */
export async function liveCommit(
  live: LiveDisk,
  top: string,
  job: Job,
  opts: CommitOptions & { confine?: Confinement | null },
): Promise<string> {
  const { confine, ...commit } = opts;
  let dev!: AddCowDevice;
  let mirror: CommitMirror | undefined;
  await live.exclusive(async () => {
    const old = live.disk;
    await old.flush();
    await old.close();
    try {
      dev = await openDisk(top, {
        writable: true,
        writableBacking: true,
        cacheMode: old.cacheMode,
        confine,
      });
    } catch (err) {
      // Back to the disk as it was mounted; the commit is refused.
      const again = await openDisk(top, { writable: true, cacheMode: old.cacheMode, confine });
      live.replaceDevice(again, again);
      throw await explainReadOnlyBacking(top, err);
    }
    if (!dev.backing || dev.backing.readOnly) {
      live.replaceDevice(dev, dev);
      return;
    }
    mirror = new CommitMirror(dev, dev.backing);
    live.replaceDevice(mirror, dev);
  });
  try {
    return await commitDisk(dev, job, {
      ...commit,
      ...(mirror ? { copyLock: mirror.lock } : {}),
      quiesce: (finish) =>
        live.exclusive(async () => {
          await mirror?.flush();
          await finish();
          live.replaceDevice(dev, dev);
        }),
    });
  } finally {
    if (live.device !== live.disk) {
      await live.exclusive(async () => {
        live.replaceDevice(dev, dev);
      });
    }
  }
}
