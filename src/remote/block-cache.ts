import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as zlib from "node:zlib";
import { log } from "../util/log";
import type { ObjectIdentity } from "./source";

/**
 * The persistent block cache shared by every overlay (and every daemon) on the
 * host. Layout, under the cache root:
 *
 *   v3/<k[0..2]>/<k>/object.json      what the entry is (source, identity, block size), for people
 *   v3/<k[0..2]>/<k>/<index>.blk      one block of the object, possibly in part
 *   v3/sha256/<d[0..2]>/<d>.blk       a block of a base with a manifest, named by its SHA-256
 *                                     (digest-store.ts), whichever bases and versions hold it
 *
 * k = sha256(the source's cache key (URL; for S3 the endpoint it reached,
 * bucket and key), size, ETag, Last-Modified, block size): a changed object or
 * another server gets another key, so its blocks are never read for this one.
 *
 * A block file holds what was fetched of its block, 4 KiB chunk by chunk: a
 * header page (magic, key, index, length, and per chunk an 8-byte entry: the
 * CRC-32 of the chunk and a present mark) then the block's bytes at their own
 * offsets, a sparse file where nothing was fetched. A file is made with its
 * header whole (written aside, then linked into place); storing chunks writes
 * their bytes first and their entries after, so a reader sees a chunk only
 * once its bytes are there. Every read checks the CRC of each chunk it
 * touches: a chunk torn by a crash or power loss (files are not fsynced) or
 * damaged later is a miss, its entry is cleared and it is fetched again.
 * Several processes may fill one file at once: they write the same bytes.
 * Eviction deletes whole block files, least recently used first (mtime,
 * refreshed on use), counting the space they really take; any process may
 * evict, a file vanishing under a reader is a miss.
 */
const MAGIC = Buffer.from("ACOWBLK3");
const FIXED = 32;
/** Checksum and presence granularity. */
export const CHUNK = 4096;
/** A chunk's entry: its CRC-32, then PRESENT once its bytes are stored. */
export const ENTRY = 8;
/** The second half of a chunk's entry once its bytes are stored ("CHNK"). */
export const PRESENT = 0x4b4e4843;
/** Block files kept open per object, with their checked headers. */
const OPEN_FILES = 256;
/** Kept block files are checked this often for having been deleted (evicted) by another process. */
const SWEEP_MS = 1000;
/** Hits refresh a block's mtime (its age for eviction) at most this often. */
const TOUCH_AFTER_MS = 60_000;
/** Temp files older than this are leftovers of a killed writer. */
const STALE_TMP_MS = 10 * 60_000;
export const DEFAULT_CACHE_BYTES = 8 * 2 ** 30;
export const LAYOUT = "v3";

/** The header page: the fixed part and the chunk entries, rounded up to 4 KiB. */
export function headerSize(length: number): number {
  return Math.ceil((FIXED + ENTRY * Math.ceil(length / CHUNK)) / 4096) * 4096;
}

export function defaultCacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (process.getuid?.() === 0) return "/var/cache/addcow";
  return path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache"), "addcow");
}

export interface CacheStats {
  hits: number;
  misses: number;
  /** Ranges stored, and ranges that could not be (a full or read-only cache disk). */
  stored: number;
  storeFailures: number;
  /** Chunks found damaged (and cleared). */
  corrupt: number;
  evicted: number;
}

/**
 * What a remote device needs of its persistent cache, addressed by byte
 * offsets of the object: this file's per-object entries, or a base's view of
 * the blocks stored by digest (digest-store.ts).
 */
export interface ObjectCache {
  /** Where it lives, for info. */
  readonly dir: string;
  readonly stats: CacheStats;
  /** Fills target from `offset` when every byte is cached and checks; false on a miss. */
  read(offset: number, target: Buffer): boolean;
  /** Every byte of the range is cached (not checked: for readahead decisions). */
  has(offset: number, length: number): boolean;
  /** Stores bytes of the object (best effort: a cache that cannot store says so once). */
  put(offset: number, data: Buffer): void;
  close(): void;
  /** Files holding some of the object, and the object's bytes they hold (for info: reads them all). */
  usage(): { blocks: number; bytes: number };
}

