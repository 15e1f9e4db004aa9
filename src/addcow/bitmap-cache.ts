import type { FileIO } from "../block/file-io";
import { log } from "../util/log";

/**
 * The COW bitmap, cached in units of one bitmap cluster (clusterSize bytes of
 * bitmap = clusterSize * 8 disk clusters), so a 16 TiB disk opens without
 * reading its whole bitmap and memory stays bounded.
 *
 * Bits only go 0 -> 1 while the disk runs. A set bit is first only in memory
 * ("dirty"); writeBack() persists dirty bitmap clusters in the order that keeps
 * a crash harmless: sync the image data, then write the bitmap clusters, then
 * sync the .add-cow file. Eviction of a dirty cluster goes through the same path.
 */
interface Entry {
  readonly index: number;
  readonly bits: Buffer;
  /**
   * The pages (by index) whose bits the .add-cow file does not have yet, each
   * with the change counter of its last change; empty when the entry matches
   * the disk. Pages, not the whole cluster: one write changes one byte, and a
   * write-back of 64 KiB per flush would dominate a small writer.
   */
  dirtyPages: Map<number, number>;
  pins: number;
  lastUse: number;
}

/** A bitmap cluster being read; waiters are pinned when it arrives. */
interface LoadSlot {
  waiters: number;
  promise: Promise<Entry>;
}

export interface BitmapCacheOptions {
  /** Byte offset of the bitmap in the .add-cow file (HEADER_SIZE). */
  offset: number;
  clusterBits: number;
  numClusters: number;
  /** Upper bound for cached bitmap bytes (soft: pinned entries may exceed it briefly). */
  capacityBytes: number;
  /** Called when every cached entry is dirty and one must go: must run writeBack(). */
  onPressure: () => Promise<void>;
}

/** Bitmap write-back granularity: a page. */
const PAGE_SHIFT = 12;

export const DEFAULT_BITMAP_CACHE_BYTES = 32 * 1024 * 1024;

export class BitmapCache {
  readonly numClusters: number;
  /** Disk clusters described by one cached bitmap cluster. */
  readonly clustersPerEntry: number;
  private readonly entryShift: number;
  private readonly entryBytes: number;
  private readonly capacity: number;
  /** Bytes of bitmap the disk uses (the padding after it is never written). */
  private readonly bitmapBytes: number;
  private readonly entries = new Map<number, Entry>();
  private readonly loading = new Map<number, LoadSlot>();
  private clock = 0;
  /** Counts changes; a page written back is clean only if it did not change since its snapshot. */
  private changeCounter = 0;
  private dirtyCount = 0;

  constructor(
    private readonly meta: FileIO,
    private readonly opts: BitmapCacheOptions,
  ) {
    this.numClusters = opts.numClusters;
    this.entryBytes = 2 ** opts.clusterBits;
    this.entryShift = opts.clusterBits + 3;
    this.clustersPerEntry = 2 ** this.entryShift;
    this.capacity = Math.max(2, Math.floor(opts.capacityBytes / this.entryBytes));
    this.bitmapBytes = Math.ceil(opts.numClusters / 8);
  }

  /**
   * Loads and pins the entries covering clusters [c0, c1) so they cannot be
   * evicted while a request uses them; pair with unpin(). Returns undefined
   * (no promise, no allocation) when everything is cached already. Either
   * pins everything or, on a read error, nothing.
   */
  pin(c0: number, c1: number): Promise<void> | undefined {
    const first = Math.floor(c0 / this.clustersPerEntry);
    const last = Math.floor((c1 - 1) / this.clustersPerEntry);
    let missing: number[] | undefined;
    for (let i = first; i <= last; i++) {
      const e = this.entries.get(i);
      if (e) {
        e.pins++;
        e.lastUse = ++this.clock;
      } else {
        (missing ??= []).push(i);
      }
    }
    if (!missing) return undefined;
    return this.pinMissing(first, last, missing);
  }

