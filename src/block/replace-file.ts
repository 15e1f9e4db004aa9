import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError, describeError, errnoCode } from "../util/errors";
import { createIn, renameIn, syncDir, unlinkIn } from "../os/dir-ops";
import { type PathFd, walkPath } from "../os/path-walk";
import { type FileIO, PosixFile } from "./file-io";

/**
 * A new version of a file, written beside it and put in its place with one
 * rename: after a crash the file is the old version or the new one, whole
 * (the new one is synced before the rename, the rename made durable by a
 * sync of the directory). Tests record these steps to cut the power between them.
 */
export interface FileReplacer {
  /**
   * A new, empty file in `target`'s directory, open for writing (and reading
   * back); `current`, when given, is the file open under that name now (it
   * must still be).
   */
  createBeside(target: string, current?: FileIO): Promise<FileIO>;
  /** Renames `aside` (written and synced by the caller) over `target`, durably. */
  replace(aside: FileIO, target: string): Promise<void>;
  /** Closes and removes a file made by createBeside that is not used. */
  discard(aside: FileIO): Promise<void>;
}

/** `.NAME.PID.tmp`, the name `addcow create` writes aside too (addcow check knows it). */
export function asideName(target: string): string {
  return path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.tmp`);
}

/**
 * On the real file system, through the directory the file is actually in:
 * the name is walked once (os/path-walk.ts, links followed to the real file,
 * which must be `current` when given: the file the caller has open), the new
 * version is created in that directory with O_EXCL|O_NOFOLLOW and renamed
 * over the real file's entry through the directory's descriptor, so a
 * directory or link swapped meanwhile cannot send either elsewhere. The new
 * file gets the old one's mode and owner (the owner decides which names the
 * disk may reach: docs/security.md) and is locked exclusively before it
 * takes the name, so no one can open the new version for writing before its
 * writer is done.
 */
export const posixReplacer: FileReplacer = {
  async createBeside(target, current) {
    let place;
    try {
      place = walkPath(target);
    } catch (err) {
      throw new AddCowError(`cannot write a new version of ${target}: ${describeError(err)}`, {
        file: target,
        code: errnoCode(err),
      });
    }
    const st = place.file.st;
    const now = current?.stat();
    place.file.close();
    if (!st.isFile() || (now && (now.dev !== st.dev || now.ino !== st.ino))) {
      place.dir.close();
      throw new AddCowError(
        `cannot write a new version of ${target}: it is no longer the file that was opened; try again`,
        { file: target, code: "EBUSY" },
      );
    }
    const tmpBase = `.${place.base}.${process.pid}.tmp`;
    const tmp = path.join(path.dirname(target), tmpBase);
    let fd: number;
    try {
      fd = createIn(place.dir, tmpBase, undefined, Number(st.mode) & 0o7777);
    } catch (err) {
      place.dir.close();
      const why = errnoCode(err) === "EACCES" ? "permission denied" : (err as Error).message;
      throw new AddCowError(
        `cannot write a new version of ${target} beside it (${tmp}): ${why}; its directory must be writable, as the file is replaced by a rename`,
        { file: tmp, code: errnoCode(err) },
      );
    }
    const io = new PosixFile(tmp, fd, true);
    places.set(io, { dir: place.dir, tmpBase, base: place.base });
    try {
      fs.fchmodSync(fd, Number(st.mode) & 0o7777);
      if (Number(st.uid) !== process.geteuid?.() || Number(st.gid) !== process.getegid?.()) {
        fs.fchownSync(fd, Number(st.uid), Number(st.gid));
      }
      io.lock("exclusive", "add-cow file");
    } catch (err) {
      await this.discard(io);
      throw new AddCowError(
        `cannot give the new version of ${target} its owner (uid ${st.uid}, gid ${st.gid}) and mode: ${(err as Error).message}; run as the file's owner or root`,
        { file: target, code: errnoCode(err) },
      );
    }
    return io;
  },

  async replace(aside) {
    const p = placeOf(aside);
    renameIn(p.dir, p.tmpBase, p.base);
    places.delete(aside);
    try {
      syncDir(p.dir);
    } finally {
      p.dir.close();
    }
  },

  async discard(aside) {
    await aside.close().catch(() => undefined);
    const p = places.get(aside);
    if (!p) return;
    places.delete(aside);
    unlinkIn(p.dir, p.tmpBase);
    p.dir.close();
  },
};

/** Where each new version made by posixReplacer lives: its directory's descriptor and names. */
const places = new WeakMap<FileIO, { dir: PathFd; tmpBase: string; base: string }>();

function placeOf(aside: FileIO) {
  const p = places.get(aside);
  if (!p) throw new Error(`${aside.path} was not made by createBeside`);
  return p;
}