export function emptyStats(): CacheStats {
  return { hits: 0, misses: 0, stored: 0, storeFailures: 0, corrupt: 0, evicted: 0 };
}

export function preadFull(fd: number, buf: Buffer, pos: number): number {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, pos + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** Writes all of buf or throws: a write that stops short (a full disk) is an error. */
export function pwriteFull(fd: number, buf: Buffer, pos: number): void {
  let done = 0;
  while (done < buf.length) {
    const n = fs.writeSync(fd, buf, done, buf.length - done, pos + done);
    if (n <= 0) {
      throw Object.assign(new Error(`short write (${done} of ${buf.length} bytes)`), {
        code: "ENOSPC",
      });
    }
    done += n;
  }
}

/** A block file kept open: its descriptor and its header as last read or written. */
interface OpenBlock {
  fd: number;
  writable: boolean;
  ino: number;
  header: Buffer;
  /** Made by this process and nothing stored in it yet: a failed store deletes it. */
  fresh: boolean;
  /** When its mtime (its age for eviction) was last known fresh. */
  touchedAt: number;
}

/** One object's blocks in a {@link CacheRoot}, addressed by byte offsets of the object. */
export class BlockCache implements ObjectCache {
  readonly stats: CacheStats = emptyStats();
  private readonly keyBytes: Buffer;
  /** Open block files, least recently used first. */
  private readonly open: OpenFiles<number, OpenBlock>;
  private readonly failures: StoreFailures;

  constructor(
    private readonly root: CacheRoot,
    readonly dir: string,
    key: string,
    readonly size: number,
    readonly blockSize: number,
    /** Where the one line per object about a cache that cannot store goes. */
    warn: (message: string) => void = () => undefined,
  ) {
    this.keyBytes = Buffer.from(key.slice(0, 32), "hex");
    this.open = new OpenFiles(root);
    this.failures = new StoreFailures(root.dir, warn);
  }

  private file(index: number): string {
    return path.join(this.dir, `${index}.blk`);
  }

  private blockLength(index: number): number {
    return Math.min(this.blockSize, this.size - index * this.blockSize);
  }

  /** Calls fn for each block's part of [offset, offset + length); stops when fn says false. */
  private eachBlock(
    offset: number,
    length: number,
    fn: (index: number, at: number, from: number, to: number) => boolean,
  ): boolean {
    const end = offset + length;
    for (let b = Math.floor(offset / this.blockSize); b * this.blockSize < end; b++) {
      const start = b * this.blockSize;
      const from = Math.max(offset, start);
      const to = Math.min(end, start + this.blockLength(b));
      if (!fn(b, from - start, from - offset, to - offset)) return false;
    }
    return true;
  }

  /**
   * Fills target with the object's bytes from `offset` when every chunk they
   * touch is cached and checks; false on a miss (target may be partly written).
   */
  read(offset: number, target: Buffer): boolean {
    this.open.sweep();
    const ok = this.eachBlock(offset, target.length, (b, at, from, to) =>
      this.readBlock(b, at, target.subarray(from, to)),
    );
    if (ok) this.stats.hits++;
    else this.stats.misses++;
    return ok;
  }

  /** Every chunk of [offset, offset + length) is cached (not checked: for readahead decisions). */
  has(offset: number, length: number): boolean {
    return this.eachBlock(offset, length, (b, at, from, to) => {
      const block = this.openBlock(b, false);
      return typeof block === "object" && block !== null && this.present(block, at, to - from);
    });
  }

  /**
   * Stores the object's bytes from `offset` (a multiple of 4 KiB; the data
   * ends on a chunk boundary or at the end of the object). Best effort: a
   * cache that cannot store (full, read-only) costs refetches, says so once,
   * and leaves no chunk that is not whole.
   */
  put(offset: number, data: Buffer): void {
    this.eachBlock(offset, data.length, (b, at, from, to) =>
      this.putBlock(b, at, data.subarray(from, to)),
    );
  }

  private readBlock(index: number, at: number, target: Buffer): boolean {
    const block = this.openBlock(index, false);
    if (block === null) return false;
    if (block === "damaged") {
      this.dropFile(index);
      return false;
    }
    const length = this.blockLength(index);
    if (!this.present(block, at, target.length)) return false;
    const hsize = headerSize(length);
    const end = at + target.length;
    const c0 = Math.floor(at / CHUNK);
    const c1 = Math.ceil(end / CHUNK);
    // Whole chunks (the usual 4 KiB-aligned read) go straight into target.
    const whole = at % CHUNK === 0 && (end % CHUNK === 0 || end === length);
    const start = c0 * CHUNK;
    const span = whole ? target : Buffer.allocUnsafe(Math.min(c1 * CHUNK, length) - start);
    if (preadFull(block.fd, span, hsize + start) !== span.length) {
      this.damaged(index, block, c0, c1);
      return false;
    }
    for (let c = c0; c < c1; c++) {
      const chunk = span.subarray((c - c0) * CHUNK, (c - c0 + 1) * CHUNK);
      if (zlib.crc32(chunk) !== block.header.readUInt32LE(FIXED + ENTRY * c)) {
        this.damaged(index, block, c, c + 1);
        return false;
      }
    }
    if (!whole) span.copy(target, 0, at - start, at - start + target.length);
    this.touch(block);
    return true;
  }

  /**
   * Chunks covering [at, at + length) of the block are marked present; the
   * entries of any that were not are read again first (another process may
   * have stored them since).
   */
  private present(block: OpenBlock, at: number, length: number): boolean {
    const c0 = Math.floor(at / CHUNK);
    const c1 = Math.ceil((at + length) / CHUNK);
    const marked = () => {
      for (let c = c0; c < c1; c++) {
        if (block.header.readUInt32LE(FIXED + ENTRY * c + 4) !== PRESENT) return false;
      }
      return true;
    };
    if (marked()) return true;
    const entries = block.header.subarray(FIXED + ENTRY * c0, FIXED + ENTRY * c1);
    const fresh = Buffer.allocUnsafe(entries.length);
    if (preadFull(block.fd, fresh, FIXED + ENTRY * c0) === fresh.length) fresh.copy(entries);
    return marked();
  }

  /** Chunks [c0, c1) do not check: their entries are cleared, to be fetched again. */
  private damaged(index: number, block: OpenBlock, c0: number, c1: number): void {
    this.stats.corrupt += c1 - c0;
    log.remote("cache: %s has a damaged chunk; fetching it again", this.file(index));
    const zeros = Buffer.alloc(ENTRY * (c1 - c0));
    zeros.copy(block.header, FIXED + ENTRY * c0);
    if (!block.writable) return;
    try {
      pwriteFull(block.fd, zeros, FIXED + ENTRY * c0);
    } catch {
      // Still a miss for this process; another will find the chunk bad too.
    }
  }

  private putBlock(index: number, at: number, data: Buffer): boolean {
    let block = this.openBlock(index, true);
    if (block === "damaged") {
      this.dropFile(index);
      block = this.openBlock(index, true);
    }
    if (block === null || block === "damaged" || !block.writable) return true;
    const length = this.blockLength(index);
    const c0 = at / CHUNK;
    const c1 = Math.ceil((at + data.length) / CHUNK);
    const entries = Buffer.allocUnsafe(ENTRY * (c1 - c0));
    for (let c = c0; c < c1; c++) {
      const chunk = data.subarray((c - c0) * CHUNK, (c - c0 + 1) * CHUNK);
      entries.writeUInt32LE(zlib.crc32(chunk), ENTRY * (c - c0));
      entries.writeUInt32LE(PRESENT, ENTRY * (c - c0) + 4);
    }
    try {
      // Bytes first, then the entries that say they are there.
      pwriteFull(block.fd, data, headerSize(length) + at);
      pwriteFull(block.fd, entries, FIXED + ENTRY * c0);
    } catch (err) {
      this.cannotStore(err);
      // A file this store made holds nothing whole: it goes (no file is left by a failed store).
      if (block.fresh) this.dropFile(index, false);
      return false;
    }
    block.fresh = false;
    entries.copy(block.header, FIXED + ENTRY * c0);
    this.stats.stored++;
    this.root.added(data.length, this.stats);
    return true;
  }

  private cannotStore(err: unknown): void {
    this.failures.note(this.stats, this.dir, err);
  }

  /**
   * The open block file with its header read and checked once. null: not
   * cached (and not made: create is false, or it cannot be made); "damaged":
   * a header that is not this block's.
   */
  private openBlock(index: number, create: boolean): OpenBlock | "damaged" | null {
    const kept = this.open.get(index);
    if (kept !== undefined && (!create || this.stillNamed(index, kept))) return kept;
    if (kept !== undefined) this.open.forget(index);
    const file = this.file(index);
    let fd: number;
    let writable = true;
    try {
      fd = fs.openSync(file, "r+");
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") {
        if (!create) return null;
        const made = this.make(index);
        if (made === null) return null;
        const block = this.openBlock(index, false);
        if (typeof block === "object" && block !== null) block.fresh = made;
        return block;
      }
      try {
        fd = fs.openSync(file, "r");
        writable = false;
      } catch {
        return null;
      }
    }
    const length = this.blockLength(index);
    const header = Buffer.alloc(headerSize(length));
    const ino = fs.fstatSync(fd).ino;
    const block: OpenBlock = { fd, writable, ino, header, fresh: false, touchedAt: 0 };
    this.open.keep(index, block);
    const good =
      preadFull(fd, header, 0) === header.length &&
      header.subarray(0, 8).equals(MAGIC) &&
      header.subarray(8, 24).equals(this.keyBytes) &&
      header.readUInt32LE(24) === index &&
      header.readUInt32LE(28) === length;
    return good ? block : "damaged";
  }

  /** The kept descriptor is still the file under the block's name (not evicted or replaced). */
  private stillNamed(index: number, block: OpenBlock): boolean {
    try {
      return fs.statSync(this.file(index)).ino === block.ino;
    } catch {
      return false;
    }
  }

  /**
   * Makes an empty block file, its header whole: written aside, then linked
   * into place. True: made here; false: another process made it first; null:
   * it cannot be made.
   */
  private make(index: number): boolean | null {
    const length = this.blockLength(index);
    const header = Buffer.alloc(headerSize(length));
    MAGIC.copy(header, 0);
    this.keyBytes.copy(header, 8);
    header.writeUInt32LE(index, 24);
    header.writeUInt32LE(length, 28);
    const file = this.file(index);
    const tmp = `${file}.${process.pid}.${crypto.randomBytes(4).toString("hex")}.tmp`;
    try {
      const fd = fs.openSync(tmp, "wx", 0o600);
      try {
        pwriteFull(fd, header, 0);
      } finally {
        fs.closeSync(fd);
      }
      try {
        fs.linkSync(tmp, file);
        return true;
      } catch (err) {
        // Another process made it first: the same header.
        if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
        return false;
      }
    } catch (err) {
      this.cannotStore(err);
      return null;
    } finally {
      fs.rmSync(tmp, { force: true });
    }
  }

  /** Deletes a block file (if it is still the one opened): damaged, or left empty by a failed store. */
  private dropFile(index: number, damaged = true): void {
    const block = this.open.get(index);
    if (damaged) log.remote("cache: %s is damaged; fetching the block again", this.file(index));
    if (block !== undefined && this.stillNamed(index, block)) {
      fs.rmSync(this.file(index), { force: true });
    }
    this.open.forget(index);
  }

  /** Closes the block files kept open. */
  close(): void {
    this.open.closeAll();
  }

  usage(): { blocks: number; bytes: number } {
    return { blocks: this.countBlocks(), bytes: this.cachedBytes() };
  }

  /** Block files of this object on disk now, whole or in part (for info). */
  countBlocks(): number {
    return readdir(this.dir).filter((n) => n.endsWith(".blk")).length;
  }

  /** Bytes of the object cached now (for info): the chunks marked present in every block file. */
  cachedBytes(): number {
    let total = 0;
    for (const name of readdir(this.dir)) {
      const m = /^(\d+)\.blk$/.exec(name);
      if (!m) continue;
      const index = Number(m[1]);
      const length = this.blockLength(index);
      if (!(length > 0)) continue;
      let header: Buffer;
      try {
        const fd = fs.openSync(path.join(this.dir, name), "r");
        try {
          header = Buffer.alloc(headerSize(length));
          preadFull(fd, header, 0);
        } finally {
          fs.closeSync(fd);
        }
      } catch {
        continue;
      }
      if (!header.subarray(0, 8).equals(MAGIC)) continue;
      for (let c = 0; c * CHUNK < length; c++) {
        if (header.readUInt32LE(FIXED + ENTRY * c + 4) === PRESENT) {
          total += Math.min(CHUNK, length - c * CHUNK);
        }
      }
    }
    return total;
  }

  private touch(block: OpenBlock): void {
    touchFile(block);
  }
}

