import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import * as zlib from "node:zlib";
import { log } from "../util/log";
import {
  CHUNK,
  type CacheRoot,
  type CacheStats,
  ENTRY,
  LAYOUT,
  type ObjectCache,
  OpenFiles,
  emptyStats,
  PRESENT,
  StoreFailures,
  preadFull,
  pwriteFull,
  touchFile,
} from "./block-cache";
import type { Manifest } from "./manifest";

/**
 * Blocks of bases that have a manifest, stored once by their SHA-256 however
 * many bases, versions and URLs hold them (docs/remote.md, "The block cache"):
 *
 *   v3/sha256/<d[0..2]>/<d>.blk      d: the block's SHA-256 in hex
 *
 * A file holds one whole block: a header page (magic `ACOWDIG1`, the digest,
 * the length, and per 4 KiB chunk the entry block files have: CRC-32 and
 * present mark) and then the block's bytes. Only bytes already checked
 * against the manifest are stored (verify.ts checks every fetched block
 * first); a file is written aside whole and renamed into place, so a name
 * never holds part of a block, and a write that stops short (a full disk)
 * leaves nothing. Every read checks the CRC of each chunk it touches; the
 * first read of a file in a process also hashes the whole block, because a
 * file stored under digest D must hold bytes whose SHA-256 is D: one damaged,
 * torn by a power loss (files are not fsynced) or put there by hand is a
 * miss, is deleted and is fetched again. Eviction is the cache root's: these
 * files sit at the depth of block files and age with them (mtime, refreshed
 * on use).
 */
const MAGIC = Buffer.from("ACOWDIG1");
/** Magic, digest, length, reserved; then the chunk entries. */
const FIXED = 48;
export const DIGEST_DIR = "sha256";
/** Files this process hashed whole, remembered (by inode) so they are hashed once. */
const VERIFIED = 65536;

/** The header page of a block of `length` bytes: fixed part and chunk entries, rounded up to 4 KiB. */
export function digestHeaderSize(length: number): number {
  return Math.ceil((FIXED + ENTRY * Math.ceil(length / CHUNK)) / 4096) * 4096;
}

function sha256(data: Buffer): Buffer {
  return crypto.createHash("sha256").update(data).digest();
}

/** A file kept open: its descriptor, inode and header. */
interface OpenDigest {
  fd: number;
  ino: number;
  header: Buffer;
  touchedAt: number;
}

/** The store of blocks by SHA-256 under a cache root (one per object view, see DigestCache). */
export class DigestStore {
  readonly dir: string;
  readonly stats: CacheStats = emptyStats();
  /** Open files by digest (hex), with their checked headers. */
  private readonly open: OpenFiles<string, OpenDigest>;
  /** Digest (hex) to the inode this process hashed and found right. */
  private readonly verified = new Map<string, number>();
  private readonly shards = new Set<string>();
  private readonly failures: StoreFailures;

  constructor(
    private readonly root: CacheRoot,
    /** Where the one line about a cache that cannot store goes. */
    warn: (message: string) => void = () => undefined,
  ) {
    this.dir = path.join(root.dir, LAYOUT, DIGEST_DIR);
    this.open = new OpenFiles(root);
    this.failures = new StoreFailures(root.dir, warn);
  }

  /** Where the block with this digest is stored. */
  file(digest: Buffer): string {
    const hex = digest.toString("hex");
    return path.join(this.dir, hex.slice(0, 2), `${hex}.blk`);
  }

  /**
   * Fills target with bytes [at, at + target.length) of the block with this
   * digest and length when it is stored and checks; false on a miss.
   */
  read(digest: Buffer, length: number, at: number, target: Buffer): boolean {
    this.open.sweep();
    const hex = digest.toString("hex");
    const f = this.openFile(hex, digest, length);
    const ok = f !== null && this.readChecked(hex, f, length, at, target);
    if (ok) {
      this.stats.hits++;
      touchFile(f);
    } else {
      this.stats.misses++;
    }
    return ok;
  }

