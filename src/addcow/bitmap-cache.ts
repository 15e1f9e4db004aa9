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
  /** Bumped on every change; equal to savedVersion when the entry matches the disk. */
  version: number;
  savedVersion: number;
  /**
   * While dirty: the durable contents of each page changed since, keyed by page
   * index, so a failed data sync can roll back. Pages, not the whole cluster:
   * one write changes one byte, and a 64 KiB copy per dirty cluster would
   * dominate the memory of a writer spread over a large disk.
   */
  durable: Map<number, Buffer> | null;
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

/** Bitmap write-back and rollback granularity: a page. */
const WRITE_ALIGN = 4096;
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
  private versionCounter = 0;
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
    const v = ++this.versionCounter;
    const e: Entry = {
      index,
      bits,
      version: v,
      savedVersion: v,
      durable: null,
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
        if (e.pins > 0 || e.version !== e.savedVersion) continue;
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
    while (c < c1) {
      const e = this.entry(c);
      const base = e.index * this.clustersPerEntry;
      const stop = Math.min(c1, base + this.clustersPerEntry);
      let changed = false;
      let savedPage = -1;
      for (; c < stop; c++) {
        const bit = c - base;
        const byte = bit >> 3;
        const mask = 1 << (bit & 7);
        const old = e.bits[byte]!;
        if (old & mask) continue;
        if (!changed && e.version === e.savedVersion) {
          e.durable = new Map();
          this.dirtyCount++;
        }
        changed = true;
        const page = byte >> PAGE_SHIFT;
        if (page !== savedPage) {
          savedPage = page;
          const durable = e.durable!;
          if (!durable.has(page)) durable.set(page, Buffer.from(pageOf(e.bits, page)));
        }
        e.bits[byte] = old | mask;
      }
      if (changed) e.version = ++this.versionCounter;
    }
  }

  hasDirty(): boolean {
    return this.dirtyCount > 0;
  }

  /**
   * Persists every dirty bitmap cluster. syncData must make the image data of
   * every bit set so far durable; it runs after the snapshot and before any
   * bitmap byte is written. If it fails, the unflushed bits are rolled back in
   * memory (those clusters read as before their writes) because the data they
   * describe may never reach the disk.
   */
  async writeBack(syncData: () => Promise<void>): Promise<void> {
    // Only the pages holding changed bits (the keys of `durable`) are written:
    // a 4 KiB write per flush instead of a whole bitmap cluster (64 KiB, or
    // 1 MiB with 1M clusters). Consecutive pages go in one write.
    const snapshot: Array<{
      e: Entry;
      version: number;
      runs: Array<{ lo: number; bits: Buffer }>;
    }> = [];
    for (const e of this.entries.values()) {
      if (e.version === e.savedVersion) continue;
      const valid = Math.min(this.entryBytes, this.bitmapBytes - e.index * this.entryBytes);
      const pages = [...e.durable!.keys()].sort((x, y) => x - y);
      const runs: Array<{ lo: number; bits: Buffer }> = [];
      for (let i = 0; i < pages.length;) {
        let j = i + 1;
        while (j < pages.length && pages[j] === pages[j - 1]! + 1) j++;
        const lo = pages[i]! << PAGE_SHIFT;
        const hi = Math.min(valid, (pages[j - 1]! + 1) << PAGE_SHIFT);
        runs.push({ lo, bits: Buffer.from(e.bits.subarray(lo, hi)) });
        i = j;
      }
      snapshot.push({ e, version: e.version, runs });
    }
    try {
      await syncData();
    } catch (err) {
      this.rollBack();
      throw err;
    }
    if (snapshot.length === 0) return;
    for (const { e, runs } of snapshot) {
      for (const r of runs) {
        await this.meta.write(r.bits, this.opts.offset + e.index * this.entryBytes + r.lo);
      }
    }
    await this.meta.sync();
    for (const { e, version, runs } of snapshot) {
      if (e.version === version) {
        e.savedVersion = e.version;
        e.durable = null;
        this.dirtyCount--;
      } else if (e.durable) {
        // Bits set since the snapshot stay dirty for the next write-back; the
        // pages just written are durable as in the snapshot now.
        for (const r of runs) {
          for (let at = 0; at < r.bits.length; at += WRITE_ALIGN) {
            e.durable.set((r.lo + at) >> PAGE_SHIFT, pageOf(r.bits, at >> PAGE_SHIFT));
          }
        }
      }
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

  private rollBack(): void {
    for (const e of this.entries.values()) {
      if (e.version === e.savedVersion || !e.durable) continue;
      for (const [page, saved] of e.durable) saved.copy(e.bits, page << PAGE_SHIFT);
      e.durable = null;
      e.version = e.savedVersion = ++this.versionCounter;
      this.dirtyCount--;
    }
    log.bitmap("data sync failed: rolled back unflushed bits");
  }
}

/** Page `page` of a bitmap buffer (shorter at its end); a view, not a copy. */
function pageOf(bits: Buffer, page: number): Buffer {
  const at = page << PAGE_SHIFT;
  return bits.subarray(at, Math.min(bits.length, at + WRITE_ALIGN));
}
