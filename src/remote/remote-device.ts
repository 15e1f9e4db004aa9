import { DeviceBase, type Extent, type LayerDescription } from "../block/block-device";
import { checkRange } from "../block/range";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import type { BlockCache } from "./block-cache";
import { type RemoteIdentity, pinnableText } from "../block/layer-identity";
import type { FoundManifest } from "./manifest";
import {
  type ObjectIdentity,
  type RangeSource,
  RemoteFailure,
  describeIdentity,
  networkFailure,
  sameIdentity,
} from "./source";

export interface RemoteDeviceOptions {
  /** Reads are made in aligned blocks of this size (default 1 MiB). */
  blockSize: number;
  /** Range requests in flight at once. */
  maxInFlight: number;
  /** Adjacent missing blocks fetched by one request, at most. */
  maxRequestBlocks: number;
  /** Blocks fetched ahead of a sequential reader. */
  readaheadBlocks: number;
  /** Attempts after the first for timeouts, 5xx answers and dropped connections. */
  retries: number;
  /** One attempt gives up after this long. */
  timeoutMs: number;
  /** Recently used blocks kept in memory. */
  memoryBlocks: number;
  /** The persistent block cache of this object, if any. */
  cache: BlockCache | null;
  /** Where the one line about a changed object or a failing server goes. */
  warn: (message: string) => void;
  /** s3: the endpoint requests go to (part of the identity an overlay pins); null for http(s). */
  endpoint: string | null;
  /** The manifest of per-block digests the overlay was pinned with (remote/manifest.ts). */
  manifest: FoundManifest | null;
}

export const DEFAULT_REMOTE_OPTIONS: RemoteDeviceOptions = {
  blockSize: 1 << 20,
  maxInFlight: 4,
  maxRequestBlocks: 8,
  readaheadBlocks: 8,
  retries: 4,
  timeoutMs: 30_000,
  memoryBlocks: 32,
  cache: null,
  warn: (m) => process.stderr.write(`addcow: ${m}\n`),
  endpoint: null,
  manifest: null,
};

export interface RemoteStats {
  /** Blocks asked for by reads (not readahead). */
  blockReads: number;
  memoryHits: number;
  cacheHits: number;
  /** Range requests sent (attempts, retries included) and bytes received. */
  requests: number;
  bytesFetched: number;
  retries: number;
}

/**
 * A read-only remote object (http, https, s3) as a block device: the bytes of
 * the object, fetched in aligned blocks, kept in memory and in the shared
 * persistent cache. The object's identity is fixed at open; an answer from a
 * different object (changed, replaced, shrunk) turns every later read into EIO
 * instead of mixing two images.
 */
export class RemoteDevice extends DeviceBase {
  readonly readOnly = true;
  readonly backing = null;
  readonly size: number;
  readonly stats: RemoteStats = {
    blockReads: 0,
    memoryHits: 0,
    cacheHits: 0,
    requests: 0,
    bytesFetched: 0,
    retries: 0,
  };
  private readonly memory = new Map<number, Buffer>();
  private readonly inflight = new Map<number, Promise<Buffer>>();
  private active = 0;
  private readonly waiting: Array<() => void> = [];
  private changed: AddCowError | null = null;
  private nextSequential = -1;
  /** Where the last readahead ended. */
  private readaheadEnd = 0;
  private lastWarning = "";
  private closed = false;

  private constructor(
    private readonly source: RangeSource,
    readonly objectIdentity: ObjectIdentity,
    private readonly opts: RemoteDeviceOptions,
  ) {
    super();
    this.size = objectIdentity.size;
  }

  /** Probes the object (with retries) and fixes its identity. */
  static async open(
    source: RangeSource,
    options: Partial<RemoteDeviceOptions> = {},
    cacheFor?: (identity: ObjectIdentity) => BlockCache | null,
  ): Promise<RemoteDevice> {
    const opts = { ...DEFAULT_REMOTE_OPTIONS, ...options };
    const identity = await attempts(opts, source.name, null, (signal) => source.probe(signal));
    log.remote("%s: %s", source.name, describeIdentity(identity));
    const cache = cacheFor ? cacheFor(identity) : opts.cache;
    return new RemoteDevice(source, identity, { ...opts, cache });
  }

  get name(): string {
    return this.source.name;
  }