  private readChecked(
    hex: string,
    f: OpenDigest,
    length: number,
    at: number,
    target: Buffer,
  ): boolean {
    const data = digestHeaderSize(length);
    if (this.verified.get(hex) !== f.ino) {
      // First use here: the whole block and its digest (which vouches for every chunk).
      const whole = at === 0 && target.length === length;
      const block = whole ? target : Buffer.allocUnsafe(length);
      const good =
        preadFull(f.fd, block, data) === length && sha256(block).equals(f.header.subarray(8, 40));
      if (!good) return this.damaged(hex, f);
      this.remember(hex, f.ino);
      if (!whole) block.copy(target, 0, at, at + target.length);
      return true;
    }
    const c0 = Math.floor(at / CHUNK);
    const c1 = Math.ceil((at + target.length) / CHUNK);
    const start = c0 * CHUNK;
    const span = Buffer.allocUnsafe(Math.min(c1 * CHUNK, length) - start);
    if (preadFull(f.fd, span, data + start) !== span.length || !chunksMatch(f.header, span, c0)) {
      return this.damaged(hex, f);
    }
    span.copy(target, 0, at - start, at - start + target.length);
    return true;
  }

  /** The block with this digest is stored (not checked: for readahead decisions and info). */
  has(digest: Buffer): boolean {
    const hex = digest.toString("hex");
    if (this.open.has(hex)) return true;
    return fs.existsSync(this.file(digest));
  }

  /**
   * Stores a block under its digest. The caller has checked that `data`
   * hashes to `digest` (verify.ts); a block already stored is left as it is.
   * Best effort: a cache that cannot store says so once and leaves nothing.
   */
  put(digest: Buffer, data: Buffer): void {
    if (this.has(digest)) return;
    const hex = digest.toString("hex");
    const file = this.file(digest);
    const header = Buffer.alloc(digestHeaderSize(data.length));
    MAGIC.copy(header, 0);
    digest.copy(header, 8);
    header.writeUInt32LE(data.length, 40);
    for (let c = 0; c * CHUNK < data.length; c++) {
      header.writeUInt32LE(
        zlib.crc32(data.subarray(c * CHUNK, (c + 1) * CHUNK)),
        FIXED + ENTRY * c,
      );
      header.writeUInt32LE(PRESENT, FIXED + ENTRY * c + 4);
    }
    const tmp = `${file}.${process.pid}.${crypto.randomBytes(4).toString("hex")}.tmp`;
    let fd: number | null = null;
    try {
      const shard = path.dirname(file);
      if (!this.shards.has(shard)) {
        fs.mkdirSync(shard, { recursive: true, mode: 0o700 });
        this.shards.add(shard);
      }
      fd = fs.openSync(tmp, "wx+", 0o600);
      pwriteFull(fd, header, 0);
      pwriteFull(fd, data, header.length);
      // Whole, then named: another process storing the same block writes the same bytes.
      fs.renameSync(tmp, file);
    } catch (err) {
      if (fd !== null) fs.closeSync(fd);
      fs.rmSync(tmp, { force: true });
      this.failures.note(this.stats, this.dir, err);
      return;
    }
    const ino = fs.fstatSync(fd).ino;
    this.open.keep(hex, { fd, ino, header, touchedAt: Date.now() });
    // Written from bytes just checked against the digest: first use is now.
    this.remember(hex, ino);
    this.stats.stored++;
    this.root.added(header.length + data.length, this.stats);
  }

  /**
   * The open file of a digest with its header checked (magic, digest,
   * length); null when it is not stored, or its header is not this block's
   * (then the file is deleted).
   */
  private openFile(hex: string, digest: Buffer, length: number): OpenDigest | null {
    const kept = this.open.get(hex);
    if (kept !== undefined) return kept;
    let fd: number;
    try {
      fd = fs.openSync(this.file(digest), "r");
    } catch {
      return null;
    }
    const header = Buffer.alloc(digestHeaderSize(length));
    const f: OpenDigest = { fd, ino: fs.fstatSync(fd).ino, header, touchedAt: 0 };
    this.open.keep(hex, f);
    const good =
      preadFull(fd, header, 0) === header.length &&
      header.subarray(0, 8).equals(MAGIC) &&
      header.subarray(8, 40).equals(digest) &&
      header.readUInt32LE(40) === length &&
      header.readUInt32LE(44) === 0;
    if (good) return f;
    this.damaged(hex, f);
    return null;
  }

