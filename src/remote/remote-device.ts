import { DeviceBase, type Extent, type LayerDescription } from "../block/block-device";
import { checkRange } from "../block/range";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { attempts, outOfTime, waitBoundMs } from "./attempts";
import type { ObjectCache } from "./block-cache";
import { type RemoteIdentity, pinnableText } from "../block/layer-identity";
import type { FoundManifest } from "./manifest";
import { ReadAround, SequentialDetector } from "./readahead";
import { RequestQueue, Ticket } from "./request-queue";
import type { BlockVerifier } from "./verify";
import {
  type ObjectIdentity,
  type RangeSource,
  RemoteFailure,
  describeIdentity,
  sameIdentity,
} from "./source";

export interface RemoteDeviceOptions {
  /** The cache's block files each hold this much of the object (default 1 MiB). */
  blockSize: number;
  /** The smallest aligned range a miss fetches (default 64 KiB): reads are served in these. */
  minRequestBytes: number;
  /** The most one range request asks for (adjacent misses and readahead are joined up to it). */
  maxRequestBytes: number;
  /** The most fetched ahead of one sequential stream (0: no readahead). */
  readaheadBytes: number;
  /** Range requests in flight at once. */
  maxInFlight: number;
  /** Attempts after the first for timeouts, 5xx answers and dropped connections. */
  retries: number;
  /** One attempt gives up after this long. */
  timeoutMs: number;
  /** Recently used bytes kept in memory. */
  memoryBytes: number;
  /** The persistent block cache of this object, if any. */
  cache: ObjectCache | null;
  /** Where the one line about a changed object, a failing server or a full cache goes. */
  warn: (message: string) => void;
  /** s3: the endpoint requests go to (part of the identity an overlay pins); null for http(s). */
  endpoint: string | null;
  /** The manifest of per-block digests the overlay was pinned with (remote/manifest.ts). */
  manifest: FoundManifest | null;
  /**
   * Checks every fetched block against a manifest (the pinned one, or one
   * found for verify=required) before it is used or cached; pieces are then
   * whole manifest blocks.
   */
  verifier: BlockVerifier | null;
}

const KiB = 1024;
const MiB = 1024 * KiB;
/** Pieces a miss also fetches after itself while read-around pays off (readahead.ts). */
const READ_AROUND_PIECES = 2;

export const DEFAULT_REMOTE_OPTIONS: RemoteDeviceOptions = {
  blockSize: MiB,
  minRequestBytes: 64 * KiB,
  maxRequestBytes: 8 * MiB,
  readaheadBytes: 8 * MiB,
  maxInFlight: 4,
  retries: 4,
  timeoutMs: 30_000,
  memoryBytes: 32 * MiB,
  cache: null,
  warn: (m) => process.stderr.write(`addcow: ${m}\n`),
  endpoint: null,
  manifest: null,
  verifier: null,
};

export interface RemoteStats {
  /** Read calls, and the pieces (of minRequestBytes) they touched. */
  reads: number;
  blockReads: number;
  memoryHits: number;
  cacheHits: number;
  /** Range requests sent (attempts, retries included), bytes received, and the part fetched ahead. */
  requests: number;
  bytesFetched: number;
  readaheadBytes: number;
  retries: number;
  /** Pieces fetched that did not match the manifest (their reads failed with EIO). */
  verifyFailures: number;
}

/**
 * What the device learns of one reader (a disk of a shared device has its
 * own): its sequential streams, and whether read-around pays off for it.
 */
export interface Reader {
  readonly detector: SequentialDetector;
  readonly around: ReadAround;
}

/** One request's pieces waiting for their bytes, and its place in the queue. */
interface Pending {
  data: Promise<Buffer>;
  ticket: Ticket;
}

/**
 * A read-only remote object (http, https, s3) as a block device. The object
 * is served in aligned pieces of `minRequestBytes` kept in memory and in the
 * shared persistent cache; a miss fetches only the pieces it touches, and a
 * sequential stream of reads (see readahead.ts) has the pieces ahead of it
 * fetched before it asks, in requests of up to `maxRequestBytes`. The
 * object's identity is fixed at open; an answer from a different object
 * (changed, replaced, shrunk) turns every later read into EIO instead of
 * mixing two images. A read waits at most `waitBoundMs` from when it
 * arrives, queued or not.
 */