/**
 * Files kept open by key with what was read of them, least recently used
 * first and at most OPEN_FILES of them; a file dropped is closed.
 */
export class OpenFiles<K, F extends { fd: number }> {
  private readonly files = new Map<K, F>();
  private sweptAt = 0;
  private sweptEvictions = 0;

  constructor(private readonly root: CacheRoot) {}

  /** The kept file of `key`, now the most recently used. */
  get(key: K): F | undefined {
    const f = this.files.get(key);
    if (f !== undefined) {
      this.files.delete(key);
      this.files.set(key, f);
    }
    return f;
  }

  has(key: K): boolean {
    return this.files.has(key);
  }

  keep(key: K, f: F): void {
    this.files.set(key, f);
    if (this.files.size > OPEN_FILES) this.forget(this.files.keys().next().value as K);
  }

  forget(key: K): void {
    const f = this.files.get(key);
    if (f === undefined) return;
    this.files.delete(key);
    fs.closeSync(f.fd);
  }

  closeAll(): void {
    for (const key of [...this.files.keys()]) this.forget(key);
  }

  /**
   * Closes kept files whose name was deleted (evicted, by this process or
   * another): their space comes free, and their bytes are not served as
   * cached any more. At most once a second, unless this process evicted since.
   */
  sweep(): void {
    const now = Date.now();
    if (now - this.sweptAt < SWEEP_MS && this.root.evictions === this.sweptEvictions) return;
    this.sweptAt = now;
    this.sweptEvictions = this.root.evictions;
    for (const [key, f] of [...this.files]) {
      try {
        if (fs.fstatSync(f.fd).nlink > 0) continue;
      } catch {
        // Unusable descriptor: forget it too.
      }
      this.forget(key);
    }
  }
}