  private remember(hex: string, ino: number): void {
    this.verified.delete(hex);
    this.verified.set(hex, ino);
    if (this.verified.size > VERIFIED) {
      this.verified.delete(this.verified.keys().next().value as string);
    }
  }

  /** A file that does not hold its block: deleted (if it is still the one opened), a miss. */
  private damaged(hex: string, f: OpenDigest): false {
    this.stats.corrupt++;
    const file = path.join(this.dir, hex.slice(0, 2), `${hex}.blk`);
    log.remote("cache: %s does not hold its block; fetching it again", file);
    try {
      if (fs.statSync(file).ino === f.ino) fs.rmSync(file, { force: true });
    } catch {
      // Gone already.
    }
    this.verified.delete(hex);
    this.open.forget(hex);
    return false;
  }

  close(): void {
    this.open.closeAll();
  }
}

/** Chunks of `data` (which starts at chunk c0 of its block) match their entries. */
function chunksMatch(header: Buffer, data: Buffer, c0: number): boolean {
  for (let i = 0; i * CHUNK < data.length; i++) {
    const e = FIXED + ENTRY * (c0 + i);
    if (header.readUInt32LE(e + 4) !== PRESENT) return false;
    if (zlib.crc32(data.subarray(i * CHUNK, (i + 1) * CHUNK)) !== header.readUInt32LE(e)) {
      return false;
    }
  }
  return true;
}

/**
 * One base's view of the store, through its manifest: byte offsets of the
 * object map to manifest blocks, and each block to the file of its digest.
 * Blocks are stored whole only (the device fetches whole manifest blocks).
 */
export class DigestCache implements ObjectCache {
  constructor(
    private readonly store: DigestStore,
    private readonly manifest: Manifest,
  ) {}

  get dir(): string {
    return this.store.dir;
  }

  get stats(): CacheStats {
    return this.store.stats;
  }

  /** Calls fn for each manifest block's part of [offset, offset + length); stops when fn says false. */
  private eachBlock(
    offset: number,
    length: number,
    fn: (n: number, at: number, from: number, to: number) => boolean,
  ): boolean {
    const bs = this.manifest.blockSize;
    const end = offset + length;
    for (let n = Math.floor(offset / bs); n * bs < end; n++) {
      const [start, stop] = this.manifest.blockRange(n);
      const from = Math.max(offset, start);
      const to = Math.min(end, stop);
      if (!fn(n, from - start, from - offset, to - offset)) return false;
    }
    return true;
  }

  private blockLength(n: number): number {
    const [start, end] = this.manifest.blockRange(n);
    return end - start;
  }

  read(offset: number, target: Buffer): boolean {
    return this.eachBlock(offset, target.length, (n, at, from, to) =>
      this.store.read(
        this.manifest.digestOf(n),
        this.blockLength(n),
        at,
        target.subarray(from, to),
      ),
    );
  }

  has(offset: number, length: number): boolean {
    return this.eachBlock(offset, length, (n) => this.store.has(this.manifest.digestOf(n)));
  }

  /** Stores the whole manifest blocks of data (checked by the caller); a part of a block is not stored. */
  put(offset: number, data: Buffer): void {
    this.eachBlock(offset, data.length, (n, at, from, to) => {
      if (at === 0 && to - from === this.blockLength(n)) {
        this.store.put(this.manifest.digestOf(n), data.subarray(from, to));
      }
      return true;
    });
  }

  close(): void {
    this.store.close();
  }

  /** Manifest blocks of this base stored now, and their bytes (a block at several offsets counts at each). */
  usage(): { blocks: number; bytes: number } {
    const seen = new Map<string, boolean>();
    let blocks = 0;
    let bytes = 0;
    for (let n = 0; n < this.manifest.blocks; n++) {
      const digest = this.manifest.digestOf(n);
      const hex = digest.toString("hex");
      let here = seen.get(hex);
      if (here === undefined) seen.set(hex, (here = this.store.has(digest)));
      if (!here) continue;
      blocks++;
      bytes += this.blockLength(n);
    }
    return { blocks, bytes };
  }
}

/** The cache of a base with a manifest: its blocks by digest in the store under `root`. */
export function openDigestCache(
  root: CacheRoot,
  manifest: Manifest,
  warn?: (message: string) => void,
): DigestCache {
  return new DigestCache(new DigestStore(root, warn), manifest);
}