export class RemoteDevice extends DeviceBase {
  readonly readOnly = true;
  readonly backing = null;
  readonly size: number;
  readonly stats: RemoteStats = {
    reads: 0,
    blockReads: 0,
    memoryHits: 0,
    cacheHits: 0,
    requests: 0,
    bytesFetched: 0,
    readaheadBytes: 0,
    retries: 0,
    verifyFailures: 0,
  };
  /** The longest a read waits for the server, queued or not. */
  readonly waitBoundMs: number;
  private readonly piece: number;
  private readonly memory = new Map<number, Buffer>();
  private readonly memoryPieces: number;
  private readonly inflight = new Map<number, Pending>();
  private readonly queue: RequestQueue;
  /** The reader of plain read() calls. */
  private readonly reader: Reader;
  private changed: AddCowError | null = null;
  private lastWarning = "";
  private closed = false;

  private constructor(
    private readonly source: RangeSource,
    readonly objectIdentity: ObjectIdentity,
    private readonly opts: RemoteDeviceOptions,
  ) {
    super();
    this.size = objectIdentity.size;
    // Verified blocks are fetched whole: a piece is at least one manifest block.
    this.piece = Math.max(opts.minRequestBytes, opts.verifier?.blockSize ?? 0);
    this.memoryPieces = Math.max(1, Math.floor(opts.memoryBytes / this.piece));
    this.waitBoundMs = waitBoundMs(opts);
    this.queue = new RequestQueue(opts.maxInFlight, () => outOfTime(source.name, opts));
    this.reader = this.newReader();
  }

  /**
   * A reader with a pattern of its own: the disks sharing this device
   * (shared-remote.ts) each read through one, so one disk's random reads do
   * not turn read-around off for another, nor do many disks' streams push
   * each other out of the detector.
   */
  newReader(): Reader {
    return {
      detector: new SequentialDetector({
        maxBytes: this.opts.readaheadBytes,
        minBytes: this.piece,
        size: this.size,
      }),
      // Read-around is readahead too: ADDCOW_REMOTE_READAHEAD=0 turns both off.
      around: new ReadAround(this.opts.readaheadBytes > 0 ? READ_AROUND_PIECES : 0),
    };
  }

  /** Probes the object (with retries, within the wait bound) and fixes its identity. */
  static async open(
    source: RangeSource,
    options: Partial<RemoteDeviceOptions> = {},
    cacheFor?: (identity: ObjectIdentity) => ObjectCache | null,
  ): Promise<RemoteDevice> {
    const opts = { ...DEFAULT_REMOTE_OPTIONS, ...options };
    let identity: ObjectIdentity;
    try {
      identity = await attempts(opts, source.name, null, Date.now() + waitBoundMs(opts), (s) =>
        source.probe(s),
      );
    } catch (err) {
      throw err instanceof RemoteFailure ? remoteError(err, source.name) : err;
    }
    log.remote("%s: %s", source.name, describeIdentity(identity));
    opts.verifier?.checkSize(identity.size);
    const cache = cacheFor ? cacheFor(identity) : opts.cache;
    return new RemoteDevice(source, identity, { ...opts, cache });
  }

  get name(): string {
    return this.source.name;
  }

  /** The manifest every fetched block is checked against, or null (for info and sharing). */
  get verifiedBy(): { location: string; sha256: string; blockSize: number; blocks: number } | null {
    const f = this.opts.verifier?.found;
    if (!f) return null;
    return {
      location: f.location,
      sha256: f.sha256,
      blockSize: f.manifest.blockSize,
      blocks: f.manifest.blocks,
    };
  }

  private pieceLength(p: number): number {
    return Math.min(this.piece, this.size - p * this.piece);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.readAs(this.reader, buf, offset);
  }

