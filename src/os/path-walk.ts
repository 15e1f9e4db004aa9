import * as fs from "node:fs";
import * as path from "node:path";

/** O_PATH (Linux): a descriptor naming a file without opening it for I/O. Not in fs.constants. */
export const O_PATH = 0o10000000;

/** The sticky bit: in such a directory only an entry's owner may rename or remove it. */
const S_ISVTX = 0o1000;

/** Symbolic links one walk follows at most (the kernel's limit too). */
const MAX_LINKS = 40;

/** The user addcow runs as: its own directories and links control nothing it does not. */
const RUNNER = process.geteuid?.() ?? 0;

/**
 * A user other than the one running addcow (and other than root) who can
 * change where a name leads: the owner of a directory the walk looked a name
 * up in, or of a symbolic link it followed.
 */
export interface Controller {
  uid: number;
  /** What they own, for messages: "directory /home/t", "symbolic link /home/t/disk.add-cow". */
  what: string;
}

/** An O_PATH descriptor and what fstat said of it when it was opened. */
export class PathFd {
  private closed = false;

  constructor(
    readonly fd: number,
    readonly st: fs.BigIntStats,
  ) {}

  /** The descriptor as a path: the kernel resolves names below it from this very inode. */
  get proc(): string {
    return `/proc/self/fd/${this.fd}`;
  }

  /** Where the kernel says this inode is now. */
  realPath(): string {
    return fs.readlinkSync(this.proc);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    fs.closeSync(this.fd);
  }
}

/** Why a walk stopped: an errno code, and the part of the name it had reached. */
export class WalkError extends Error {
  constructor(
    readonly code: string,
    /** The path (as walked, links replaced by their targets) where it stopped. */
    readonly at: string,
    /** Owners of what the walk passed before it stopped. */
    readonly controllers: Controller[],
    override readonly cause?: unknown,
  ) {
    super(`${code}: ${at}`);
    this.name = "WalkError";
  }
}

/**
 * A directory anyone in a group, or anyone at all, may change (write bits for
 * group or other) without the sticky bit: whoever can write it can rename
 * entries over each other, so nothing reached through it can be trusted.
 */
export class OpenDirectoryError extends Error {
  readonly code = "EPERM";
  constructor(
    readonly dir: string,
    readonly mode: number,
  ) {
    const who = mode & 0o002 ? "every user" : "its group";
    super(
      `directory ${dir} (mode ${(mode & 0o7777).toString(8).padStart(4, "0")}) may be changed by ${who} without the sticky bit, so any name in it can be swapped; make it 0755 (or 1777)`,
    );
    this.name = "OpenDirectoryError";
  }
}

export interface Walked {
  /** The final inode (a link at the end followed unless `nofollow`). */
  file: PathFd;
  /** The directory holding the final entry. */
  dir: PathFd;
  /** The final entry's name in `dir`. */
  base: string;
  /** Who other than the runner (and root) controls the way to `file`. */
  controllers: Controller[];
  close(): void;
}

export interface WalkedParent {
  /** The directory that holds, or will hold, `base`. */
  dir: PathFd;
  base: string;
  controllers: Controller[];
  close(): void;
}

/** An O_PATH descriptor of `at` (its last component not followed, unless `flags` says O_DIRECTORY). */
function openPath(at: string, flags: number): PathFd {
  const follow = (flags & fs.constants.O_DIRECTORY) !== 0;
  const fd = fs.openSync(at, O_PATH | (follow ? 0 : fs.constants.O_NOFOLLOW) | flags);
  try {
    return new PathFd(fd, fs.fstatSync(fd, { bigint: true }));
  } catch (err) {
    fs.closeSync(fd);
    throw err;
  }
}

function components(name: string): string[] {
  return name.split("/").filter((c) => c !== "" && c !== ".");
}

function addController(list: Controller[], uid: number, what: string): void {
  if (uid === RUNNER || uid === 0) return;
  if (!list.some((c) => c.uid === uid)) list.push({ uid, what });
}

/**
 * Resolves a name one component at a time, the way the kernel would, but
 * through descriptors only: each component is looked up with O_PATH|O_NOFOLLOW
 * below the descriptor of the directory reached so far (`/proc/self/fd/N/NAME`,
 * since Node has no openat), and symbolic links are read and followed here.
 * So the walk knows who owns every directory it looked a name up in and every
 * link it followed (`controllers`), which a kernel lookup would not tell,
 * and what it returns is exactly the inode it judged: nothing is opened for
 * I/O, no FIFO waits, no device sees an open.
 *
 * Relative names start at `from` (a directory descriptor), absolute ones at
 * "/". `..` is the kernel's: the parent of the directory actually reached.
 */
class Walk {
  readonly controllers: Controller[] = [];
  private dir: PathFd;
  private shown: string;
  private links = 0;
  private readonly pending: string[];

