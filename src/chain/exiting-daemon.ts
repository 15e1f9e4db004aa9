import { log } from "../util/log";
import { AddCowError } from "../util/errors";
import { type LockAdvice, describeHolder, explainLock, mountOfDisk } from "./lock-holder";

/** How long an open waits for an unmounted daemon to flush and let go of its disk. */
const EXIT_WAIT_MS = 10_000;

/**
 * Runs open() again while it fails only because an addcow-mount daemon whose
 * mount is already gone still holds the disk's lock: after `fusermount -u`
 * the daemon flushes, closes and exits a moment later, and `addcow info` or a
 * remount right then should wait for it rather than report the disk in use.
 * A daemon that is still mounted (or any other holder) fails at once, with a
 * message saying where the disk is mounted and what to do (explainLock).
 */
export async function waitingForExitingDaemon<T>(
  file: string,
  open: () => Promise<T>,
  advice: LockAdvice = {},
): Promise<T> {
  const deadline = Date.now() + EXIT_WAIT_MS;
  let unknownHolder = 0;
  for (;;) {
    try {
      return await open();
    } catch (err) {
      const holder = lockHolderState(err);
      if (holder === "unknown") unknownHolder++;
      const retry =
        holder === "exiting" || (holder === "unknown" && unknownHolder <= UNKNOWN_HOLDER_RETRIES);
      if (Date.now() > deadline || !retry) throw explainLock(err, advice);
      log.daemon("%s is held by an addcow-mount daemon that is stopping; waiting", file);
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }
}

/**
 * A holder that /proc/locks no longer lists has usually just let go (the lock
 * was taken when we tried and gone when we looked): try again a few times.
 */
const UNKNOWN_HOLDER_RETRIES = 5;

function lockHolderState(err: unknown): "exiting" | "unknown" | "other" {
  if (!(err instanceof AddCowError) || err.reason !== "locked") return "other";
  if (err.pid === undefined) return "unknown";
  const holder = describeHolder(err.pid);
  // Gone already: the lock is free on the next try. Unmounted: it is about to be.
  if (holder.gone || (holder.mountDir !== undefined && !holder.mounted)) return "exiting";
  // A host daemon holding a disk that is not mounted any more is detaching it (or attaching it).
  if (holder.host !== undefined && err.file !== undefined && mountOfDisk(err.file) === null) {
    return "exiting";
  }
  return "other";
}