/** Stores that failed: counted, traced, and said in one line once per object (per mount). */
export class StoreFailures {
  private warned = false;

  constructor(
    private readonly rootDir: string,
    private readonly warn: (message: string) => void,
  ) {}

  note(stats: CacheStats, dir: string, err: unknown): void {
    stats.storeFailures++;
    const e = err as NodeJS.ErrnoException;
    log.remote("cache %s: cannot store: %s", dir, e.message);
    if (this.warned) return;
    this.warned = true;
    const why = e.code === "ENOSPC" ? "the file system is full" : (e.code ?? e.message);
    this.warn(
      `block cache ${this.rootDir} cannot store fetched blocks (${why}): reads go to the server instead; free space there or set ADDCOW_CACHE_SIZE below its free space (said once per mount)`,
    );
  }
}

/** Refreshes an open file's mtime (its age for eviction) at most once a minute. */
export function touchFile(file: { fd: number; touchedAt: number }): void {
  const now = Date.now();
  if (now - file.touchedAt < TOUCH_AFTER_MS) return;
  file.touchedAt = now;
  try {
    if (now - fs.fstatSync(file.fd).mtimeMs > TOUCH_AFTER_MS) {
      const date = new Date(now);
      fs.futimesSync(file.fd, date, date);
    }
  } catch {
    // Read-only cache: ages stay as they are.
  }
}

