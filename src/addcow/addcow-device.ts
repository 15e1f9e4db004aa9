import * as fs from "node:fs";
import {
  type BlockDevice,
  DeviceBase,
  type Extent,
  type LayerDescription,
} from "../block/block-device";
import { forEachExtent, pushExtent, readSparse } from "../block/extents";
import { type AddCowInfo, describeAddCow } from "./addcow-info";
import { checkRange } from "../block/range";
import { AddCowError, errnoCode, readOnlyError } from "../util/errors";
import type { Namer } from "../block/chain-opener";
import {
  type AddCowHeader,
  COMPATIBLE_FEATURES_OFFSET,
  FEATURE_ALL_ALLOCATED,
  bitmapBytes,
} from "./header";
import { BitmapCache, DEFAULT_BITMAP_CACHE_BYTES } from "./bitmap-cache";
import { writeZeros } from "./bitmap-space";
import { writeBitmapTail } from "./bitmap-tail";
import { type MetaRewrite, rewriteMetaFile, withBacking } from "./switch-backing";
import { NO_PIN, type PinState, type PinStatus, newDiskId, pinRecord, writePinSlot } from "./pin";
import type { AddCowIdentity, LayerIdentity } from "../block/layer-identity";
import type { AddCowLayer } from "./addcow-layer";
import type { BackingFormat } from "../block/chain-opener";
import { type FileReplacer, posixReplacer } from "../block/replace-file";
import { type FileIO, statOf } from "../block/file-io";
import { log } from "../util/log";
import { FlushCoalescer } from "../block/flush-coalescer";
import { RangeLock } from "../block/range-lock";

const RESOLVED = Promise.resolve();

/** Larger copy-on-write buffers are not kept for reuse. */
const MAX_SPARE_BUFFER = 4 * 1024 * 1024;

/** writeback: bits reach disk on flush; writethrough: every write is durable when acknowledged. */
export type CacheMode = "writeback" | "writethrough";

export interface AddCowDeviceParts {
  /** Path of the .add-cow file, for messages. */
  path: string;
  header: AddCowHeader;
  /** The .add-cow file (header + bitmap). */
  meta: FileIO;
  /** The image file: allocated clusters at their own offset; its length is the disk size. */
  image: FileIO;
  imageSize: number;
  /** The backing disk, opened read-only; null when there is none or it is not used. */
  backing: BlockDevice | null;
  /** Resolved paths, for info. */
  imagePath: string;
  backingPath: string | null;
  /** The backing pin read at open (pin.ts). */
  pin?: PinState;
  /** How the .add-cow file is rewritten when the pin moves (resize); tests record it. */
  replacer?: FileReplacer;
  /** Whose words the names in its header are (its owner, and who controls the way to it). */
  owner?: Namer;
  cacheMode?: CacheMode;
  bitmapCacheBytes?: number;
  /** Reads from the backing disk also land in the image file (mount -o copy-on-read). */
  copyOnRead?: boolean;
  /** Called once when the device is closed (releases locks). */
  onClose?: () => Promise<void> | void;
}

/**
 * An add-cow disk. Reads are served per run of clusters from the image file
 * (bit 1) or the backing disk (bit 0; zeros past its end). Writes go to the
 * image file; a first write that covers only part of a cluster fills the rest
 * from the backing disk (copy-on-write) before the cluster's bit is set.
 */
export class AddCowDevice extends DeviceBase implements AddCowLayer {
  readonly path: string;
  readonly owner: Namer | null;
  readonly size: number;
  readonly clusterBits: number;
  readonly clusterSize: number;
  readonly numClusters: number;
  readonly header: AddCowHeader;
  readonly imagePath: string;
  readonly backingPath: string | null;
  readonly backing: BlockDevice | null;
  readonly image: FileIO;
  readonly meta: FileIO;
  readonly bitmap: BitmapCache;
  readonly cacheMode: CacheMode;
  /** Reads from the backing disk are also copied into the image file (writable disks only). */
  private copyingOnRead: boolean;
  /** Opened writable; false once retired (it became another layer's backing). */
  private writable: boolean;

