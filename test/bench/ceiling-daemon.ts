/**
 * The ceiling: the thinnest fuse-native daemon we can write. It presents one
 * raw file as MOUNTDIR/disk and passes every read and write straight to it
 * (no copy-on-write, no checks beyond the basics). No fuse-native daemon can
 * beat it, so addcow's ratio to it shows how close addcow is to the limit.
 *
 *   node dist/test/bench/ceiling-daemon.js [--io sync|async] [--small] RAWFILE MOUNTDIR
 *
 * --io sync (default): pread/pwrite on the JS thread (page-cache hits are far
 * cheaper than a thread-pool hop); --io async: libuv thread pool.
 * --small: no big_writes / large request options (shows what they are worth).
 * --null: answer reads and writes without any file I/O (fuse-native's own per-request cost).
 * Prints "ready" on stdout once mounted; SIGTERM/SIGINT unmount and exit.
 */
import * as fs from "node:fs";

type Cb = (...args: unknown[]) => void;
interface FuseInstance {
  mount(cb: (err: Error | null) => void): void;
  unmount(cb: (err: Error | null) => void): void;
}
type FuseCtor = new (mnt: string, ops: Record<string, Cb>, opts: object) => FuseInstance;

const FuseBase = require("fuse-native") as FuseCtor & {
  EIO: number;
  ENOENT: number;
  prototype: { _fuseOptions(): string };
};

/** libfuse 2 caps a request at 32 pages; ask for that much in both directions. */
const MAX_REQUEST = 128 * 1024;

interface Args {
  io: "sync" | "async" | "null";
  small: boolean;
  raw: string;
  mnt: string;
}

function parseArgs(argv: string[]): Args {
  let io: Args["io"] = "sync";
  let small = false;
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    if (a === "--io") {
      const v = argv[++i];
      if (v !== "sync" && v !== "async") throw new Error(`--io takes sync or async, not ${v}`);
      io = v;
    } else if (a === "--small") small = true;
    else if (a === "--null") io = "null";
    else rest.push(a);
  }
  if (rest.length !== 2)
    throw new Error("usage: ceiling-daemon [--io sync|async] [--null] [--small] RAWFILE MOUNTDIR");
  return { io, small, raw: rest[0] as string, mnt: rest[1] as string };
}

function main(): void {
  const { io, small, raw, mnt } = parseArgs(process.argv.slice(2));
  const fd = fs.openSync(raw, "r+");
  const size = fs.fstatSync(fd).size;
  const now = new Date();
  const stat = (mode: number, sz: number) => ({
    mode,
    uid: process.getuid?.() ?? 0,
    gid: process.getgid?.() ?? 0,
    size: sz,
    mtime: now,
    atime: now,
    ctime: now,
    nlink: 1,
  });
  const errno = (err: NodeJS.ErrnoException) => (err.errno ? err.errno : FuseBase.EIO);

  const ops: Record<string, Cb> = {
    getattr: (p, cb) => {
      const done = cb as Cb;
      if (p === "/") return done(0, stat(0o40755, 4096));
      if (p === "/disk") return done(0, stat(0o100644, size));
      return done(FuseBase.ENOENT);
    },
    readdir: (p, cb) => (cb as Cb)(0, p === "/" ? ["disk"] : []),
    open: (_p, _flags, cb) => (cb as Cb)(0, 1),
    release: (_p, _fh, cb) => (cb as Cb)(0),
    flush: (_p, _fh, cb) => (cb as Cb)(0),
    fsync: (_p, _fh, _datasync, cb) => {
      fs.fdatasync(fd, (err) => (cb as Cb)(err ? errno(err) : 0));
    },
    read: (_p, _fh, buf, len, pos, cb) => {
      const done = cb as Cb;
      if (io === "null") done(len);
      else if (io === "sync") {
        try {
          done(fs.readSync(fd, buf as Buffer, 0, len as number, pos as number));
        } catch (err) {
          done(errno(err as NodeJS.ErrnoException));
        }
      } else {
        fs.read(fd, buf as Buffer, 0, len as number, pos as number, (err, n) =>
          done(err ? errno(err) : n),
        );
      }
    },
    write: (_p, _fh, buf, len, pos, cb) => {
      const done = cb as Cb;
      if (io === "null") done(len);
      else if (io === "sync") {
        try {
          done(fs.writeSync(fd, buf as Buffer, 0, len as number, pos as number));
        } catch (err) {
          done(errno(err as NodeJS.ErrnoException));
        }
      } else {
        fs.write(fd, buf as Buffer, 0, len as number, pos as number, (err, n) =>
          done(err ? errno(err) : n),
        );
      }
    },
  };

  // fuse-native passes only the options it knows; add the request-size ones.
  class CeilingFuse extends FuseBase {
    _fuseOptions(): string {
      const base = FuseBase.prototype._fuseOptions.call(this);
      if (small) return base;
      const extra = ["big_writes", `max_write=${MAX_REQUEST}`, `max_read=${MAX_REQUEST}`];
      return base ? `${base},${extra.join(",")}` : `-o${extra.join(",")}`;
    }
  }

  const fuse = new CeilingFuse(mnt, ops, { timeout: false, mkdir: true });
  fuse.mount((err) => {
    if (err) {
      process.stderr.write(`ceiling-daemon: mount failed: ${err.message}\n`);
      process.exit(1);
    }
    process.stdout.write("ready\n");
  });
  let stopping = false;
  const stop = () => {
    if (stopping) return;
    stopping = true;
    fuse.unmount(() => {
      fs.closeSync(fd);
      process.exit(0);
    });
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main();