  private async pinMissing(first: number, last: number, missing: number[]): Promise<void> {
    const loaded: Entry[] = [];
    try {
      for (const i of missing) loaded.push(await this.loadPinned(i));
    } catch (err) {
      for (const e of loaded) e.pins--;
      for (let i = first; i <= last; i++) {
        if (!missing.includes(i)) this.entries.get(i)!.pins--;
      }
      throw err;
    }
  }

  unpin(c0: number, c1: number): void {
    const first = Math.floor(c0 / this.clustersPerEntry);
    const last = Math.floor((c1 - 1) / this.clustersPerEntry);
    for (let i = first; i <= last; i++) {
      const e = this.entries.get(i);
      if (e) e.pins--;
    }
  }

  /**
   * Resolves to the entry, already pinned for this caller. The pin is taken in
   * the same step that puts a loaded entry into the cache, so a concurrent
   * eviction can never take an entry between its load and its first use.
   */
  private loadPinned(index: number): Promise<Entry> {
    const ready = this.entries.get(index);
    if (ready) {
      ready.pins++;
      ready.lastUse = ++this.clock;
      return Promise.resolve(ready);
    }
    let slot = this.loading.get(index);
    if (!slot) {
      const fresh: LoadSlot = { waiters: 0, promise: Promise.resolve(null as unknown as Entry) };
      fresh.promise = this.loadFromDisk(index, fresh).finally(() => this.loading.delete(index));
      this.loading.set(index, fresh);
      slot = fresh;
    }
    slot.waiters++;
    return slot.promise;
  }

  private async loadFromDisk(index: number, slot: LoadSlot): Promise<Entry> {
    await this.makeRoom();
    const bits = Buffer.alloc(this.entryBytes);
    // A bitmap without its trailing padding reads short: the missing bytes are 0.
    await this.meta.read(bits, this.opts.offset + index * this.entryBytes);
    const e: Entry = {
      index,
      bits,
      dirtyPages: new Map(),
      pins: slot.waiters,
      lastUse: ++this.clock,
    };
    this.entries.set(index, e);
    log.bitmap("loaded bitmap cluster %d", index);
    return e;
  }

  private async makeRoom(): Promise<void> {
    for (let attempt = 0; this.entries.size + this.loading.size >= this.capacity; attempt++) {
      let victim: Entry | undefined;
      for (const e of this.entries.values()) {
        if (e.pins > 0 || e.dirtyPages.size > 0) continue;
        if (!victim || e.lastUse < victim.lastUse) victim = e;
      }
      if (victim) {
        this.entries.delete(victim.index);
        log.bitmap("evicted bitmap cluster %d", victim.index);
        continue;
      }
      // Every candidate is dirty (or pinned): persist in the safe order, then retry once.
      if (attempt > 0 || this.dirtyCount === 0) return;
      await this.opts.onPressure();
    }
  }

  private entry(c: number): Entry {
    const e = this.entries.get(Math.floor(c / this.clustersPerEntry));
    if (!e) throw new Error(`bitmap cluster for disk cluster ${c} used without pin()`);
    return e;
  }

  isSet(c: number): boolean {
    const e = this.entry(c);
    const bit = c % this.clustersPerEntry;
    return ((e.bits[bit >> 3]! >> (bit & 7)) & 1) === 1;
  }

  /**
   * Number of clusters from c (before end) that have the same state as c.
   * Skips whole bytes of equal bits; never walks bit by bit over long runs.
   */
  runLength(c: number, end: number): number {
    const state = this.isSet(c);
    const fullByte = state ? 0xff : 0x00;
    let pos = c;
    while (pos < end) {
      const e = this.entry(pos);
      const base = e.index * this.clustersPerEntry;
      const limit = Math.min(end, base + this.clustersPerEntry) - base;
      let bit = pos - base;
      const bits = e.bits;
      while (bit < limit) {
        if ((bit & 7) === 0 && bit + 8 <= limit) {
          let byte = bit >> 3;
          const lastByte = limit >> 3;
          while (byte < lastByte && bits[byte] === fullByte) byte++;
          if (byte << 3 !== bit) {
            bit = byte << 3;
            continue;
          }
        }
        if ((((bits[bit >> 3]! >> (bit & 7)) & 1) === 1) !== state) return base + bit - c;
        bit++;
      }
      pos = base + limit;
    }
    return end - c;
  }