  private blockLength(b: number): number {
    return Math.min(this.opts.blockSize, this.size - b * this.opts.blockSize);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    try {
      checkRange(this, buf.length, offset);
      if (this.changed) throw this.changed;
    } catch (err) {
      return Promise.reject(err);
    }
    if (buf.length === 0) return Promise.resolve();
    const bs = this.opts.blockSize;
    const b0 = Math.floor(offset / bs);
    const b1 = Math.ceil((offset + buf.length) / bs);
    this.stats.blockReads += b1 - b0;
    const end = offset + buf.length;
    // Copies the part of block b that the read wants.
    const into = (b: number, data: Buffer) => {
      const blockStart = b * bs;
      const from = Math.max(offset, blockStart);
      data.copy(
        buf,
        from - offset,
        from - blockStart,
        Math.min(end, blockStart + data.length) - blockStart,
      );
    };
    const waits: Array<Promise<void>> = [];
    let missFrom = -1;
    const fetchMisses = (upTo: number) => {
      if (missFrom < 0) return;
      const first = missFrom;
      this.fetchBlocks(first, upTo).forEach((p, i) =>
        waits.push(p.then((d) => into(first + i, d))),
      );
      missFrom = -1;
    };
    for (let b = b0; b < b1; b++) {
      const blockStart = b * bs;
      const from = Math.max(offset, blockStart);
      const to = Math.min(end, blockStart + this.blockLength(b));
      if (this.readLocal(b, buf.subarray(from - offset, to - offset), from - blockStart)) {
        fetchMisses(b);
        continue;
      }
      const pending = this.inflight.get(b);
      if (pending) {
        fetchMisses(b);
        waits.push(pending.then((d) => into(b, d)));
      } else if (missFrom < 0) {
        missFrom = b;
      }
    }
    fetchMisses(b1);
    this.readahead(b0, b1);
    if (waits.length === 0) return Promise.resolve();
    // Every block settles before a failure is reported: the caller's buffer is not written later.
    return Promise.allSettled(waits).then((results) => {
      for (const r of results) if (r.status === "rejected") throw r.reason;
    });
  }

  /**
   * Fills target with block b's bytes from offset `at` when they are here: in
   * memory, or in the disk cache (only the chunks asked for are read and checked).
   */
  private readLocal(b: number, target: Buffer, at: number): boolean {
    const mem = this.memory.get(b);
    if (mem) {
      // Refresh its place in the LRU order.
      this.memory.delete(b);
      this.memory.set(b, mem);
      mem.copy(target, 0, at, at + target.length);
      this.stats.memoryHits++;
      return true;
    }
    if (!this.opts.cache?.read(b, this.blockLength(b), at, target)) return false;
    this.stats.cacheHits++;
    return true;
  }

  /**
   * Sequential readers (a read starting in the block where the previous one
   * ended) get the next blocks fetched before they ask.
   */
  private readahead(b0: number, b1: number): void {
    const sequential = b0 === this.nextSequential || b0 + 1 === this.nextSequential;
    this.nextSequential = b1;
    if (!sequential || this.opts.readaheadBlocks <= 0) return;
    const last = Math.ceil(this.size / this.opts.blockSize);
    const end = Math.min(last, b1 + this.opts.readaheadBlocks);
    // Top the window up only when half of it is used: requests of several blocks, not one each.
    if (this.readaheadEnd - b1 > this.opts.readaheadBlocks / 2) return;
    this.readaheadEnd = end;
    let missFrom = -1;
    const fetchMisses = (upTo: number) => {
      // Failures here reach whoever reads those blocks later (they retry then).
      if (missFrom >= 0) for (const p of this.fetchBlocks(missFrom, upTo)) p.catch(() => undefined);
      missFrom = -1;
    };
    for (let b = b1; b < end; b++) {
      const here = this.memory.has(b) || this.inflight.has(b) || this.opts.cache?.has(b);
      if (here) fetchMisses(b);
      else if (missFrom < 0) missFrom = b;
    }
    fetchMisses(end);
  }

  /** Blocks [first, end), in requests of at most maxRequestBlocks adjacent blocks. */
  private fetchBlocks(first: number, end: number): Array<Promise<Buffer>> {
    const out: Array<Promise<Buffer>> = [];
    for (let s = first; s < end; s += this.opts.maxRequestBlocks) {
      out.push(...this.fetchRun(s, Math.min(end, s + this.opts.maxRequestBlocks)));
    }
    return out;
  }

  private remember(b: number, data: Buffer): void {
    this.memory.set(b, data);
    if (this.memory.size > this.opts.memoryBlocks) {
      this.memory.delete(this.memory.keys().next().value as number);
    }
  }

  /** Blocks [first, end) with one range request; every block gets its own promise. */
  private fetchRun(first: number, end: number): Array<Promise<Buffer>> {
    const bs = this.opts.blockSize;
    const start = first * bs;
    const stop = Math.min(this.size, end * bs);
    // Blocks are copied out of a longer answer so each can be dropped from memory alone.
    const whole = this.limited(() => this.fetchRange(start, stop)).then((data) => {
      const blocks: Buffer[] = [];
      for (let b = first; b < end; b++) {
        const part = data.subarray((b - first) * bs, (b - first) * bs + this.blockLength(b));
        const block = end - first === 1 ? part : Buffer.from(part);
        this.remember(b, block);
        this.opts.cache?.put(b, block);
        blocks.push(block);
      }
      return blocks;
    });
    const out: Array<Promise<Buffer>> = [];
    for (let b = first; b < end; b++) {
      const p = whole.then((blocks) => blocks[b - first]!).finally(() => this.inflight.delete(b));
      p.catch(() => undefined);
      this.inflight.set(b, p);
      out.push(p);
    }
    return out;
  }

