import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError, errnoCode } from "../util/errors";
import { type FileIO, PosixFile } from "./file-io";

/**
 * A new version of a file, written beside it and put in its place with one
 * rename: after a crash the file is the old version or the new one, whole
 * (the new one is synced before the rename, the rename made durable by a
 * sync of the directory). Tests record these steps to cut the power between them.
 */
export interface FileReplacer {
  /** A new, empty file in `target`'s directory, open for writing (and reading back). */
  createBeside(target: string): Promise<FileIO>;
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
 * On the real file system. The new file gets the old one's mode and owner
 * (the owner decides which names the disk may reach: docs/security.md) and
 * is locked exclusively before it takes the name, so no one can open the new
 * version for writing before its writer is done.
 */
export const posixReplacer: FileReplacer = {
  async createBeside(target) {
    const st = fs.statSync(target);
    const tmp = asideName(target);
    let fd: number;
    try {
      fd = fs.openSync(tmp, "wx+", st.mode & 0o7777);
    } catch (err) {
      const why = errnoCode(err) === "EACCES" ? "permission denied" : (err as Error).message;
      throw new AddCowError(
        `cannot write a new version of ${target} beside it (${tmp}): ${why}; its directory must be writable, as the file is replaced by a rename`,
        { file: tmp, code: errnoCode(err) },
      );
    }
    const io = new PosixFile(tmp, fd, true);
    try {
      fs.fchmodSync(fd, st.mode & 0o7777);
      if (st.uid !== process.geteuid?.() || st.gid !== process.getegid?.()) {
        fs.fchownSync(fd, st.uid, st.gid);
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

  async replace(aside, target) {
    fs.renameSync(aside.path, target);
    const dir = fs.openSync(path.dirname(target), "r");
    try {
      fs.fsyncSync(dir);
    } finally {
      fs.closeSync(dir);
    }
  },

  async discard(aside) {
    await aside.close().catch(() => undefined);
    fs.rmSync(aside.path, { force: true });
  },
};