  /** A read of `reader`: its pattern decides readahead and read-around. */
  readAs(reader: Reader, buf: Buffer, offset: number): Promise<void> {
    try {
      checkRange(this, buf.length, offset);
      if (this.changed) throw this.changed;
    } catch (err) {
      return Promise.reject(err);
    }
    if (buf.length === 0) return Promise.resolve();
    const deadline = Date.now() + this.waitBoundMs;
    const ps = this.piece;
    const end = offset + buf.length;
    const p0 = Math.floor(offset / ps);
    const p1 = Math.ceil(end / ps);
    this.stats.reads++;
    this.stats.blockReads += p1 - p0;
    // Copies the part of piece p that the read wants.
    const into = (p: number, data: Buffer) => {
      const start = p * ps;
      const from = Math.max(offset, start);
      data.copy(buf, from - offset, from - start, Math.min(end, start + data.length) - start);
    };
    const waits: Array<Promise<void>> = [];
    const missing: number[] = [];
    for (let p = p0; p < p1; p++) {
      reader.around.read(p);
      const start = p * ps;
      const from = Math.max(offset, start);
      const to = Math.min(end, start + this.pieceLength(p));
      if (this.readLocal(p, buf.subarray(from - offset, to - offset), from - start)) continue;
      const pending = this.inflight.get(p);
      if (pending) {
        pending.ticket.promote();
        waits.push(pending.data.then((d) => into(p, d)));
      } else {
        missing.push(p);
      }
    }
    const ahead = new Set(this.aheadOf(reader, offset, buf.length, p1));
    if (missing.length > 0) for (const p of this.aroundOf(reader, missing, p1)) ahead.add(p);
    const fetched = this.fetch(missing, [...ahead], deadline);
    for (const p of missing) waits.push(fetched.get(p)!.then((d) => into(p, d)));
    if (waits.length === 0) return Promise.resolve();
    // Every piece settles before a failure is reported: the caller's buffer is not written later.
    return Promise.allSettled(waits).then((results) => {
      for (const r of results) if (r.status === "rejected") throw r.reason;
    });
  }

  /** The pieces the sequential detector wants fetched ahead of this read, not here yet. */
  private aheadOf(reader: Reader, offset: number, length: number, after: number): number[] {
    const range = reader.detector.observe(offset, length);
    if (range === null) return [];
    const out: number[] = [];
    const last = Math.ceil(range.end / this.piece);
    for (let p = Math.max(after, Math.floor(range.start / this.piece)); p < last; p++) {
      if (!this.present(p)) out.push(p);
    }
    return out;
  }

  /** Whether piece p is here or coming (memory, in flight, the cache). */
  private present(p: number): boolean {
    return (
      this.memory.has(p) ||
      this.inflight.has(p) ||
      (this.opts.cache?.has(p * this.piece, this.pieceLength(p)) ?? false)
    );
  }

  /**
   * The pieces read-around fetches after a miss, joined to its request: only
   * when the read's last piece is missing, up to the first piece that is here.
   */
  private aroundOf(reader: Reader, missing: number[], after: number): number[] {
    const n = reader.around.missed();
    if (missing[missing.length - 1] !== after - 1) return [];
    const out: number[] = [];
    const last = Math.ceil(this.size / this.piece);
    for (let p = after; p < Math.min(last, after + n) && !this.present(p); p++) {
      reader.around.fetched(p);
      out.push(p);
    }
    return out;
  }

  /**
   * Fills target with piece p's bytes from offset `at` when they are here: in
   * memory, or in the disk cache (only the chunks asked for are read and checked).
   */
  private readLocal(p: number, target: Buffer, at: number): boolean {
    const mem = this.memory.get(p);
    if (mem) {
      // Refresh its place in the LRU order.
      this.memory.delete(p);
      this.memory.set(p, mem);
      mem.copy(target, 0, at, at + target.length);
      this.stats.memoryHits++;
      return true;
    }
    if (!this.opts.cache?.read(p * this.piece + at, target)) return false;
    this.stats.cacheHits++;
    return true;
  }

  /**
   * Fetches the pieces a read misses and those wanted ahead, adjacent ones
   * joined into requests of at most maxRequestBytes (a read's pieces and the
   * readahead after them go out as one request, as Linux joins a read and its
   * readahead). Returns the promise of every missed piece.
   */
  private fetch(
    missing: number[],
    ahead: number[],
    deadline: number,
  ): Map<number, Promise<Buffer>> {
    const out = new Map<number, Promise<Buffer>>();
    const wanted = [...missing, ...ahead].sort((a, b) => a - b);
    const read = new Set(missing);
    const most = Math.max(1, Math.floor(this.opts.maxRequestBytes / this.piece));
    for (let i = 0; i < wanted.length;) {
      let j = i + 1;
      while (j < wanted.length && wanted[j] === wanted[j - 1]! + 1 && j - i < most) j++;
      const first = wanted[i]!;
      const run = wanted.slice(i, j);
      const ticket = new Ticket(run.some((p) => read.has(p)) ? "read" : "ahead", deadline);
      const unasked = run.filter((p) => !read.has(p)).reduce((t, p) => t + this.pieceLength(p), 0);
      this.fetchRun(first, first + run.length, ticket, unasked).forEach((data, k) => {
        if (read.has(first + k)) out.set(first + k, data);
        else data.catch(() => undefined); // its reader, if any, sees the failure and tries again
      });
      i = j;
    }
    return out;
  }

