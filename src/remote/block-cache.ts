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
 *   v2/<k[0..2]>/<k>/object.json      what the entry is (URL, identity, block size), for people
 *   v2/<k[0..2]>/<k>/<index>.blk      one block: header + the block's bytes
 *
 * k = sha256(URL without credentials, size, ETag, Last-Modified, block size):
 * a changed object gets a new key, so its old blocks are never read again (they
 * age out). The header holds a magic, the key, the index, the length and a
 * CRC-32 per 4 KiB chunk of the bytes. A block is written to a unique temp
 * name and renamed into place, so readers see a whole file or none; every read
 * checks the header and the CRCs of the chunks it touches, so a file torn by a
 * crash or power loss (the rename may reach disk before the data: files are not
 * fsynced) or damaged later is detected, deleted and fetched again, and a read
 * of 4 KiB checks 4 KiB, not the whole block. Several processes may fill and
 * read the same entry at once: the last rename wins with identical bytes.
 * Eviction keeps the total under a limit, oldest blocks (by mtime, refreshed on
 * use) first; any process may evict, a block vanishing under a reader is a miss.
 */
const MAGIC = Buffer.from("ACOWBLK2");
const FIXED = 32;
/** Checksum granularity: a 4 KiB read checks 4 KiB (the header grows by 1 KiB per MiB). */
const CHUNK = 4096;
/** Block files kept open per object, with their checked headers (reads skip open/close). */
const OPEN_FILES = 256;
/** Hits refresh a block's mtime (its age for eviction) at most this often. */
const TOUCH_AFTER_MS = 60_000;
/** Temp files older than this are leftovers of a killed writer. */
const STALE_TMP_MS = 10 * 60_000;
export const DEFAULT_CACHE_BYTES = 8 * 2 ** 30;
const LAYOUT = "v2";

function headerSize(length: number): number {
  return FIXED + 4 * Math.ceil(length / CHUNK);
}

export function defaultCacheRoot(env: NodeJS.ProcessEnv = process.env): string {
  if (process.getuid?.() === 0) return "/var/cache/addcow";
  return path.join(env.XDG_CACHE_HOME || path.join(os.homedir(), ".cache"), "addcow");
}

export interface CacheStats {
  hits: number;
  misses: number;
  stored: number;
  corrupt: number;
  evicted: number;
}

function preadFull(fd: number, buf: Buffer, pos: number): number {
  let done = 0;
  while (done < buf.length) {
    const n = fs.readSync(fd, buf, done, buf.length - done, pos + done);
    if (n === 0) break;
    done += n;
  }
  return done;
}

/** A block file kept open: its descriptor and its header, checked once when opened. */
interface OpenBlock {
  fd: number;
  /** The fixed part and every chunk's CRC. */
  header: Buffer;
  /** When its mtime (its age for eviction) was last known fresh. */
  touchedAt: number;
}

/** One object's blocks in a {@link CacheRoot}. */
export class BlockCache {
  readonly stats: CacheStats = { hits: 0, misses: 0, stored: 0, corrupt: 0, evicted: 0 };
  private readonly keyBytes: Buffer;
  /** Open block files, least recently used first. */
  private readonly open = new Map<number, OpenBlock>();

  constructor(
    private readonly root: CacheRoot,
    readonly dir: string,
    key: string,
  ) {
    this.keyBytes = Buffer.from(key.slice(0, 32), "hex");
  }

  private file(index: number): string {
    return path.join(this.dir, `${index}.blk`);
  }

  /** The whole block when a good copy is cached; null otherwise. */
  get(index: number, length: number): Buffer | null {
    const data = Buffer.allocUnsafe(length);
    return this.read(index, length, 0, data) ? data : null;
  }

  /**
   * Fills target with the bytes of block `index` (of `length` bytes) from
   * offset `at`, checking the header and the CRC of every chunk it reads.
   * False on a miss; a damaged or partial file is deleted (a miss too).
   */
  read(index: number, length: number, at: number, target: Buffer): boolean {
    const block = this.openBlock(index, length);
    if (block === null) {
      this.stats.misses++;
      return false;
    }
    if (block !== "damaged" && this.readOpen(block, length, at, target)) {
      this.stats.hits++;
      this.touch(block);
      return true;
    }
    this.forget(index);
    this.stats.corrupt++;
    this.stats.misses++;
    const file = this.file(index);
    log.remote("cache: %s is damaged or partial; fetching the block again", file);
    fs.rmSync(file, { force: true });
    return false;
  }

  /**
   * The open block file, its header read and checked once: a file once written
   * is never changed in place (only replaced whole by rename, or deleted), so a
   * kept descriptor and header stay good even when the name goes away.
   * null: not cached; "damaged": a header that is not this block's.
   */
  private openBlock(index: number, length: number): OpenBlock | "damaged" | null {
    const kept = this.open.get(index);
    if (kept !== undefined) {
      this.open.delete(index);
      this.open.set(index, kept);
      return kept;
    }
    let fd: number;
    try {
      fd = fs.openSync(this.file(index), "r");
    } catch {
      return null;
    }
    const block: OpenBlock = { fd, header: Buffer.allocUnsafe(headerSize(length)), touchedAt: 0 };
    this.open.set(index, block);
    if (this.open.size > OPEN_FILES) this.forget(this.open.keys().next().value as number);
    const h = block.header;
    const good =
      preadFull(fd, h, 0) === h.length &&
      h.subarray(0, 8).equals(MAGIC) &&
      h.subarray(8, 24).equals(this.keyBytes) &&
      h.readUInt32LE(24) === index &&
      h.readUInt32LE(28) === length;
    return good ? block : "damaged";
  }

