import { constants } from "node:os";
import { errnoCode } from "../util/errors";
import { log } from "../util/log";

const ERRNO = constants.errno as Record<string, number>;

/** Negative errno for the kernel ("EIO" -> -5). */
export function errno(code: string): number {
  const n = ERRNO[code];
  return n === undefined ? -ERRNO.EIO! : -n;
}

/**
 * The negative errno a failed request answers with. Engine errors carry an
 * errno-style `code`; anything without one is a bug or an I/O surprise and
 * becomes EIO, never success.
 */
export function errnoOf(err: unknown, what: string): number {
  const code = errnoCode(err);
  if (code !== undefined && ERRNO[code] !== undefined) {
    log.fuse("%s failed: %s (%s)", what, code, (err as Error).message);
    return -ERRNO[code]!;
  }
  log.fuse("%s failed without an errno code, answering EIO: %O", what, err);
  return -ERRNO.EIO!;
}