  private remember(p: number, data: Buffer): void {
    this.memory.set(p, data);
    if (this.memory.size > this.memoryPieces) {
      this.memory.delete(this.memory.keys().next().value as number);
    }
  }

  /**
   * Pieces [first, end) with one range request; every piece gets its own
   * promise. `unasked`: bytes of it no read asked for (readahead, read-around).
   * With a manifest each piece is checked before it is kept or cached: a
   * piece that does not match fails alone, the others of the answer are used.
   */
  private fetchRun(
    first: number,
    end: number,
    ticket: Ticket,
    unasked: number,
  ): Array<Promise<Buffer>> {
    const ps = this.piece;
    const start = first * ps;
    const stop = Math.min(this.size, end * ps);
    const whole = this.queue
      .run(ticket, () => this.fetchRange(start, stop, ticket))
      .then((data) => {
        this.stats.readaheadBytes += unasked;
        const pieces: Array<Buffer | Error> = [];
        // Runs of good pieces go to the cache in one call each.
        let run = 0;
        const store = (upTo: number) => {
          if (upTo > run)
            this.opts.cache?.put(start + run * ps, data.subarray(run * ps, upTo * ps));
        };
        for (let p = first; p < end; p++) {
          const part = data.subarray((p - first) * ps, (p - first) * ps + this.pieceLength(p));
          const bad = this.opts.verifier?.check(p * ps, part) ?? null;
          if (bad !== null) {
            this.stats.verifyFailures++;
            store(p - first);
            run = p - first + 1;
            pieces.push(bad);
            continue;
          }
          // Copied out of a longer answer, so each piece can be dropped from memory alone.
          const piece = end - first === 1 ? part : Buffer.from(part);
          this.remember(p, piece);
          pieces.push(piece);
        }
        store(end - first);
        return pieces;
      })
      .catch((err: unknown) => {
        throw err instanceof RemoteFailure ? this.failed(err) : err;
      });
    const out: Array<Promise<Buffer>> = [];
    for (let p = first; p < end; p++) {
      const data = whole
        .then((pieces) => {
          const piece = pieces[p - first]!;
          if (piece instanceof Error) throw piece;
          return piece;
        })
        .finally(() => this.inflight.delete(p));
      data.catch(() => undefined);
      this.inflight.set(p, { data, ticket });
      out.push(data);
    }
    return out;
  }

  private async fetchRange(start: number, end: number, ticket: Ticket): Promise<Buffer> {
    if (this.changed) throw this.changed;
    const ahead = ticket.priority === "ahead";
    const data = await attempts(
      this.opts,
      this.name,
      this.stats,
      ticket.deadline,
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
    );
    log.remote("%s: fetched [%d, %d)%s", this.name, start, end, ahead ? " ahead" : "");
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

  /** Resolves once no request is in flight (readahead included): for tests and a clean close. */
  async settled(): Promise<void> {
    while (this.inflight.size > 0) {
      await Promise.allSettled([...this.inflight.values()].map((p) => p.data));
    }
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
    const cache = this.opts.cache;
    const usage = cache?.usage() ?? { blocks: 0, bytes: 0 };
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
        // The size of a cache block file: by digest, one manifest block.
        blockSize: this.opts.verifier?.blockSize ?? this.opts.blockSize,
        minRequest: this.piece,
        maxRequest: this.opts.maxRequestBytes,
        readahead: this.opts.readaheadBytes,
        waitBoundMs: this.waitBoundMs,
        cacheDir: cache?.dir ?? null,
        blocks: Math.ceil(this.size / (this.opts.verifier?.blockSize ?? this.opts.blockSize)),
        cachedBlocks: usage.blocks,
        cachedBytes: usage.bytes,
        reads: s.reads,
        blockReads: s.blockReads,
        memoryHits: s.memoryHits,
        cacheHits: s.cacheHits,
        hitRate: s.blockReads === 0 ? null : Math.round((hits * 10000) / s.blockReads) / 100,
        requests: s.requests,
        bytesFetched: s.bytesFetched,
        readaheadBytes: s.readaheadBytes,
        retries: s.retries,
        cacheStoreFailures: cache?.stats.storeFailures ?? 0,
        verifiedBy: this.verifiedBy,
        verifyFailures: this.stats.verifyFailures,
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