  /** Held while clusters are being allocated (copy-on-write, block-job copies). */
  readonly allocating = new RangeLock();
  private readonly flusher = new FlushCoalescer(() => this.flushOrdered());
  /** Counts completed image writes; compared with syncedWrites to skip needless syncs. */
  private completedWrites = 0;
  private syncedWrites = 0;
  /** Set by the first failed data sync; every later flush fails (see flushOrdered). */
  private syncFailure: AddCowError | null = null;
  private closed = false;
  private readonly onClose: (() => Promise<void> | void) | undefined;
  /** Copy-on-write buffers not in use (as many as ever ran concurrently). */
  private readonly spareBuffers: Buffer[] = [];
  private pinState: PinState;
  private readonly replacer: FileReplacer;

  constructor(parts: AddCowDeviceParts) {
    super();
    this.path = parts.path;
    this.owner = parts.owner ?? null;
    this.header = parts.header;
    this.meta = parts.meta;
    this.image = parts.image;
    this.size = parts.imageSize;
    this.writable = parts.image.writable;
    this.backing = parts.backing;
    this.imagePath = parts.imagePath;
    this.backingPath = parts.backingPath;
    this.pinState = parts.pin ?? NO_PIN;
    this.replacer = parts.replacer ?? posixReplacer;
    this.cacheMode = parts.cacheMode ?? "writeback";
    this.copyingOnRead = parts.copyOnRead === true && !this.readOnly;
    this.onClose = parts.onClose;
    this.clusterBits = parts.header.clusterBits;
    this.clusterSize = 2 ** this.clusterBits;
    this.numClusters = Math.ceil(this.size / this.clusterSize);
    this.bitmap = new BitmapCache(parts.meta, {
      offset: parts.header.headerSize,
      clusterBits: this.clusterBits,
      numClusters: this.numClusters,
      capacityBytes: parts.bitmapCacheBytes ?? DEFAULT_BITMAP_CACHE_BYTES,
      // A write-back that fails keeps its bits, and the cache then holds more than its
      // soft capacity until one succeeds: reads and writes go on meanwhile.
      onPressure: () =>
        this.flush().catch((err: unknown) => {
          log.bitmap("write-back for room in the bitmap cache failed: %s", String(err));
        }),
    });
  }

  get readOnly(): boolean {
    return !this.writable;
  }

  get copyOnRead(): boolean {
    return this.copyingOnRead;
  }

  get backingFormat(): BackingFormat | null {
    return this.header.backingFormat;
  }

  /** The backing pin: what the backing must be (docs/specs/add-cow.md, "The backing pin"). */
  get pin(): PinState {
    return this.pinState;
  }

  /** What a layer above pins of this one: its size and the id its pin gives it. */
  override identity(): Promise<AddCowIdentity> {
    const p = this.pinState;
    return Promise.resolve({
      kind: "add-cow",
      size: this.size,
      disk: p.kind === "pinned" ? p.record.disk : null,
    });
  }

  /** Where the bitmap area ends: at the pin extension, or at the end of the file. */
  private async bitmapEnd(): Promise<number> {
    return this.pinState.kind === "pinned" ? this.pinState.areaStart : this.meta.size();
  }