/** A cache directory with a size limit, shared by all objects and processes. */
export class CacheRoot {
  private approxBytes: number | null = null;
  private evicting = false;
  /** Evictions run by this process (its caches then look for deleted files at once). */
  evictions = 0;

  constructor(
    readonly dir: string,
    readonly limitBytes: number = DEFAULT_CACHE_BYTES,
  ) {}

  /**
   * The cache of one object version from one source; creates its directory.
   * `source` names everything besides the identity that decides the bytes
   * (see RangeSource.cacheKey).
   */
  open(
    source: string,
    identity: ObjectIdentity,
    blockSize: number,
    warn?: (message: string) => void,
  ): BlockCache {
    const key = crypto
      .createHash("sha256")
      .update(
        JSON.stringify([
          LAYOUT,
          source,
          identity.size,
          identity.etag,
          identity.lastModified,
          blockSize,
        ]),
      )
      .digest("hex");
    const dir = path.join(this.dir, LAYOUT, key.slice(0, 2), key);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const about = path.join(dir, "object.json");
    if (!fs.existsSync(about)) {
      const tmp = `${about}.${process.pid}.tmp`;
      try {
        fs.writeFileSync(tmp, JSON.stringify({ source, ...identity, blockSize }) + "\n");
        fs.renameSync(tmp, about);
      } catch {
        // Only for people; a full disk must not stop the cache from being read.
        fs.rmSync(tmp, { force: true });
      }
    }
    return new BlockCache(this, dir, key, identity.size, blockSize, warn);
  }

