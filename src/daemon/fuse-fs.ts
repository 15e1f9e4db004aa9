import * as fs from "node:fs";
import * as path from "node:path";
import Fuse = require("fuse-native");
import { log } from "../util/log";
import type { DiskEntry } from "./disk-entry";
import { errno, errnoOf } from "./errno";
import type { MountOptions } from "./mount-options";

type ResultCb = (result: number, ...rest: unknown[]) => void;

const ENOENT = errno("ENOENT");
const EIO = errno("EIO");
const EPERM = errno("EPERM");
const EROFS = errno("EROFS");
const ENOSPC = errno("ENOSPC");
const ENOTDIR = errno("ENOTDIR");
const EISDIR = errno("EISDIR");

const O_ACCMODE = 3;
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;

/**
 * Largest request the kernel sends: libfuse 2 cannot raise the kernel's
 * 32-page limit, so 128 KiB is as large as writes and reads get.
 */
export const MAX_REQUEST_BYTES = 128 * 1024;

/** Preferred I/O size reported in st_blksize. */
const BLOCK_SIZE = 4096;

/**
 * libfuse options. fuse-native only passes a fixed list of options, so
 * AddCowFuse builds the string itself: big_writes and a large max_write so
 * sequential writes are not cut into 4 KiB pieces; atomic_o_trunc so O_TRUNC
 * reaches open() (where it is ignored, as on a block device) instead of
 * becoming a truncate to 0; default_permissions so the kernel enforces the
 * file modes (uid=, gid=, umask=) for other users.
 */
export function libfuseOptions(opts: MountOptions, fsname = "addcow"): string[] {
  const list = [
    `fsname=${escapeOptionValue(opts.fsname ?? fsname)}`,
    "subtype=addcow",
    "default_permissions",
    "big_writes",
    `max_write=${MAX_REQUEST_BYTES}`,
    `max_read=${MAX_REQUEST_BYTES}`,
    `max_readahead=${MAX_REQUEST_BYTES}`,
    "atomic_o_trunc",
  ];
  if (opts.readOnly) list.push("ro");
  if (opts.allowOther) list.push("allow_other");
  if (opts.autoUnmount) list.push("auto_unmount");
  return list;
}

/** libfuse splits -o at commas; a backslash makes the next character literal. */
export function escapeOptionValue(value: string): string {
  return value.replace(/[\\,]/g, (ch) => `\\${ch}`);
}

class AddCowFuse extends Fuse {
  constructor(
    mnt: string,
    ops: Record<string, unknown>,
    private readonly optionList: string[],
  ) {
    // timeout false: fuse-native would otherwise answer ETIMEDOUT after 15 s while the I/O still runs.
    super(mnt, ops, { timeout: false });
  }

  override _fuseOptions(): string {
    return "-o" + this.optionList.join(",");
  }
}

export interface FuseFrontEnd {
  /** Mounts; resolves once the kernel has sent INIT (the file can be used). */
  mount(): Promise<void>;
  /**
   * Files open through the mount (open minus release). After a lazy unmount
   * (`fusermount -uz`, `umount -l`) the kernel keeps sending their requests;
   * the daemon serves them until the last one is released.
   */
  openFiles(): number;
  /**
   * The mount's connection to the kernel is still open (its /dev/fuse
   * descriptor): after a lazy unmount the kernel may end it without sending
   * the last release, and the daemon then stops serving this mount.
   */
  connectionOpen(): boolean;
}

/** The /dev/fuse descriptors this process holds now. */
function fuseDescriptors(): Set<number> | null {
  let fds: string[];
  try {
    fds = fs.readdirSync("/proc/self/fd");
  } catch {
    return null;
  }
  const out = new Set<number>();
  for (const fd of fds) {
    try {
      if (fs.readlinkSync(`/proc/self/fd/${fd}`) === "/dev/fuse") out.add(Number(fd));
    } catch {
      // Closed meanwhile.
    }
  }
  return out;
}

/**
 * Which mount holds each /dev/fuse descriptor of this process. A process may
 * serve many mounts (a host daemon): mounts are made one at a time, so the
 * one descriptor that appears during a mount is that mount's, and a number
 * that comes back for a newer mount means the older one's connection closed.
 */
const descriptorOwner = new Map<number, object>();
let mountQueue: Promise<unknown> = Promise.resolve();

/**
 * The FUSE front end: a directory holding one regular file per disk, whose
 * bytes are the disk. Reads at the end are short; writes past the end fail
 * with ENOSPC like on a block device; size changes are refused with EPERM.
 */