  /** Compatible bit 0: the image file holds every cluster; bitmap and backing are not used. */
  get allAllocated(): boolean {
    return (this.header.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n;
  }

  private clusterOf(offset: number): number {
    return Math.floor(offset / this.clusterSize);
  }

  private clusterEnd(end: number): number {
    return Math.ceil(end / this.clusterSize);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    try {
      checkRange(this, buf.length, offset);
      if (buf.length === 0) return RESOLVED;
      if (this.allAllocated) return this.readImage(buf, offset);
      const c0 = this.clusterOf(offset);
      const c1 = this.clusterEnd(offset + buf.length);
      const pinning = this.bitmap.pin(c0, c1);
      if (pinning) return pinning.then(() => this.readPinned(buf, offset, c0, c1));
      return this.readPinned(buf, offset, c0, c1);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  /**
   * Splits [offset, offset + buf.length) into runs of clusters with one source
   * while the bitmap is pinned, unpins, then reads each run with one I/O. The
   * bitmap is not needed during the I/O: a write racing with this read may land
   * before or after it, as on any disk.
   */
  private readPinned(buf: Buffer, offset: number, c0: number, c1: number): Promise<void> {
    let allocated: boolean;
    let n: number;
    let runs: Array<Promise<void>> | undefined;
    try {
      allocated = this.bitmap.isSet(c0);
      n = this.bitmap.runLength(c0, c1);
      if (n < c1 - c0) runs = this.readRuns(buf, offset, c0, c1, allocated, n);
    } finally {
      this.bitmap.unpin(c0, c1);
    }
    if (runs) return settleAll(runs);
    // One source for the whole request (the common case): no run list, no sub-buffers.
    return allocated ? this.readImage(buf, offset) : this.readUnallocated(buf, offset);
  }

  /** One read per run; the first run (allocated, n clusters) is already known. */
  private readRuns(
    buf: Buffer,
    offset: number,
    c0: number,
    c1: number,
    allocated: boolean,
    n: number,
  ): Array<Promise<void>> {
    const end = offset + buf.length;
    const reads: Array<Promise<void>> = [];
    let pos = offset;
    let c = c0;
    for (;;) {
      const runEnd = Math.min(end, (c + n) * this.clusterSize);
      const part = buf.subarray(pos - offset, runEnd - offset);
      log.engine("read run [%d, %d) from %s", pos, runEnd, allocated ? "image" : "backing");
      reads.push(allocated ? this.readImage(part, pos) : this.readUnallocated(part, pos));
      pos = runEnd;
      c += n;
      if (pos >= end) return reads;
      allocated = this.bitmap.isSet(c);
      n = this.bitmap.runLength(c, c1);
    }
  }

  private readImage(buf: Buffer, pos: number): Promise<void> {
    return this.image.read(buf, pos).then((n) => {
      if (n < buf.length) buf.fill(0, n);
    });
  }

  /** A read of clusters whose bit is 0; with copy-on-read they are then kept in the image file. */
  private readUnallocated(buf: Buffer, pos: number): Promise<void> {
    const read = this.readBacking(buf, pos);
    return this.copyOnRead ? read.then(() => this.keepRead(buf, pos)) : read;
  }

  /**
   * Copy-on-read: the clusters a backing read touched go through the same
   * path as a stream job's copy (allocation lock, clusters allocated meanwhile
   * skipped, data written, then bits set), using the bytes just read where
   * they cover a whole run. Clusters past the backing disk's end read as zeros
   * anyway and are left alone. A failed copy costs only the copy, never the read.
   */
  private async keepRead(buf: Buffer, pos: number): Promise<void> {
    const backingEnd = this.backing ? this.backing.size : 0;
    const c0 = this.clusterOf(pos);
    const c1 = Math.min(this.clusterEnd(pos + buf.length), this.clusterEnd(backingEnd));
    if (c0 >= c1) return;
    try {
      await this.copyFromBacking(c0, c1, undefined, { buf, pos });
    } catch (err) {
      log.engine("copy-on-read of [%d, %d) failed: %s", pos, pos + buf.length, err);
    }
  }

  /** Backing data for [pos, pos + buf.length): zeros past the backing disk's end or without one. */
  private readBacking(buf: Buffer, pos: number): Promise<void> {
    const backing = this.backing;
    const avail = backing ? Math.max(0, Math.min(buf.length, backing.size - pos)) : 0;
    if (avail === buf.length) return backing!.read(buf, pos);
    if (avail === 0) {
      buf.fill(0);
      return RESOLVED;
    }
    return backing!.read(buf.subarray(0, avail), pos).then(() => {
      buf.fill(0, avail);
    });
  }

  async write(buf: Buffer, offset: number): Promise<void> {
    if (this.readOnly) {
      throw readOnlyError(this.path);
    }
    checkRange(this, buf.length, offset);
    if (buf.length === 0) return;
    if (this.allAllocated) {
      await this.image.write(buf, offset);
      this.completedWrites++;
    } else {
      const c0 = this.clusterOf(offset);
      const c1 = this.clusterEnd(offset + buf.length);
      const pinning = this.bitmap.pin(c0, c1);
      if (pinning) await pinning;
      try {
        if (this.isAllocated(c0, c1)) {
          // Hot path: every cluster is in the image file already.
          await this.image.write(buf, offset);
          this.completedWrites++;
        } else {
          await this.allocateAndWrite(buf, offset, c0, c1);
        }
      } finally {
        this.bitmap.unpin(c0, c1);
      }
    }
    if (this.cacheMode === "writethrough") await this.flush();
  }

  private isAllocated(c0: number, c1: number): boolean {
    return this.bitmap.isSet(c0) && this.bitmap.runLength(c0, c1) === c1 - c0;
  }

  /**
   * First write into at least one cluster: under the allocation lock, fill the
   * uncovered head and tail of unallocated edge clusters from the backing disk,
   * write everything with one I/O, and only then set the bits in memory.
   */
  private async allocateAndWrite(buf: Buffer, offset: number, c0: number, c1: number) {
    const release = await this.allocating.acquire(c0, c1);
    try {
      // Another request may have allocated these clusters while we waited.
      if (this.isAllocated(c0, c1)) {
        await this.image.write(buf, offset);
        this.completedWrites++;
        return;
      }
      const end = offset + buf.length;
      const cs = this.clusterSize;
      const headFill = offset % cs !== 0 && !this.bitmap.isSet(c0);
      const tailFill = end % cs !== 0 && end < this.size && !this.bitmap.isSet(c1 - 1);
      const start = headFill ? c0 * cs : offset;
      const stop = tailFill ? Math.min(c1 * cs, this.size) : end;
      let data = buf;
      let scratch: Buffer | undefined;
      try {
        if (start !== offset || stop !== end) {
          scratch = this.takeScratch(stop - start);
          data = scratch.subarray(0, stop - start);
          const fills: Array<Promise<void>> = [];
          if (start < offset) fills.push(this.readBacking(data.subarray(0, offset - start), start));
          if (stop > end) fills.push(this.readBacking(data.subarray(end - start), end));
          // Both fills settle before a failure returns the scratch buffer for reuse.
          await settleAll(fills);
          buf.copy(data, offset - start);
          log.engine("copy-on-write [%d, %d) around write [%d, %d)", start, stop, offset, end);
        }
        await this.image.write(data, start);
      } finally {
        if (scratch && scratch.length <= MAX_SPARE_BUFFER) this.spareBuffers.push(scratch);
      }
      this.completedWrites++;
      this.bitmap.set(c0, c1);
    } finally {
      release();
    }
  }

  /**
   * A buffer for a copy-on-write span, reused across first writes: allocating
   * a fresh cluster-sized buffer each time costs more than the copy itself.
   */
  private takeScratch(len: number): Buffer {
    const spare = this.spareBuffers.pop();
    if (spare && spare.length >= len) return spare;
    return Buffer.allocUnsafe(Math.max(len, 2 * this.clusterSize));
  }

  /**
   * Copies clusters [c0, c1) that are still unallocated from the backing disk
   * into the image file and sets their bits (block jobs: stream). Takes the same
   * allocation lock as writes, so a user's write is never overwritten by a copy.
   * `known` holds the backing's bytes of a range already read (copy-on-read,
   * rebase; they never change: the backing is read-only); runs it covers are
   * not read again. Clusters that read as zeros are not written where the
   * image file already reads as zeros (storeCopy), so the image stays sparse.
   * Returns the number of clusters copied.
   */
  async copyFromBacking(
    c0: number,
    c1: number,
    scratch?: Buffer,
    known?: { buf: Buffer; pos: number },
  ): Promise<number> {
    if (this.readOnly) throw readOnlyError(this.path);
    if (this.allAllocated) return 0;
    const pinning = this.bitmap.pin(c0, c1);
    if (pinning) await pinning;
    try {
      const release = await this.allocating.acquire(c0, c1);
      try {
        let copied = 0;
        let c = c0;
        while (c < c1) {
          const n = this.bitmap.runLength(c, c1);
          if (!this.bitmap.isSet(c)) {
            const start = c * this.clusterSize;
            const stop = Math.min((c + n) * this.clusterSize, this.size);
            const len = stop - start;
            let data: Buffer;
            if (known && start >= known.pos && stop <= known.pos + known.buf.length) {
              // Read already (copy-on-read, rebase): not read again.
              data = known.buf.subarray(start - known.pos, stop - known.pos);
            } else {
              data =
                scratch && scratch.length >= len
                  ? scratch.subarray(0, len)
                  : Buffer.allocUnsafe(len);
              // Block jobs do not read what the chain knows to be zeros (holes, zero clusters).
              await readSparse(this.backing, data, start);
            }
            await this.storeCopy(data, start);
            this.bitmap.set(c, c + n);
            copied += n;
          }
          c += n;
        }
        return copied;
      } finally {
        release();
      }
    } finally {
      this.bitmap.unpin(c0, c1);
    }
  }

  /**
   * Writes copied data into the image file at `start` (a cluster boundary),
   * except whole clusters that are all zeros where the image file already
   * reads as zeros (a hole): their bit alone says it. The image file may hold
   * old bytes elsewhere (from before create, from a commit), so anywhere else
   * the zeros are written. A hole needs no sync to be durable, so the
   * crash-order rule (data durable before its bit) holds either way.
   */
  private async storeCopy(data: Buffer, start: number): Promise<void> {
    const cs = this.clusterSize;
    const end = start + data.length;
    let holes: Array<[number, number]> | undefined;
    let pending = start;
    let wrote = false;
    const writeUpTo = async (at: number) => {
      if (at > pending) {
        await this.image.write(data.subarray(pending - start, at - start), pending);
        wrote = true;
      }
    };
    for (let at = start; at < end; at += cs) {
      const next = Math.min(end, at + cs);
      if (!isZero(data.subarray(at - start, next - start))) continue;
      holes ??= this.image.holes(start, end);
      if (!holes.some(([a, b]) => a <= at && next <= b)) continue;
      await writeUpTo(at);
      pending = next;
    }
    await writeUpTo(end);
    if (wrote) this.completedWrites++;
  }

  /**
   * Bit 1: data (in the image file). Bit 0: backing, or zero past the backing
   * disk's end (or without one). Answers at most one cached bitmap cluster's
   * worth of clusters per call, so a huge disk is scanned with bounded memory.
   */
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    try {
      checkRange(this, length, offset);
    } catch (err) {
      return Promise.reject(err);
    }
    if (length === 0) return Promise.resolve([]);
    if (this.allAllocated) return Promise.resolve([{ start: offset, length, kind: "data" }]);
    const c0 = this.clusterOf(offset);
    const per = this.bitmap.clustersPerEntry;
    const c1 = Math.min(this.clusterEnd(offset + length), (Math.floor(c0 / per) + 1) * per);
    const collect = (): Extent[] => {
      const out: Extent[] = [];
      const end = Math.min(offset + length, c1 * this.clusterSize);
      const backingEnd = this.backing ? this.backing.size : 0;
      try {
        for (let c = c0; c < c1;) {
          const n = this.bitmap.runLength(c, c1);
          const s = Math.max(offset, c * this.clusterSize);
          const e = Math.min(end, (c + n) * this.clusterSize);
          if (this.bitmap.isSet(c)) {
            pushExtent(out, s, e - s, "data");
          } else {
            const split = Math.max(s, Math.min(e, backingEnd));
            pushExtent(out, s, split - s, "backing");
            pushExtent(out, split, e - split, "zero");
          }
          c += n;
        }
      } finally {
        this.bitmap.unpin(c0, c1);
      }
      return out;
    };
    const pinning = this.bitmap.pin(c0, c1);
    return pinning ? pinning.then(collect) : Promise.resolve(collect());
  }

  describe(): LayerDescription {
    return {
      format: "add-cow",
      name: this.path,
      storage: this.imagePath,
      files: [this.path, this.imagePath],
      details: { clusterSize: this.clusterSize, allAllocated: this.allAllocated },
    };
  }

  override storageStat(): fs.BigIntStats | null {
    return statOf(this.image);
  }

  /** Number of allocated clusters (the data extents; a partial last cluster counts as one). */
  async countAllocated(): Promise<number> {
    let count = 0;
    await forEachExtent(this, 0, this.size, (e) => {
      if (e.kind === "data") count += Math.ceil(e.length / this.clusterSize);
    });
    return count;
  }

  /** What `addcow info` shows for this layer (costs a scan of the bitmap). */
  override async info(): Promise<AddCowInfo> {
    let chainDepth = 0;
    for (let layer = this.backing; layer; layer = layer.backing) chainDepth++;
    return describeAddCow({
      file: this.path,
      header: this.header,
      size: this.size,
      numClusters: this.numClusters,
      allocatedClusters: await this.countAllocated(),
      metadataFileSize: await this.meta.size(),
      imagePath: this.imagePath,
      backingPath: this.backingPath,
      backingInUse: this.backing !== null,
      backingDetails: this.backing?.describe().details,
      chainDepth,
      pin: this.pinState,
    });
  }

  /** Bits set in memory that the .add-cow file does not have yet. */
  override hasUnsavedMetadata(): boolean {
    return this.bitmap.hasDirty();
  }

  flush(): Promise<void> {
    if (this.readOnly) return Promise.resolve();
    return this.flusher.flush();
  }

  /**
   * The ordered flush: image data durable, then bitmap clusters, then the .add-cow file.
   * Protected only so the crash tests can build a deliberately broken subclass and
   * prove their checker catches a wrong order; nothing else overrides it.
   *
   * A failed image sync is final, as in QEMU: the kernel may have dropped the
   * dirty pages of any write since the last good sync (and a retried fdatasync
   * would succeed without them), so no bit may be written any more and every
   * later flush fails with EIO until the disk is opened again. Bits that could
   * not be written (the .add-cow write or sync failed) stay dirty and are
   * written by the next flush.
   */
  protected async flushOrdered(): Promise<void> {
    if (this.syncFailure) throw this.failedAgain();
    const writes = this.completedWrites;
    if (writes === this.syncedWrites && !this.bitmap.hasDirty()) return;
    await this.bitmap.writeBack(async () => {
      if (writes === this.syncedWrites) return;
      try {
        await this.image.sync();
      } catch (err) {
        this.syncFailure = this.syncFailed(err);
        throw this.syncFailure;
      }
      this.syncedWrites = writes;
    });
  }

  /** The error of the first failed data sync (its own code: EIO, ENOSPC, ...). */
  private syncFailed(err: unknown): AddCowError {
    const code = errnoCode(err) ?? "EIO";
    log.engine("%s: data sync failed (%s): the disk refuses flushes from now on", this.path, code);
    return new AddCowError(
      `syncing image file ${this.imagePath} failed (${code}): writes since the last successful flush may be lost; every later flush fails until ${this.path} is opened again`,
      { code, reason: "sync-failed", file: this.imagePath, cause: err },
    );
  }

  private failedAgain(): AddCowError {
    return new AddCowError(
      `${this.path}: an earlier sync of image file ${this.imagePath} failed (${this.syncFailure!.code}); flushes fail until the disk is opened again`,
      { code: "EIO", reason: "sync-failed", file: this.imagePath, cause: this.syncFailure },
    );
  }

  /** Sets the "all allocated" feature once every cluster is in the image file. */
  async markAllAllocated(): Promise<void> {
    if (this.allAllocated) return;
    await this.flush();
    if ((await this.countAllocated()) !== this.numClusters) {
      throw new AddCowError(`${this.path}: not every cluster is allocated yet`);
    }
    const features = this.header.compatibleFeatures | FEATURE_ALL_ALLOCATED;
    const field = Buffer.alloc(8);
    field.writeBigUInt64LE(features);
    await this.meta.write(field, COMPATIBLE_FEATURES_OFFSET);
    await this.meta.sync();
    this.header.compatibleFeatures = features;
  }

  /**
   * Empties the overlay (commit): every bit becomes 0, so every cluster reads
   * from the backing disk again. The one place where bits go 1 -> 0. It is
   * safe only when the backing disk already holds every allocated cluster
   * durably (the caller synced it): then each cleared bit, whenever it reaches
   * the disk, changes no byte the disk reads, so a crash at any point leaves a
   * consistent disk. The caller must have stopped every request to this device.
   */
  async clearAllocation(): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    if (this.allAllocated) {
      throw new AddCowError(
        `${this.path} has the "all allocated" feature set; its bitmap cannot be emptied`,
      );
    }
    await this.flush();
    if (this.allocating.size > 0) throw new Error("clearAllocation while clusters are allocated");
    const total = bitmapBytes(this.numClusters, this.clusterBits).padded;
    let end = this.header.headerSize + total;
    // Never into the pin extension after the bitmap.
    if (this.pinState.kind === "pinned") end = Math.min(end, this.pinState.areaStart);
    await writeZeros(this.meta, this.header.headerSize, end);
    await this.meta.sync();
    this.bitmap.reset();
    log.engine("%s: bitmap emptied", this.path);
  }

  /**
   * Grows the disk to newSize as docs/specs/add-cow.md says ("Growing a
   * disk"): the new clusters read as zeros, also where the backing is longer
   * than the old disk. Each step is durable before the next:
   *  1. a partial last cluster still read from a longer backing gets its
   *     bytes copied, so its new tail reads the image file's zeros;
   *  2. the bitmap grows, written for real, with the bits of the new clusters
   *     over the backing set (all of them on an "all allocated" disk): still
   *     past the end of the disk, so nothing reads them;
   *  3. the image file grows: the new clusters exist, as zeros (a hole).
   * A crash before 3 leaves the old disk (with bits past its end, which
   * `addcow check` reports until resize runs again); after 3 the new one.
   * The device keeps its old size: close it afterwards.
   */
  async grow(newSize: number): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    const cs = this.clusterSize;
    const backingEnd = this.allAllocated || !this.backing ? 0 : this.backing.size;
    if (this.size % cs !== 0 && backingEnd > this.size) {
      await this.copyFromBacking(this.numClusters - 1, this.numClusters);
    }
    await this.flush();
    if (this.pinState.kind === "pinned") {
      // The pin extension follows the bitmap: a new file with the longer bitmap and the pin after it.
      await this.rewrite({
        copyEnd: this.pinState.areaStart,
        editBitmap: (aside) => this.writeTail(newSize, aside),
      });
    } else {
      await this.writeTail(newSize, this.meta);
    }
    await this.image.truncate(newSize);
    await this.image.sync();
    log.engine("%s: grown from %d to %d bytes", this.path, this.size, newSize);
  }

