import * as path from "node:path";
import { AddCowError } from "../errors";
import type { AddCowDevice } from "../engine/addcow-device";
import { type OpenOptions, openDisk, readHeader, resolveStoredName } from "../engine/open-disk";
import { openPosixFile } from "../io/file-io";
import { type CommitOptions, commitDisk, readOnlyBackingError } from "./commit";
import type { CopyOptions } from "./copy-engine";
import type { Job } from "./job";
import { streamDisk } from "./stream";

/** Jobs on a disk at rest: the job opens the disk, runs, flushes and closes it. */

async function withDisk<T>(
  file: string,
  open: OpenOptions,
  fn: (dev: AddCowDevice) => Promise<T>,
): Promise<T> {
  const dev = await openDisk(file, open);
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
  return withDisk(file, { ...open, writable: true }, (dev) => streamDisk(dev, job, opts));
}

export async function commitOffline(
  file: string,
  job: Job,
  opts: CommitOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  let dev: AddCowDevice;
  try {
    dev = await openDisk(file, { ...open, writable: true, writableBacking: true });
  } catch (err) {
    throw await explainReadOnlyBacking(file, err);
  }
  let message: string;
  try {
    message = await commitDisk(dev, job, opts);
  } catch (err) {
    await dev.close().catch(() => undefined);
    throw err;
  }
  await dev.close();
  return message;
}

/** A backing file that cannot be opened for writing gets a message about commit. */
export async function explainReadOnlyBacking(file: string, err: unknown): Promise<unknown> {
  if (!(err instanceof AddCowError) || err.file === undefined) return err;
  const code = err.code;
  if (code !== "EACCES" && code !== "EROFS" && code !== "EPERM") return err;
  if (!/for writing/.test(err.message)) return err;
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