  /** Called after bytes were stored; evicts when the total passes the limit. */
  added(bytes: number, stats: CacheStats): void {
    if (this.approxBytes === null) this.approxBytes = this.scan().reduce((s, f) => s + f.size, 0);
    else this.approxBytes += bytes;
    if (this.approxBytes > this.limitBytes && !this.evicting) {
      this.evicting = true;
      try {
        stats.evicted += this.evict();
      } finally {
        this.evicting = false;
      }
    }
  }

  /** Deletes the least recently used block files until the cache is at 90% of its limit. */
  evict(): number {
    const files = this.scan().sort((a, b) => a.mtimeMs - b.mtimeMs);
    let total = files.reduce((s, f) => s + f.size, 0);
    const target = Math.floor(this.limitBytes * 0.9);
    let removed = 0;
    for (const f of files) {
      if (total <= target) break;
      fs.rmSync(f.path, { force: true });
      total -= f.size;
      removed++;
    }
    this.approxBytes = total;
    this.evictions++;
    log.remote("cache %s: evicted %d blocks, %d bytes left", this.dir, removed, total);
    return removed;
  }

  /**
   * Every block file with the space it takes (sparse: its allocated blocks),
   * stale temp files deleted. Entries by digest (v3/sha256/DD/) are at the
   * same depth and are counted and evicted with the others.
   */
  private scan(): Array<{ path: string; size: number; mtimeMs: number }> {
    const out: Array<{ path: string; size: number; mtimeMs: number }> = [];
    const base = path.join(this.dir, LAYOUT);
    const now = Date.now();
    for (const shard of readdir(base)) {
      for (const entry of readdir(path.join(base, shard))) {
        const dir = path.join(base, shard, entry);
        for (const name of readdir(dir)) {
          const p = path.join(dir, name);
          let st: fs.Stats;
          try {
            st = fs.statSync(p);
          } catch {
            continue;
          }
          if (name.endsWith(".tmp")) {
            if (now - st.mtimeMs > STALE_TMP_MS) fs.rmSync(p, { force: true });
          } else if (name.endsWith(".blk")) {
            out.push({ path: p, size: st.blocks * 512, mtimeMs: st.mtimeMs });
          }
        }
      }
    }
    return out;
  }
}

export function readdir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}