  /**
   * Cuts the disk to newSize: the image file first, then the bitmap past the
   * new end. The caller made sure the overlay holds no data there. The device
   * keeps its old size: close it afterwards.
   */
  async shrink(newSize: number): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    await this.flush();
    await this.image.truncate(newSize);
    await this.image.sync();
    const padded = bitmapBytes(Math.ceil(newSize / this.clusterSize), this.clusterBits).padded;
    if (this.pinState.kind === "pinned") {
      await this.rewrite({ copyEnd: this.header.headerSize + padded });
    } else {
      await this.meta.truncate(this.header.headerSize + padded);
      await this.meta.sync();
    }
    log.engine("%s: shrunk from %d to %d bytes", this.path, this.size, newSize);
  }

  /** Clears the bits past the disk's last cluster that a crashed grow may have left. */
  async clearBitsPastEnd(): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    await this.writeTail(this.size, this.meta);
  }

  /**
   * The bitmap from the first cluster past this disk to the end of a disk of
   * `size` bytes: bits set where new clusters must hide a longer backing.
   */
  private async writeTail(size: number, meta: FileIO): Promise<void> {
    const cs = this.clusterSize;
    const clusters = Math.ceil(size / cs);
    const backingEnd = this.allAllocated || !this.backing ? 0 : this.backing.size;
    const setEnd = this.allAllocated ? clusters : Math.min(clusters, Math.ceil(backingEnd / cs));
    const from = this.numClusters;
    // In place on a pinned file the tail stops at the pin; elsewhere it may lengthen the file.
    const inPlacePin = meta === this.meta && this.pinState.kind === "pinned";
    const areaEnd = inPlacePin ? await this.bitmapEnd() : await meta.size();
    await writeBitmapTail(meta, this.header.headerSize, this.clusterBits, from, setEnd, clusters, {
      end: areaEnd,
      grow: !inPlacePin,
    });
  }

  /** A new .add-cow file in place of this one (switch-backing.ts), keeping or changing the pin. */
  private async rewrite(
    rw: Partial<MetaRewrite> & { copyEnd: number },
    replacer: FileReplacer = this.replacer,
  ): Promise<void> {
    const p = this.pinState;
    const next = await rewriteMetaFile(
      this.meta,
      this.path,
      {
        header: rw.header ?? this.header,
        pin: rw.pin !== undefined ? rw.pin : p.kind === "pinned" ? p.record : null,
        previous: p,
        copyEnd: rw.copyEnd,
        ...(rw.editBitmap ? { editBitmap: rw.editBitmap } : {}),
      },
      replacer,
    );
    Object.assign(this.header, next.header);
    this.pinState = next.pin;
  }

  /**
   * Pins the backing's identity anew, in place (a commit changed the backing,
   * so the disk reads the same on the new bytes): the slot not holding the
   * current pin is written and synced (pin.ts). Only a pinned disk.
   */
  async repin(identity: LayerIdentity, status: PinStatus = "pinned"): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    const p = this.pinState;
    if (p.kind !== "pinned") throw new Error(`${this.path} has no pin to replace`);
    this.pinState = await writePinSlot(
      this.meta,
      p,
      pinRecord(this.header, identity, p.record.disk, status),
    );
    log.engine("%s: backing pinned again (%s)", this.path, status);
  }

  /**
   * Makes the header name another backing file (or none) by one rename
   * (switch-backing.ts). The disk must not be in use by anyone else (its
   * locks are held). Reads keep going to the backing opened before.
   */
  async switchBacking(
    name: string | null,
    format: BackingFormat | null,
    replacer: FileReplacer = this.replacer,
    identity: LayerIdentity | null = null,
  ): Promise<void> {
    if (this.readOnly) throw readOnlyError(this.path);
    await this.flush();
    const header = withBacking(this.header, name, format);
    const p = this.pinState;
    // The disk keeps its id across pins: layers above pinned it by that id.
    const disk = p.kind === "pinned" ? p.record.disk : newDiskId();
    await this.rewrite(
      {
        header,
        copyEnd: await this.bitmapEnd(),
        pin: identity && name !== null ? pinRecord(header, identity, disk) : null,
      },
      replacer,
    );
    log.engine("%s: backing file is now %s (%s)", this.path, name, format);
  }

  /**
   * The layer became another one's backing (live snapshot): everything it
   * holds is made durable, and from now on it is only read: no writes, no
   * copy-on-read, no bits. Its files stay open and locked for the new top.
   */
  async retire(): Promise<void> {
    await this.flush();
    this.copyingOnRead = false;
    this.writable = false;
    log.engine("%s: retired, read-only from now on", this.path);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const errors: unknown[] = [];
    const attempt = async (fn: () => Promise<void> | void) => {
      try {
        await fn();
      } catch (err) {
        errors.push(err);
      }
    };
    await attempt(() => this.flush());
    await attempt(() => this.backing?.close());
    await attempt(() => this.image.close());
    await attempt(() => this.meta.close());
    await attempt(() => this.onClose?.());
    if (errors.length > 0) throw errors[0];
  }
}

/** Zeros to compare with; as long as the largest cluster. */
const ZEROS = Buffer.alloc(2 * 1024 * 1024);

function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZEROS.length) {
    const part = buf.subarray(at, Math.min(buf.length, at + ZEROS.length));
    if (!part.equals(ZEROS.subarray(0, part.length))) return false;
  }
  return true;
}

/**
 * Like Promise.all, but waits for every promise before rejecting: the FUSE
 * layer hands the kernel's buffer back once read() settles, so no run may
 * still be filling it after a sibling run failed.
 */
async function settleAll(promises: Array<Promise<void>>): Promise<void> {
  const results = await Promise.allSettled(promises);
  for (const r of results) if (r.status === "rejected") throw r.reason;
}
