import * as fs from "node:fs";
import { AddCowError } from "../util/errors";
import { flockNonBlocking } from "./libc";
import { majorMinor } from "./mount-table";

export type LockKind = "shared" | "exclusive";

/**
 * Takes a non-blocking flock on an open file: writers exclusive, readers shared,
 * so a disk open for writing cannot be opened again by anyone, and a disk being
 * read cannot be opened for writing. The error names the holder's pid. An
 * flock(2) lock is released by the kernel when the process dies, even by SIGKILL.
 */
export function lockDescriptor(fd: number, file: string, kind: LockKind, role: string): void {
  try {
    flockNonBlocking(fd, kind);
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code !== "EAGAIN" && code !== "EWOULDBLOCK") throw err;
    const holder = lockHolder(fd);
    const who = holder ? `process ${holder}` : "another process";
    const wanted = kind === "exclusive" ? "for writing" : "for reading";
    throw new AddCowError(
      `${role} ${file} is in use by ${who}; it cannot be opened ${wanted} until that process ends (unmount it or stop the job)`,
      {
        code: "EBUSY",
        reason: "locked",
        file,
        mode: kind === "exclusive" ? "write" : "read",
        ...(holder === undefined ? {} : { pid: holder }),
      },
    );
  }
}

/** The pid that holds a flock on the file, from /proc/locks, when it can be found. */
function lockHolder(fd: number): number | undefined {
  try {
    const st = fs.fstatSync(fd);
    // /proc/locks writes the device in hex: "fd:01:5678".
    const [major, minor] = majorMinor(st.dev);
    const id = `${major.toString(16).padStart(2, "0")}:${minor.toString(16).padStart(2, "0")}:${st.ino}`;
    for (const line of fs.readFileSync("/proc/locks", "utf8").split("\n")) {
      const f = line.trim().split(/\s+/);
      // "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
      if (f[1] === "FLOCK" && f[5] === id && f[4] !== String(process.pid)) return Number(f[4]);
    }
  } catch {
    // Best effort only.
  }
  return undefined;
}