  /** Marks clusters [c0, c1) allocated in memory (they become dirty). */
  set(c0: number, c1: number): void {
    let c = c0;
    const change = ++this.changeCounter;
    while (c < c1) {
      const e = this.entry(c);
      const base = e.index * this.clustersPerEntry;
      const stop = Math.min(c1, base + this.clustersPerEntry);
      let markedPage = -1;
      for (; c < stop; c++) {
        const bit = c - base;
        const byte = bit >> 3;
        const mask = 1 << (bit & 7);
        const old = e.bits[byte]!;
        if (old & mask) continue;
        const page = byte >> PAGE_SHIFT;
        if (page !== markedPage) {
          markedPage = page;
          if (e.dirtyPages.size === 0) this.dirtyCount++;
          e.dirtyPages.set(page, change);
        }
        e.bits[byte] = old | mask;
      }
    }
  }

  hasDirty(): boolean {
    return this.dirtyCount > 0;
  }

  /**
   * Persists every dirty bitmap page. syncData must make the image data of
   * every bit set so far durable; it runs after the snapshot and before any
   * bitmap byte is written. Nothing is ever dropped: when syncData, a write or
   * the sync of the .add-cow file fails, every bit stays dirty in memory and the
   * error goes to the caller. (After a failed data sync the device refuses to
   * write bits at all, see AddCowDevice; a failed bitmap write is retried by
   * the next write-back, which rewrites the whole pages.)
   */
  async writeBack(syncData: () => Promise<void>): Promise<void> {
    // Only the pages holding changed bits are written: a 4 KiB write per flush
    // instead of a whole bitmap cluster (64 KiB, or 1 MiB with 1M clusters).
    // Consecutive pages go in one write.
    const snapshotAt = this.changeCounter;
    const snapshot: Array<{ e: Entry; runs: Array<{ lo: number; bits: Buffer }> }> = [];
    for (const e of this.entries.values()) {
      if (e.dirtyPages.size === 0) continue;
      const valid = Math.min(this.entryBytes, this.bitmapBytes - e.index * this.entryBytes);
      const pages = [...e.dirtyPages.keys()].sort((x, y) => x - y);
      const runs: Array<{ lo: number; bits: Buffer }> = [];
      for (let i = 0; i < pages.length;) {
        let j = i + 1;
        while (j < pages.length && pages[j] === pages[j - 1]! + 1) j++;
        const lo = pages[i]! << PAGE_SHIFT;
        const hi = Math.min(valid, (pages[j - 1]! + 1) << PAGE_SHIFT);
        runs.push({ lo, bits: Buffer.from(e.bits.subarray(lo, hi)) });
        i = j;
      }
      snapshot.push({ e, runs });
    }
    await syncData();
    if (snapshot.length === 0) return;
    for (const { e, runs } of snapshot) {
      for (const r of runs) {
        await this.meta.write(r.bits, this.opts.offset + e.index * this.entryBytes + r.lo);
      }
    }
    await this.meta.sync();
    for (const { e } of snapshot) {
      // Pages changed since the snapshot stay dirty for the next write-back.
      for (const [page, change] of e.dirtyPages) {
        if (change <= snapshotAt) e.dirtyPages.delete(page);
      }
      if (e.dirtyPages.size === 0) this.dirtyCount--;
    }
    log.bitmap("wrote back %d bitmap cluster(s)", snapshot.length);
  }

  /**
   * Forgets every cached bit so the next use reads the bitmap from the file
   * again (after it was rewritten on disk: commit empties the overlay).
   * Only legal while nothing is pinned, loading or dirty.
   */
  reset(): void {
    if (this.dirtyCount > 0 || this.loading.size > 0) {
      throw new Error("bitmap reset while bits are dirty or loading");
    }
    for (const e of this.entries.values()) {
      if (e.pins > 0) throw new Error("bitmap reset while a request uses it");
    }
    this.entries.clear();
  }
}