export function createFuseFrontEnd(
  mountDir: string,
  entries: DiskEntry[],
  opts: MountOptions,
): FuseFrontEnd {
  const byPath = new Map<string, DiskEntry>();
  for (const e of entries) byPath.set("/" + e.name, e);
  const uid = opts.uid ?? process.getuid?.() ?? 0;
  const gid = opts.gid ?? process.getgid?.() ?? 0;
  const writeBits = opts.readOnly ? 0o222 : 0;
  // Owner only unless umask= says otherwise: a disk holds someone's data, like a block
  // device; allow_other only lets the kernel ask, the mode still decides.
  const fileMode =
    S_IFREG | ((opts.umask === undefined ? 0o600 : 0o666 & ~opts.umask) & ~writeBits);
  const dirMode = S_IFDIR | (opts.umask === undefined ? 0o700 : 0o777 & ~opts.umask);
  const mountTime = new Date();
  let openFiles = 0;

  const dirStat = {
    mode: dirMode,
    uid,
    gid,
    size: 4096,
    nlink: 2,
    blksize: BLOCK_SIZE,
    blocks: 0,
    atime: mountTime,
    mtime: mountTime,
    ctime: mountTime,
  };

  function fileStat(e: DiskEntry) {
    const img = e.storageStat();
    return {
      mode: fileMode,
      uid,
      gid,
      size: e.target.size,
      nlink: 1,
      blksize: BLOCK_SIZE,
      // The image file's allocation: the data this disk holds itself.
      blocks: img ? Number(img.blocks) : 0,
      atime: img ? img.atime : mountTime,
      mtime: img ? img.mtime : mountTime,
      ctime: img ? img.ctime : mountTime,
    };
  }

  function doRead(e: DiskEntry, buf: Buffer, n: number, pos: number, cb: ResultCb): void {
    if (e.closed) {
      e.leave();
      cb(EIO);
      return;
    }
    const target = n === buf.length ? buf : buf.subarray(0, n);
    e.target.read(target, pos).then(
      () => {
        e.leave();
        cb(n);
      },
      (err: unknown) => {
        e.leave();
        cb(errnoOf(err, `read ${e.name} [${pos}, +${n})`));
      },
    );
  }

  function doWrite(e: DiskEntry, buf: Buffer, n: number, pos: number, cb: ResultCb): void {
    if (e.closed) {
      e.leave();
      cb(EIO);
      return;
    }
    const source = n === buf.length ? buf : buf.subarray(0, n);
    e.dirty = true;
    // The engine is done with the buffer once its promise settles; only then may the kernel reuse it.
    e.target.write(source, pos).then(
      () => {
        e.leave();
        cb(n);
      },
      (err: unknown) => {
        e.leave();
        e.noteError(err);
        cb(errnoOf(err, `write ${e.name} [${pos}, +${n})`));
      },
    );
  }

  function flushEntry(e: DiskEntry, what: string, cb: ResultCb): void {
    if (e.target.readOnly) {
      cb(0);
      return;
    }
    e.flush().then(
      () => cb(0),
      (err: unknown) => cb(errnoOf(err, `${what} ${e.name}`)),
    );
  }

  function refuseSize(p: string, size: number, cb: ResultCb): void {
    const e = byPath.get(p);
    if (!e) return cb(p === "/" ? EISDIR : ENOENT);
    if (opts.readOnly) return cb(EROFS);
    // The disk never changes size; truncating to its own size is harmless.
    if (size === e.target.size) return cb(0);
    log.fuse(
      "truncate %s to %d refused: the disk size is fixed at %d",
      e.name,
      size,
      e.target.size,
    );
    cb(EPERM);
  }

  const ops = {
    init(cb: ResultCb) {
      cb(0);
    },

    getattr(p: string, cb: ResultCb) {
      if (p === "/") return cb(0, dirStat);
      const e = byPath.get(p);
      if (!e) return cb(ENOENT);
      cb(0, fileStat(e));
    },

    readdir(p: string, cb: ResultCb) {
      if (p !== "/") return cb(byPath.has(p) ? ENOTDIR : ENOENT);
      cb(
        0,
        entries.map((e) => e.name),
      );
    },

    open(p: string, flags: number, cb: ResultCb) {
      const e = byPath.get(p);
      if (!e) return cb(p === "/" ? EISDIR : ENOENT);
      const wantsWrite = (flags & O_ACCMODE) !== fs.constants.O_RDONLY;
      log.fuse("open %s flags 0x%s", e.name, flags.toString(16));
      if (wantsWrite && e.target.readOnly) return cb(EROFS);
      // O_TRUNC is ignored, as on a block device (atomic_o_trunc delivers it here).
      openFiles++;
      cb(0, 0);
    },

    release(p: string, _fd: number, cb: ResultCb) {
      if (byPath.has(p)) openFiles--;
      log.fuse("release %s (%d open)", p, openFiles);
      cb(0);
    },

    read(p: string, _fd: number, buf: Buffer, len: number, pos: number, cb: ResultCb) {
      const e = byPath.get(p);
      if (!e) return cb(ENOENT);
      const size = e.target.size;
      log.fuse("read %s [%d, +%d)", e.name, pos, len);
      if (pos >= size || len === 0) return cb(0);
      const n = Math.min(len, size - pos);
      const wait = e.enter();
      if (wait === null) doRead(e, buf, n, pos, cb);
      else wait.then(() => doRead(e, buf, n, pos, cb));
    },

    write(p: string, _fd: number, buf: Buffer, len: number, pos: number, cb: ResultCb) {
      const e = byPath.get(p);
      if (!e) return cb(ENOENT);
      const size = e.target.size;
      log.fuse("write %s [%d, +%d)", e.name, pos, len);
      if (e.target.readOnly) return cb(EROFS);
      if (len === 0) return cb(0);
      // Like a block device: a write straddling the end is short, one at or past the end fails.
      if (pos >= size) return cb(ENOSPC);
      const n = Math.min(len, size - pos);
      const wait = e.enter();
      if (wait === null) doWrite(e, buf, n, pos, cb);
      else wait.then(() => doWrite(e, buf, n, pos, cb));
    },

    flush(p: string, _fd: number, cb: ResultCb) {
      const e = byPath.get(p);
      if (!e) return cb(0);
      log.fuse("flush %s", e.name);
      flushEntry(e, "flush", cb);
    },

    fsync(p: string, datasync: number, _fd: number, cb: ResultCb) {
      const e = byPath.get(p);
      if (!e) return cb(0);
      log.fuse("fsync %s (datasync %d)", e.name, datasync);
      flushEntry(e, "fsync", cb);
    },

    truncate(p: string, size: number, cb: ResultCb) {
      refuseSize(p, size, cb);
    },

    ftruncate(p: string, _fd: number, size: number, cb: ResultCb) {
      refuseSize(p, size, cb);
    },

    utimens(p: string, _atime: number, _mtime: number, cb: ResultCb) {
      // touch(1) works; the times shown are the image file's.
      cb(byPath.has(p) || p === "/" ? 0 : ENOENT);
    },

    statfs(_p: string, cb: ResultCb) {
      let total = 0;
      // Used: what the image files hold (their allocation); never more than the disks.
      let used = 0;
      for (const e of entries) {
        total += Math.ceil(e.target.size / BLOCK_SIZE);
        used += Math.ceil((Number(e.storageStat()?.blocks ?? 0) * 512) / BLOCK_SIZE);
      }
      used = Math.min(used, total);
      let free = 0;
      let avail = 0;
      const first = entries[0];
      const imagePath = first?.target.describe().storage;
      if (imagePath && path.isAbsolute(imagePath)) {
        try {
          // Free space where the image file grows.
          const st = fs.statfsSync(path.dirname(imagePath));
          free = Math.floor((st.bfree * st.bsize) / BLOCK_SIZE);
          avail = Math.floor((st.bavail * st.bsize) / BLOCK_SIZE);
        } catch {
          // Unknown: report none.
        }
      }
      cb(0, {
        bsize: BLOCK_SIZE,
        frsize: BLOCK_SIZE,
        blocks: total,
        // Free: what writes can still use, bounded by the room left on the host and in the disks.
        bfree: Math.min(free, total - used, 0xffffffff),
        bavail: Math.min(avail, total - used, 0xffffffff),
        files: entries.length + 1,
        ffree: 0,
        favail: 0,
        fsid: 0,
        flag: 0,
        namemax: 255,
      });
    },

    // The directory's contents are fixed.
    create(_p: string, _mode: number, cb: ResultCb) {
      cb(EPERM);
    },
    mknod(_p: string, _mode: number, _dev: number, cb: ResultCb) {
      cb(EPERM);
    },
    unlink(_p: string, cb: ResultCb) {
      cb(EPERM);
    },
    mkdir(_p: string, _mode: number, cb: ResultCb) {
      cb(EPERM);
    },
    rmdir(_p: string, cb: ResultCb) {
      cb(EPERM);
    },
    rename(_p: string, _dest: string, cb: ResultCb) {
      cb(EPERM);
    },
    chmod(_p: string, _mode: number, cb: ResultCb) {
      cb(EPERM);
    },
    chown(_p: string, _uid: number, _gid: number, cb: ResultCb) {
      cb(EPERM);
    },
  };

  // The source /proc/mounts, findmnt and df show: the .add-cow file (the first one).
  const fuse = new AddCowFuse(mountDir, ops, libfuseOptions(opts, entries[0]?.file));
  const token = {};
  let ownFd: number | null = null;
  const mountNow = async () => {
    const before = fuseDescriptors();
    await new Promise<void>((resolve, reject) => {
      fuse.mount((err) => (err ? reject(err) : resolve()));
    });
    const after = fuseDescriptors();
    const fresh = before && after ? [...after].filter((fd) => !before.has(fd)) : [];
    if (fresh.length === 1) {
      ownFd = fresh[0]!;
      descriptorOwner.set(ownFd, token);
    }
    log.fuse("mounted %s (connection fd %s)", mountDir, ownFd ?? "unknown");
  };
  return {
    mount: () => {
      const done = mountQueue.then(mountNow);
      mountQueue = done.catch(() => undefined);
      return done;
    },
    openFiles: () => openFiles,
    connectionOpen: () => {
      if (ownFd === null) return (fuseDescriptors()?.size ?? 1) > 0;
      if (descriptorOwner.get(ownFd) !== token) return false;
      try {
        return fs.readlinkSync(`/proc/self/fd/${ownFd}`) === "/dev/fuse";
      } catch {
        return false;
      }
    },
  };
}
