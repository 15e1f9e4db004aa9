import * as util from "node:util";

/**
 * The two system calls node:fs lacks, flock(2) and lseek(2) (for SEEK_DATA and
 * SEEK_HOLE), called in glibc through koffi: a foreign-function interface on
 * Node-API, so its prebuilt binary serves every Node.js version and nothing
 * compiles on install (fs-ext, used before, is a NAN module that must be
 * rebuilt against the headers of the exact Node.js that loads it). Failures
 * throw as node:fs does: an Error with code ("EAGAIN"), errno and syscall.
 */
interface Calls {
  flock(fd: number, operation: number): number;
  lseek(fd: number, offset: number, whence: number): number;
  errno(): number;
}

let calls: Calls | undefined;

/** Loaded on first use: commands that never lock or seek do not pay for it. */
function libc(): Calls {
  if (!calls) {
    const koffi = require("koffi") as typeof import("koffi");
    const lib = koffi.load("libc.so.6");
    calls = {
      flock: lib.func("int flock(int fd, int operation)") as Calls["flock"],
      lseek: lib.func("int64_t lseek(int fd, int64_t offset, int whence)") as Calls["lseek"],
      errno: () => koffi.errno(),
    };
  }
  return calls;
}

function systemError(syscall: string, errno: number): NodeJS.ErrnoException {
  const code = util.getSystemErrorName(-errno);
  const err: NodeJS.ErrnoException = new Error(
    `${code}: ${util.getSystemErrorMessage(-errno)}, ${syscall}`,
  );
  err.code = code;
  err.errno = -errno;
  err.syscall = syscall;
  return err;
}

const LOCK_SH = 1;
const LOCK_EX = 2;
const LOCK_NB = 4;

/** flock(fd, LOCK_SH or LOCK_EX | LOCK_NB): throws EWOULDBLOCK (EAGAIN) when held elsewhere. */
export function flockNonBlocking(fd: number, kind: "shared" | "exclusive"): void {
  const c = libc();
  if (c.flock(fd, (kind === "exclusive" ? LOCK_EX : LOCK_SH) | LOCK_NB) !== 0) {
    throw systemError("flock", c.errno());
  }
}

/** lseek(fd, offset, whence), whence passed as is (SEEK_DATA = 3, SEEK_HOLE = 4). */
export function lseek(fd: number, offset: number, whence: number): number {
  const c = libc();
  const at = c.lseek(fd, offset, whence);
  if (at < 0) throw systemError("lseek", c.errno());
  return at;
}
