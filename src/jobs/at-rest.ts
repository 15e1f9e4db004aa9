import { readHeader } from "../addcow/open-addcow";
import { waitingForExitingDaemon } from "../chain/exiting-daemon";
import * as path from "node:path";
import { AddCowError } from "../util/errors";
import type { AddCowDevice } from "../addcow/addcow-device";
import { type OpenOptions, openDisk, resolveStoredName } from "../chain/open-chain";
import { type FileOpener, PosixFile, openPosixFile, openRegularFile } from "../block/file-io";
import { type CommitOptions, commitDisk, readOnlyBackingError } from "./commit";
import { type CopyOptions, DEFAULT_IN_FLIGHT } from "./copy-engine";
import type { Job } from "./job";
import { streamDisk } from "./stream";
import { type ResizeOptions, parseResize, resizeDisk } from "../ops/resize";

/** Jobs on a disk at rest: the job opens the disk, runs, flushes and closes it. */

/**
 * Bulk copies with several in flight use thread-pool I/O, so reads and writes
 * of different chunks overlap instead of queueing on the JS thread (which the
 * page-cache-friendly sync style would do). ADDCOW_IO, when set, still decides.
 */
export function jobOpener(opts: CopyOptions, open: OpenOptions): FileOpener | undefined {
  if (open.opener || process.env.ADDCOW_IO || (opts.inFlight ?? DEFAULT_IN_FLIGHT) <= 1) {
    return open.opener;
  }
  return async (file, mode) =>
    new PosixFile(file, await openRegularFile(file, mode), mode === "write", "async");
}

/**
 * Opens a disk at rest (waiting for a daemon that is letting go of it), runs
 * fn, closes it. `explain` may turn an error of the open into a better one.
 */
export async function withDisk<T>(
  file: string,
  open: OpenOptions,
  fn: (dev: AddCowDevice) => Promise<T>,
  explain?: (err: unknown) => Promise<unknown>,
): Promise<T> {
  let dev: AddCowDevice;
  try {
    dev = await waitingForExitingDaemon(file, () => openDisk(file, open));
  } catch (err) {
    throw explain ? await explain(err) : err;
  }
  let result: T;
  try {
    result = await fn(dev);
  } catch (err) {
    await dev.close().catch(() => undefined);
    throw err;
  }
  await dev.close();
  return result;
}

export function streamOffline(
  file: string,
  job: Job,
  opts: CopyOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  const opener = jobOpener(opts, open);
  return withDisk(file, { ...open, writable: true, ...(opener ? { opener } : {}) }, (dev) =>
    streamDisk(dev, job, opts),
  );
}

export function commitOffline(
  file: string,
  job: Job,
  opts: CommitOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  const opener = jobOpener(opts, open);
  return withDisk(
    file,
    { ...open, writable: true, writableBacking: true, ...(opener ? { opener } : {}) },
    (dev) => commitDisk(dev, job, opts),
    (err) => explainReadOnlyBacking(file, err),
  );
}

/** A backing file that cannot be opened for writing gets a message about commit. */
export async function explainReadOnlyBacking(file: string, err: unknown): Promise<unknown> {
  if (!(err instanceof AddCowError) || err.file === undefined) return err;
  const code = err.code;
  if (code !== "EACCES" && code !== "EROFS" && code !== "EPERM") return err;
  if (err.reason !== "cannot-open" || err.mode !== "write") return err;
  // The overlay's own files are not the backing: their error stands as it is.
  const own = [path.resolve(file)];
  try {
    const meta = await openPosixFile(file, "read");
    try {
      own.push(resolveStoredName(file, (await readHeader(meta, file)).imageName));
    } finally {
      await meta.close();
    }
  } catch {
    return err;
  }
  if (own.includes(path.resolve(err.file))) return err;
  return readOnlyBackingError(file, err.file, code);
}

/** Resizes a disk at rest to SIZE, +SIZE or -SIZE (see resizeDisk). */
export function resizeOffline(
  file: string,
  spec: string,
  opts: ResizeOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  return withDisk(file, { ...open, writable: true }, (dev) =>
    resizeDisk(dev, parseResize(spec, dev.size), opts),
  );
}
