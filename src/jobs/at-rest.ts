import { readHeader } from "../addcow/open-addcow";
import * as path from "node:path";
import { AddCowError } from "../util/errors";
import { type OpenOptions, openDiskFile, resolveName } from "../chain/open-chain";
import { withDiskAtRest } from "../chain/at-rest";
import { type FileOpener, PosixFile, openRegularFile } from "../block/file-io";
import { type CommitOptions, commitDisk, readOnlyBackingError } from "./commit";
import { type CopyOptions, DEFAULT_IN_FLIGHT } from "./copy-engine";
import type { Job } from "./job";
import { streamDisk } from "./stream";
import { type RebaseOptions, rebaseDisk, rebaseUnsafe } from "./rebase";
import { type RebaseRequest, checkFormat, oldBacking, openTarget } from "./rebase-target";

/**
 * Bulk copies with several in flight use thread-pool I/O, so reads and writes
 * of different chunks overlap instead of queueing on the JS thread (which the
 * page-cache-friendly sync style would do). ADDCOW_IO, when set, still decides.
 */
export function jobOpener(opts: CopyOptions, open: OpenOptions): FileOpener | undefined {
  if (open.opener || process.env.ADDCOW_IO || (opts.inFlight ?? DEFAULT_IN_FLIGHT) <= 1) {
    return open.opener;
  }
  return async (file, mode, at) =>
    new PosixFile(file, await openRegularFile(at ?? file, mode), mode === "write", "async");
}

export function streamAtRest(
  file: string,
  job: Job,
  opts: CopyOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  const opener = jobOpener(opts, open);
  return withDiskAtRest(file, { ...open, writable: true, ...(opener ? { opener } : {}) }, (dev) =>
    streamDisk(dev, job, opts),
  );
}

export function commitAtRest(
  file: string,
  job: Job,
  opts: CommitOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  const opener = jobOpener(opts, open);
  return withDiskAtRest(
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
  // The overlay's own files are not the backing: their error stands as it is. The disk's
  // header is read as the chain reads it (judged, through its descriptor).
  const own = [path.resolve(file)];
  try {
    const { io: meta, namer } = await openDiskFile(file, { lock: false });
    try {
      own.push(resolveName(namer, (await readHeader(meta, file)).imageName));
    } finally {
      await meta.close();
    }
  } catch {
    return err;
  }
  if (own.includes(path.resolve(err.file))) return err;
  return readOnlyBackingError(file, err.file, code);
}

/**
 * `addcow rebase` on a disk at rest: opens it for writing (its locks say
 * whether it is mounted), opens the new backing chain, and runs the safe
 * rebase (or, with -u, rewrites the name only; the old backing then need
 * not exist).
 */
export async function rebaseAtRest(
  file: string,
  req: RebaseRequest,
  job: Job,
  opts: RebaseOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  const format = checkFormat(req);
  const opener = jobOpener(opts, open);
  const openOpts: OpenOptions = {
    ...open,
    writable: true,
    ...(req.unsafe ? { withoutBacking: true } : {}),
    ...(opener ? { opener } : {}),
  };
  return withDiskAtRest(file, openOpts, async (dev) => {
    const target = format === null ? null : await openTarget(dev, req.backing, format, open);
    try {
      if (req.unsafe)
        return await rebaseUnsafe(
          dev,
          target,
          await oldBacking(dev, open),
          opts.replacer,
          opts.warn,
        );
      return await rebaseDisk(dev, target, job, opts);
    } finally {
      await target?.device.close();
    }
  });
}
