import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError } from "../util/errors";
import { type MountEntry, readMountTable } from "../os/mount-table";

/** What holds a disk's lock, as far as /proc tells. */
export interface LockHolder {
  pid: number;
  /** Gone already: its lock is free by now. */
  gone: boolean;
  /** The mount directory when the holder is an addcow-mount daemon. */
  mountDir?: string;
  /** That directory is still mounted (false: the daemon is flushing and about to exit). */
  mounted?: boolean;
  /** What the process runs, for messages: "addcow stream", "qemu-system-x86_64", ... */
  command?: string;
  /** The holder is host daemon NAME (addcow-mount --serve NAME), which serves many mounts. */
  host?: string;
}

const FUSE_TYPE = "fuse.addcow";

/** addcow-mount options that take the next argument as their value. */
const VALUE_FLAGS = new Set(["-o", "--options", "--name", "--serve"]);

/** The name of a host daemon's command line (addcow-mount --serve NAME), or undefined. */
export function hostOfCommandLine(args: readonly string[]): string | undefined {
  const at = args.findIndex((a) => /addcow-mount(\.js)?$/.test(a));
  if (at < 0) return undefined;
  const serve = args.indexOf("--serve", at + 1);
  return serve < 0 ? undefined : args[serve + 1];
}

/**
 * The mount directory of an addcow-mount command line: its last positional
 * argument (options may come anywhere; -o, --options and --name take a value).
 * Every daemon runs as addcow-mount, also when mount(8) started it through
 * mount.fuse.addcow, so this one form is enough.
 */
export function mountDirOfCommandLine(args: readonly string[], cwd: string): string | undefined {
  const at = args.findIndex((a) => /addcow-mount(\.js)?$/.test(a));
  if (at < 0 || hostOfCommandLine(args) !== undefined) return undefined;
  let last: string | undefined;
  let onlyPositionals = false;
  for (let i = at + 1; i < args.length; i++) {
    const a = args[i]!;
    if (a === "") continue;
    if (onlyPositionals || !a.startsWith("-")) last = a;
    else if (a === "--") onlyPositionals = true;
    else if (VALUE_FLAGS.has(a)) i++;
  }
  return last === undefined ? undefined : path.resolve(cwd, last);
}

/** The mount point of an addcow mount at `dir` (by real path), or undefined. */
function addcowMountAt(dir: string, table: MountEntry[]): MountEntry | undefined {
  let real = dir;
  try {
    real = fs.realpathSync(dir);
  } catch {
    // Keep the name as given.
  }
  return table.find((e) => e.mountPoint === real && e.fsType === FUSE_TYPE);
}

export function describeHolder(pid: number, table?: MountEntry[]): LockHolder {
  let args: string[];
  let cwd = "/";
  try {
    args = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
  } catch {
    return { pid, gone: true };
  }
  try {
    cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    // Not ours to look at: absolute names still work.
  }
  const host = hostOfCommandLine(args);
  if (host !== undefined) {
    return { pid, gone: false, host, command: `addcow-mount --serve ${host}` };
  }
  const mountDir = mountDirOfCommandLine(args, cwd);
  if (mountDir !== undefined) {
    const mounted = addcowMountAt(mountDir, table ?? readMountTable()) !== undefined;
    return { pid, gone: false, mountDir, mounted, command: "addcow-mount" };
  }
  const script = args.findIndex((a) => /(^|\/)addcow(\.js)?$/.test(a));
  if (script >= 0) {
    const sub = args.slice(script + 1).find((a) => a !== "" && !a.startsWith("-"));
    return { pid, gone: false, command: sub ? `addcow ${sub}` : "addcow" };
  }
  const exe = args[0] ? path.basename(args[0]) : "";
  return { pid, gone: false, ...(exe ? { command: exe } : {}) };
}

/** Where the disk itself is mounted: the addcow mount whose source (fsname) is this .add-cow file. */
export function mountOfDisk(file: string, table: MountEntry[] = readMountTable()): string | null {
  let real: string;
  try {
    real = fs.realpathSync(file);
  } catch {
    return null;
  }
  return table.find((e) => e.fsType === FUSE_TYPE && e.source === real)?.mountPoint ?? null;
}

/** A path as a shell word, quoted only when it needs to be (a command to copy). */
function shellWord(p: string): string {
  return /^[\w@%+=:,./-]+$/.test(p) ? p : `'${p.replace(/'/g, `'\\''`)}'`;
}

export interface LockAdvice {
  /** The command can read without locks (-U, --force-share): say so. */
  forceShare?: boolean;
}

/**
 * A lock error, said in the terms a user acts on: where the disk is mounted
 * and how to unmount it, which program holds it, and -U for commands that can
 * read without locks. Anything that is not a lock error is returned as is.
 */
export function explainLock(err: unknown, advice: LockAdvice = {}): unknown {
  if (!(err instanceof AddCowError) || err.reason !== "locked" || err.file === undefined) {
    return err;
  }
  const table = readMountTable();
  const holder = err.pid === undefined ? undefined : describeHolder(err.pid, table);
  const readAnyway = advice.forceShare
    ? "; or add -U to read it without locks (what the writer has not flushed yet may be missing)"
    : "";
  const wanted = err.mode === "write" ? "for writing" : "for reading";
  const pid = err.pid === undefined ? "" : `, pid ${err.pid}`;
  let message: string;
  const mountedAt = mountOfDisk(err.file, table);
  if (mountedAt !== null) {
    message = `${err.file} is mounted at ${mountedAt} (addcow-mount${pid}): unmount it first (fusermount -u ${shellWord(mountedAt)})${readAnyway}`;
  } else if (holder?.host !== undefined) {
    message = `${err.file} is in use by host daemon ${holder.host} (addcow-mount --serve, pid ${holder.pid}), which is detaching it, so it cannot be opened ${wanted} yet; try again${readAnyway}`;
  } else if (holder?.mountDir !== undefined) {
    const serving = holder.mounted ? "serving" : "that was serving";
    message = `${err.file} is in use by addcow-mount (pid ${holder.pid}) ${serving} ${holder.mountDir}, so it cannot be opened ${wanted}: unmount that first (fusermount -u ${shellWord(holder.mountDir)})${readAnyway}`;
  } else {
    const who =
      err.pid === undefined
        ? "another process"
        : `process ${err.pid}${holder?.command ? ` (${holder.command})` : ""}`;
    message = `${err.file} is in use by ${who}, so it cannot be opened ${wanted} until that process ends${readAnyway}`;
  }
  return new AddCowError(message, {
    code: err.code,
    reason: "locked",
    file: err.file,
    ...(err.pid === undefined ? {} : { pid: err.pid }),
    ...(err.mode === undefined ? {} : { mode: err.mode }),
    cause: err,
  });
}