  private forget(index: number): void {
    const block = this.open.get(index);
    if (block === undefined) return;
    this.open.delete(index);
    fs.closeSync(block.fd);
  }

  /** Closes the block files kept open. */
  close(): void {
    for (const index of [...this.open.keys()]) this.forget(index);
  }

  /**
   * Reads [at, at + target.length) of the block and checks the CRC of every
   * chunk it covers. A read of whole chunks (the usual 4 KiB-aligned one) goes
   * straight into target; others read the covering chunks aside first.
   */
  private readOpen(block: OpenBlock, length: number, at: number, target: Buffer): boolean {
    const hsize = headerSize(length);
    const end = at + target.length;
    const c0 = Math.floor(at / CHUNK);
    const c1 = Math.ceil(end / CHUNK);
    const whole = at % CHUNK === 0 && (end % CHUNK === 0 || end === length);
    const start = c0 * CHUNK;
    const span = whole ? target : Buffer.allocUnsafe(Math.min(c1 * CHUNK, length) - start);
    if (preadFull(block.fd, span, hsize + start) !== span.length) return false;
    for (let c = c0; c < c1; c++) {
      const chunk = span.subarray((c - c0) * CHUNK, (c - c0 + 1) * CHUNK);
      if (zlib.crc32(chunk) !== block.header.readUInt32LE(FIXED + 4 * c)) return false;
    }
    if (!whole) span.copy(target, 0, at - start, at - start + target.length);
    return true;
  }

  /** Stores a block (best effort: a full or read-only cache disk only costs refetches). */
  put(index: number, data: Buffer): void {
    const header = Buffer.alloc(headerSize(data.length));
    MAGIC.copy(header, 0);
    this.keyBytes.copy(header, 8);
    header.writeUInt32LE(index, 24);
    header.writeUInt32LE(data.length, 28);
    for (let c = 0; c * CHUNK < data.length; c++) {
      header.writeUInt32LE(zlib.crc32(data.subarray(c * CHUNK, (c + 1) * CHUNK)), FIXED + 4 * c);
    }
    const final = this.file(index);
    const tmp = `${final}.${process.pid}.${crypto.randomBytes(4).toString("hex")}.tmp`;
    try {
      const fd = fs.openSync(tmp, "wx", 0o600);
      try {
        fs.writevSync(fd, [header, data]);
      } finally {
        fs.closeSync(fd);
      }
      fs.renameSync(tmp, final);
      this.stats.stored++;
      this.root.added(header.length + data.length, this.stats);
    } catch (err) {
      fs.rmSync(tmp, { force: true });
      log.remote("cache: cannot store %s: %s", final, (err as Error).message);
    }
  }

  /** Blocks of this object on disk now (for info). */
  countBlocks(): number {
    return readdir(this.dir).filter((n) => n.endsWith(".blk")).length;
  }

  /** A block file exists (not checked: for readahead decisions only). */
  has(index: number): boolean {
    return fs.existsSync(this.file(index));
  }

  /** Refreshes the block's mtime (its age for eviction) at most once a minute per open file. */
  private touch(block: OpenBlock): void {
    const now = Date.now();
    if (now - block.touchedAt < TOUCH_AFTER_MS) return;
    block.touchedAt = now;
    try {
      if (now - fs.fstatSync(block.fd).mtimeMs > TOUCH_AFTER_MS) {
        const date = new Date(now);
        fs.futimesSync(block.fd, date, date);
      }
    } catch {
      // Read-only cache: ages stay as they are.
    }
  }
}

/** A cache directory with a size limit, shared by all objects and processes. */
export class CacheRoot {
  private approxBytes: number | null = null;
  private evicting = false;

  constructor(
    readonly dir: string,
    readonly limitBytes: number = DEFAULT_CACHE_BYTES,
  ) {}

  /** The cache of one object version; creates its directory. */
  open(name: string, identity: ObjectIdentity, blockSize: number): BlockCache {
    const key = crypto
      .createHash("sha256")
      .update(
        JSON.stringify([name, identity.size, identity.etag, identity.lastModified, blockSize]),
      )
      .digest("hex");
    const dir = path.join(this.dir, LAYOUT, key.slice(0, 2), key);
    fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
    const about = path.join(dir, "object.json");
    if (!fs.existsSync(about)) {
      const tmp = `${about}.${process.pid}.tmp`;
      fs.writeFileSync(tmp, JSON.stringify({ url: name, ...identity, blockSize }) + "\n");
      fs.renameSync(tmp, about);
    }
    return new BlockCache(this, dir, key);
  }

  /** Called after a block was stored; evicts when the total passes the limit. */
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

  /** Deletes the least recently used blocks until the cache is at 90% of its limit. */
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
    log.remote("cache %s: evicted %d blocks, %d bytes left", this.dir, removed, total);
    return removed;
  }

  /** Every block file (and stale temp file, deleted on the way). */
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
            out.push({ path: p, size: st.size, mtimeMs: st.mtimeMs });
          }
        }
      }
    }
    return out;
  }
}

function readdir(dir: string): string[] {
  try {
    return fs.readdirSync(dir);
  } catch {
    return [];
  }
}