  constructor(
    name: string,
    from: PathFd | null,
    private readonly nofollowLast: boolean,
  ) {
    if (name === "") throw new WalkError("ENOENT", name, []);
    const absolute = name.startsWith("/") || from === null;
    this.dir = absolute ? openPath("/", fs.constants.O_DIRECTORY) : reopen(from);
    this.shown = absolute ? "/" : from.realPath();
    this.pending = components(absolute ? path.resolve(name) : name);
  }

  private fail(err: unknown): never {
    this.dir.close();
    if (err instanceof WalkError || err instanceof OpenDirectoryError) throw err;
    const code = (err as NodeJS.ErrnoException).code ?? "EIO";
    throw new WalkError(code, this.shown, this.controllers, err);
  }

  /** Looks names up until `stopBefore` components are left; returns the last entry looked up. */
  run(stopBefore: number): PathFd | null {
    try {
      for (;;) {
        if (this.pending.length <= stopBefore) return null;
        const name = this.pending.shift()!;
        this.noteDirectory();
        const at = `${this.dir.proc}/${name}`;
        const next = openPath(at, 0);
        const last = this.pending.length === 0;
        const shown = path.join(this.shown, name);
        if (next.st.isSymbolicLink() && !(last && this.nofollowLast)) {
          this.follow(next, at, shown);
          continue;
        }
        if (last) {
          this.shown = shown;
          return next;
        }
        if (!next.st.isDirectory()) {
          next.close();
          throw new WalkError("ENOTDIR", shown, this.controllers);
        }
        this.dir.close();
        this.dir = next;
        this.shown = shown;
      }
    } catch (err) {
      return this.fail(err);
    }
  }

  private noteDirectory(): void {
    noteDirectory(this.dir, this.shown, this.controllers);
  }

  private follow(link: PathFd, at: string, shown: string): void {
    try {
      if (++this.links > MAX_LINKS) throw new WalkError("ELOOP", shown, this.controllers);
      addController(this.controllers, Number(link.st.uid), `symbolic link ${shown}`);
      const target = fs.readlinkSync(at);
      // The link read must be the one looked up (a name swapped between the two is refused).
      const again = fs.lstatSync(at, { bigint: true });
      if (again.ino !== link.st.ino || again.dev !== link.st.dev) {
        throw new WalkError("EAGAIN", shown, this.controllers);
      }
      this.pending.unshift(...components(target));
      if (target.startsWith("/")) {
        this.dir.close();
        this.dir = openPath("/", fs.constants.O_DIRECTORY);
        this.shown = "/";
      }
    } finally {
      link.close();
    }
  }

  get directory(): PathFd {
    return this.dir;
  }

  get where(): string {
    return this.shown;
  }
}

/** Whoever owns a directory a name is looked up in controls that name; so does anyone who may write it. */
function noteDirectory(dir: PathFd, shown: string, controllers: Controller[]): void {
  const mode = Number(dir.st.mode);
  if ((mode & 0o022) !== 0 && (mode & S_ISVTX) === 0) throw new OpenDirectoryError(shown, mode);
  addController(controllers, Number(dir.st.uid), `directory ${shown}`);
}

function reopen(dir: PathFd): PathFd {
  return openPath(dir.proc, fs.constants.O_DIRECTORY);
}

/** Walks `name` to its final inode (see {@link Walk}); throws WalkError or OpenDirectoryError. */
export function walkPath(
  name: string,
  from: PathFd | null = null,
  opts: { nofollow?: boolean } = {},
): Walked {
  const walk = new Walk(name, from, opts.nofollow === true);
  const file = walk.run(0);
  const dir = walk.directory;
  if (file === null) {
    // The name ended at a directory ("/", "a/.."): the directory is the file.
    const self = reopen(dir);
    return {
      file: self,
      dir,
      base: ".",
      controllers: walk.controllers,
      close: () => (self.close(), dir.close()),
    };
  }
  return {
    file,
    dir,
    base: path.basename(walk.where),
    controllers: walk.controllers,
    close: () => (file.close(), dir.close()),
  };
}

/** Walks to the directory that holds `name`'s last component, which need not exist (for creating it). */
export function walkParent(name: string, from: PathFd | null = null): WalkedParent {
  const base = path.basename(name);
  if (base === "" || base === "." || base === ".." || name.endsWith("/")) {
    throw new WalkError("EINVAL", name, []);
  }
  const walk = new Walk(path.dirname(name), from, false);
  const last = walk.run(0);
  let dir: PathFd;
  if (last === null) dir = walk.directory;
  else {
    walk.directory.close();
    if (!last.st.isDirectory()) {
      last.close();
      throw new WalkError("ENOTDIR", walk.where, walk.controllers);
    }
    dir = last;
  }
  try {
    noteDirectory(dir, walk.where, walk.controllers);
  } catch (err) {
    dir.close();
    throw err;
  }
  return { dir, base, controllers: walk.controllers, close: () => dir.close() };
}
