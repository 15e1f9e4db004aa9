import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { readMountTable } from "../os/mount-table";

/** How long an open waits for an unmounted daemon to flush and let go of its disk. */
const EXIT_WAIT_MS = 10_000;

/**
 * Runs open() again while it fails only because an addcow-mount daemon whose
 * mount is already gone still holds the disk's lock: after `fusermount -u`
 * the daemon flushes, closes and exits a moment later, and `addcow info` or a
 * remount right then should wait for it rather than report the disk in use.
 * A daemon that is still mounted (or any other holder) fails at once.
 */
export async function waitingForExitingDaemon<T>(file: string, open: () => Promise<T>): Promise<T> {
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
      if (Date.now() > deadline || !retry) throw err;
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
  return heldByExitingDaemon(err.pid) ? "exiting" : "other";
}

function heldByExitingDaemon(pid: number): boolean {
  let args: string[];
  try {
    args = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
  } catch {
    return true; // Gone already: the lock is free on the next try.
  }
  if (!args.some((a) => /addcow-mount(\.js)?$/.test(a))) return false;
  // Daemons are started with absolute paths, the mount directory last.
  const dir = args.filter((a) => a !== "" && !a.startsWith("-")).pop();
  if (dir === undefined || !path.isAbsolute(dir)) return false;
  let real = dir;
  try {
    real = fs.realpathSync(dir);
  } catch {
    // Keep the name as given.
  }
  return !readMountTable().some((e) => e.mountPoint === real && e.fsType === "fuse.addcow");
}
