import * as fs from "node:fs";
import type { PathFd } from "./path-walk";

/**
 * Changes to one directory through its descriptor (`/proc/self/fd/N/NAME`),
 * so they happen in the directory that was walked and judged, whatever its
 * path leads to by now. Nothing here follows a link at the last component.
 */

/** The user addcow runs as. */
const RUNNER = process.geteuid?.() ?? 0;

/** Who a new file belongs to (uid and gid). */
export interface FileOwner {
  uid: number;
  gid: number;
}

/** The owner of the directory `dir`: files addcow makes there for someone are theirs. */
export function ownerOfDir(dir: PathFd): FileOwner {
  return { uid: Number(dir.st.uid), gid: Number(dir.st.gid) };
}

/**
 * Creates `base` in `dir`, open for reading and writing: O_CREAT|O_EXCL (an
 * existing name, a dangling link included, is EEXIST) and O_NOFOLLOW. When
 * addcow runs as root and `owner` is another user, the file is given to
 * them (fchown) before anything is written, as rebase keeps a file's owner.
 * Returns the descriptor; the file is removed again when the chown fails.
 */
export function createIn(dir: PathFd, base: string, owner?: FileOwner, mode = 0o644): number {
  const at = `${dir.proc}/${base}`;
  const { O_CREAT, O_EXCL, O_NOFOLLOW, O_RDWR } = fs.constants;
  const fd = fs.openSync(at, O_CREAT | O_EXCL | O_NOFOLLOW | O_RDWR, mode);
  try {
    if (owner && RUNNER === 0 && (owner.uid !== 0 || owner.gid !== process.getegid?.())) {
      fs.fchownSync(fd, owner.uid, owner.gid);
    }
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(at, { force: true });
    throw err;
  }
  return fd;
}

/** Removes `base` from `dir` (never what a link there points to). */
export function unlinkIn(dir: PathFd, base: string): void {
  fs.rmSync(`${dir.proc}/${base}`, { force: true });
}

/** A second name `to` for the file `from`, both in `dir` (EEXIST when `to` exists). */
export function linkIn(dir: PathFd, from: string, to: string): void {
  fs.linkSync(`${dir.proc}/${from}`, `${dir.proc}/${to}`);
}

/** Renames `from` over `to`, both in `dir`. */
export function renameIn(dir: PathFd, from: string, to: string): void {
  fs.renameSync(`${dir.proc}/${from}`, `${dir.proc}/${to}`);
}

/** Makes the directory's entries durable (fsync of the directory). */
export function syncDir(dir: PathFd): void {
  const fd = fs.openSync(dir.proc, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