  /** At most maxInFlight requests at once; the rest wait in order. */
  private async limited<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.opts.maxInFlight) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
      this.waiting.shift()?.();
    }
  }

  private async fetchRange(start: number, end: number): Promise<Buffer> {
    if (this.changed) throw this.changed;
    const data = await attempts(
      this.opts,
      this.name,
      this.stats,
      async (signal) => {
        const answer = await this.source.fetch(start, end, signal);
        if (!sameIdentity(this.objectIdentity, answer.identity)) {
          throw new RemoteFailure(
            `${this.name} changed since the disk was opened (was ${describeIdentity(this.objectIdentity)}, now ${describeIdentity(answer.identity)})`,
            false,
            true,
          );
        }
        this.stats.bytesFetched += answer.data.length;
        return answer.data;
      },
      (f) => this.failed(f),
    );
    log.remote("%s: fetched [%d, %d)", this.name, start, end);
    return data;
  }

  /** Records a failure that reached a reader: a changed object fails every later read. */
  private failed(f: RemoteFailure): AddCowError {
    if (f.changed) {
      if (!this.changed) {
        this.changed = new AddCowError(
          `remote backing ${f.message}: refusing to read it (reads fail with EIO); the base image must not change under its overlays: restore it, or remount to use the new one if that is intended`,
          { code: "EIO", reason: "remote", file: this.name },
        );
        this.opts.warn(this.changed.message);
      }
      return this.changed;
    }
    // A read that fails is EIO to its reader, whatever the server said.
    const err = remoteError(f, this.name, "EIO");
    if (err.message !== this.lastWarning) {
      this.lastWarning = err.message;
      this.opts.warn(`${err.message} (the read fails with EIO)`);
    }
    return err;
  }

  /** Every byte is the object's own. */
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    try {
      checkRange(this, length, offset);
    } catch (err) {
      return Promise.reject(err);
    }
    return Promise.resolve(length === 0 ? [] : [{ start: offset, length, kind: "data" }]);
  }

  describe(): LayerDescription {
    const s = this.stats;
    const hits = s.memoryHits + s.cacheHits;
    return {
      // The device is the object's bytes; the overlay's backing format field says what they are.
      format: "raw",
      name: this.name,
      storage: this.name,
      files: [],
      details: {
        remote: true,
        size: this.size,
        etag: this.objectIdentity.etag,
        lastModified: this.objectIdentity.lastModified,
        blockSize: this.opts.blockSize,
        cacheDir: this.opts.cache?.dir ?? null,
        blocks: Math.ceil(this.size / this.opts.blockSize),
        cachedBlocks: this.opts.cache?.countBlocks() ?? 0,
        blockReads: s.blockReads,
        memoryHits: s.memoryHits,
        cacheHits: s.cacheHits,
        hitRate: s.blockReads === 0 ? null : Math.round((hits * 10000) / s.blockReads) / 100,
        requests: s.requests,
        bytesFetched: s.bytesFetched,
        retries: s.retries,
      },
    };
  }

  /** What an overlay pins of this object: size, validators, endpoint, manifest. */
  override identity(): Promise<RemoteIdentity> {
    const id = this.objectIdentity;
    const m = this.opts.manifest;
    return Promise.resolve({
      kind: "remote",
      size: id.size,
      etag: pinnableText(id.etag),
      lastModified: pinnableText(id.lastModified),
      endpoint: pinnableText(this.opts.endpoint),
      manifest: m === null ? null : { location: m.location, sha256: m.sha256 },
    });
  }

  write(): Promise<void> {
    return Promise.reject(
      new AddCowError(`remote backing ${this.name} is read-only`, {
        code: "EROFS",
        reason: "remote",
      }),
    );
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.opts.cache?.close();
    await this.source.close();
  }
}

/** A failure a user sees: one line, reason "remote", EIO. */
export function remoteError(f: RemoteFailure, name: string, code = f.code): AddCowError {
  return new AddCowError(`remote backing ${f.message}`, { code, reason: "remote", file: name });
}

/**
 * Runs one request with a timeout per attempt, trying again with growing
 * pauses after failures that may pass (timeouts, 5xx, dropped connections).
 */
async function attempts<T>(
  opts: RemoteDeviceOptions,
  name: string,
  stats: RemoteStats | null,
  fn: (signal: AbortSignal) => Promise<T>,
  onFailure: (f: RemoteFailure) => AddCowError = (f) => remoteError(f, name),
): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), opts.timeoutMs);
    let failure: RemoteFailure;
    try {
      if (stats) stats.requests++;
      return await fn(controller.signal);
    } catch (err) {
      failure = networkFailure(err, name, controller.signal);
    } finally {
      clearTimeout(timer);
    }
    if (!failure.retryable || attempt >= opts.retries) throw onFailure(failure);
    if (stats) stats.retries++;
    const pause = Math.min(5000, 100 * 2 ** attempt) * (0.5 + Math.random() / 2);
    log.remote("%s; attempt %d failed, trying again in %d ms", failure.message, attempt + 1, pause);
    await new Promise((resolve) => setTimeout(resolve, pause));
  }
}
