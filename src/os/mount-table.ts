import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError, errnoCode } from "../util/errors";

export interface MountEntry {
  /** "major:minor" of the mounted filesystem. */
  device: string;
  mountPoint: string;
  fsType: string;
  /** What was mounted, as the file system names it (an addcow mount: the .add-cow file). */
  source: string;
}

/** mountinfo escapes space, tab, newline and backslash as \ooo. */
function unescapeMountField(text: string): string {
  return text.replace(/\\([0-7]{3})/g, (_m, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

export function parseMountInfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const fields = line.split(" ");
    const dash = fields.indexOf("-");
    if (dash < 0 || fields.length < 5) continue;
    out.push({
      device: fields[2]!,
      mountPoint: unescapeMountField(fields[4]!),
      fsType: fields[dash + 1] ?? "",
      source: unescapeMountField(fields[dash + 2] ?? ""),
    });
  }
  return out;
}

export function readMountTable(): MountEntry[] {
  return parseMountInfo(fs.readFileSync("/proc/self/mountinfo", "utf8"));
}

export async function readMountTableAsync(): Promise<MountEntry[]> {
  return parseMountInfo(await fs.promises.readFile("/proc/self/mountinfo", "utf8"));
}

export function isMountPoint(dir: string, table: MountEntry[] = readMountTable()): boolean {
  return table.some((m) => m.mountPoint === dir);
}

/** The major and minor numbers of a stat's st_dev (Linux's encoding). */
export function majorMinor(dev: number): [number, number] {
  const major = Math.floor(dev / 256) & 0xfff;
  const minor = (dev & 0xff) | (Math.floor(dev / 4096) & ~0xff);
  return [major, minor];
}

/** "major:minor" as mountinfo writes it, from a stat's st_dev. */
export function deviceId(dev: number): string {
  return majorMinor(dev).join(":");
}

/**
 * Makes sure MOUNTDIR can be mounted on: created when missing (returns true),
 * refused when it is not a directory, already a mount point, or not empty.
 */
export function prepareMountDir(dir: string): boolean {
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch (err) {
    const code = errnoCode(err);
    if (code === "ENOENT") {
      makeDirs(dir);
      return true;
    }
    if (code === "ENOTCONN") {
      throw new AddCowError(
        `mount directory ${dir} is a FUSE mount whose daemon is gone; unmount it first: fusermount -u ${dir}`,
        { file: dir, code: "EBUSY" },
      );
    }
    throw new AddCowError(`cannot use mount directory ${dir}: ${(err as Error).message}`, {
      file: dir,
      code,
    });
  }
  if (!st.isDirectory()) {
    throw new AddCowError(`mount directory ${dir} is not a directory`, {
      file: dir,
      code: "ENOTDIR",
    });
  }
  if (isMountPoint(dir)) {
    throw new AddCowError(
      `mount directory ${dir} is already a mount point; unmount it first (fusermount -u ${dir}) or choose another directory`,
      { file: dir, code: "EBUSY" },
    );
  }
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch (err) {
    const code = errnoCode(err);
    const why = code === "EACCES" ? "permission denied" : (err as Error).message;
    throw new AddCowError(
      `cannot use mount directory ${dir}: ${why}; choose a directory you may read and write`,
      { file: dir, code },
    );
  }
  if (names.length > 0) {
    throw new AddCowError(
      `mount directory ${dir} is not empty; use an empty directory (a new one is created when missing)`,
      { file: dir, code: "ENOTEMPTY" },
    );
  }
  return false;
}

/**
 * mkdir -p, one level at a time. Node's recursive mkdir spins forever where a
 * directory can never be made but its parent exists (under /proc: ENOENT again
 * and again); here the first level that cannot be made ends it with one line.
 */
function makeDirs(dir: string): void {
  const missing: string[] = [];
  for (let d = dir; !fs.existsSync(d); d = path.dirname(d)) {
    missing.unshift(d);
    if (path.dirname(d) === d) break;
  }
  for (const d of missing) {
    try {
      fs.mkdirSync(d);
    } catch (err) {
      const code = errnoCode(err);
      if (code === "EEXIST") continue;
      const where = d === dir ? "" : ` (${d} cannot be made)`;
      const why =
        code === "EACCES" || code === "EPERM"
          ? "permission denied"
          : code === "ENOENT"
            ? `${path.dirname(d)} does not take new directories`
            : (err as Error).message;
      throw new AddCowError(
        `cannot create mount directory ${dir}${where}: ${why}; choose a directory you may create or an existing empty one`,
        { file: d, code },
      );
    }
  }
}

/** The file name a disk gets in the mount directory: its own name without ".add-cow". */
export function diskFileName(file: string): string {
  const base = path.basename(file);
  const name = base.endsWith(".add-cow") ? base.slice(0, -".add-cow".length) : base;
  return name === "" ? base : name;
}

/**
 * Whether this process still holds /dev/fuse open. libfuse closes it once the
 * kernel ends the connection: after a lazy unmount, when the last file open
 * through the mount is closed (the kernel does not always deliver that file's
 * release first).
 */
export function holdsFuseDevice(): boolean {
  let fds: string[];
  try {
    fds = fs.readdirSync("/proc/self/fd");
  } catch {
    return true;
  }
  return fds.some((fd) => {
    try {
      return fs.readlinkSync(`/proc/self/fd/${fd}`) === "/dev/fuse";
    } catch {
      return false;
    }
  });
}
