import { EventEmitter } from "node:events";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";

/**
 * The copying core of every block job, shaped after QEMU's mirror job: the
 * work is cut into chunks (a multiple of the granularity), up to `inFlight`
 * chunks are copied at once, each into a buffer from a fixed pool, so memory
 * never grows with the disk. The next chunk comes from `findRun`, which scans
 * the bitmap by runs; an in-flight map keeps two copies of the same cluster
 * from running at once.
 */
export interface CopyWork {
  clusterSize: number;
  numClusters: number;
  /** Disk size in bytes (the last cluster may be partial). */
  size: number;
  /** Next run of clusters needing work in [from, numClusters), at most maxLen long; null when none. */
  findRun(from: number, maxLen: number): Promise<[number, number] | null>;
  /** Copies clusters [c0, c1) using buf (at least as long as the chunk). */
  copy(c0: number, c1: number, buf: Buffer): Promise<void>;
  /** Makes progress durable (flush); called every checkpointMs and at the end. */
  checkpoint?(): Promise<void>;
}

export interface CopyOptions {
  /** Copies running at once (default 16). */
  inFlight?: number;
  /** Bytes of buffer shared by all copies (default 16 MiB). */
  bufSize?: number;
  /** Chunk alignment in bytes: a multiple of the cluster size (default the cluster size). */
  granularity?: number;
  /** Bytes per second; 0 or undefined means no limit. */
  speed?: number;
  /** Interval between checkpoints (flushes) in ms (default 500). */
  checkpointMs?: number;
  /** Bytes of work in total, for progress (default: all clusters). */
  total?: number;
}

export const DEFAULT_IN_FLIGHT = 16;
export const DEFAULT_BUF_SIZE = 16 * 1024 * 1024;
/** How often a job flushes, so a kill or power loss loses at most this much copying. */
export const DEFAULT_CHECKPOINT_MS = 500;

export interface CopyProgress {
  /** Bytes handled so far (copied, or found done meanwhile by someone else). */
  done: number;
  total: number;
  /** Bytes per second over the last few seconds. */
  rate: number;
  inFlight: number;
  /** Most copies that ran at once. */
  peakInFlight: number;
}

export type CopyOutcome = "completed" | "cancelled";

/** Emits "progress" (CopyProgress), "paused", "resumed". */
export class CopyEngine extends EventEmitter {
  readonly inFlightLimit: number;
  readonly chunkClusters: number;
  readonly granularityClusters: number;
  private speed: number;
  private readonly checkpointMs: number;
  private readonly pool: Buffer[] = [];
  /** Chunks being copied: start cluster -> end cluster. */
  private readonly inFlight = new Map<number, number>();
  private peak = 0;
  private done = 0;
  private total: number;
  private paused = false;
  private cancelled = false;
  private failure: unknown = null;
  /** Resolved at the next change of state (a copy ends, pause, resume, cancel). */
  private wake: () => void = () => undefined;
  private changed = Promise.resolve();
  private readonly samples: Array<[number, number]> = [];
  private lastEmit = 0;
  /** Rate limiting: bytes started since limitStart. */
  private limitStart = 0;
  private limitBytes = 0;

  constructor(
    private readonly work: CopyWork,
    opts: CopyOptions = {},
  ) {
    super();
    const cs = work.clusterSize;
    const granularity = opts.granularity ?? cs;
    if (granularity % cs !== 0 || granularity <= 0) {
      throw new AddCowError(
        `invalid granularity ${granularity}: must be a multiple of the disk's cluster size ${cs}`,
      );
    }
    this.granularityClusters = granularity / cs;
    const inFlight = Math.max(1, Math.floor(opts.inFlight ?? DEFAULT_IN_FLIGHT));
    const bufSize = Math.max(granularity, opts.bufSize ?? DEFAULT_BUF_SIZE);
    // Each copy gets an equal share of the pool, rounded down to the granularity.
    const share = Math.max(granularity, Math.floor(bufSize / inFlight / granularity) * granularity);
    this.chunkClusters = share / cs;
    const buffers = Math.max(1, Math.floor(bufSize / share));
    this.inFlightLimit = Math.min(inFlight, buffers);
    for (let i = 0; i < this.inFlightLimit; i++) this.pool.push(Buffer.allocUnsafe(share));
    this.speed = opts.speed ?? 0;
    this.checkpointMs = opts.checkpointMs ?? DEFAULT_CHECKPOINT_MS;
    this.total = opts.total ?? work.size;
    this.resetChanged();
  }

  private resetChanged(): void {
    this.changed = new Promise<void>((resolve) => (this.wake = resolve));
  }

  private notify(): void {
    const wake = this.wake;
    this.resetChanged();
    wake();
  }

  get isPaused(): boolean {
    return this.paused;
  }

  pause(): void {
    if (this.paused || this.cancelled) return;
    this.paused = true;
    this.emit("paused");
    this.notify();
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.limitBytes = 0;
    this.limitStart = Date.now();
    this.emit("resumed");
    this.notify();
  }

  /** Stops starting copies; run() resolves "cancelled" once the running ones end. */
  cancel(): void {
    if (this.cancelled) return;
    this.cancelled = true;
    this.notify();
  }

  setSpeed(bytesPerSecond: number): void {
    this.speed = bytesPerSecond;
    this.limitBytes = 0;
    this.limitStart = Date.now();
    this.notify();
  }

  progress(): CopyProgress {
    return {
      done: this.done,
      total: this.total,
      rate: this.rate(),
      inFlight: this.inFlight.size,
      peakInFlight: this.peak,
    };
  }

  private rate(): number {
    const s = this.samples;
    if (s.length < 2) return 0;
    const [t0, d0] = s[0]!;
    const [t1, d1] = s[s.length - 1]!;
    return t1 > t0 ? ((d1 - d0) * 1000) / (t1 - t0) : 0;
  }

  private record(force: boolean): void {
    const now = Date.now();
    if (!force && now - this.lastEmit < 200) return;
    this.lastEmit = now;
    this.samples.push([now, this.done]);
    while (this.samples.length > 2 && now - this.samples[0]![0] > 5000) this.samples.shift();
    this.emit("progress", this.progress());
  }

  private chunkBytes(c0: number, c1: number): number {
    const cs = this.work.clusterSize;
    return Math.min(c1 * cs, this.work.size) - c0 * cs;
  }

  /** Waits until starting `bytes` more keeps the average under the speed limit. */
  private async throttle(bytes: number): Promise<void> {
    while (this.speed > 0 && !this.cancelled && !this.paused) {
      const now = Date.now();
      if (this.limitBytes === 0) this.limitStart = now;
      const due = this.limitStart + (this.limitBytes * 1000) / this.speed;
      if (due <= now) break;
      await Promise.race([this.changed, sleep(Math.min(due - now, 250))]);
    }
    this.limitBytes += bytes;
  }

  private overlaps(c0: number, c1: number): boolean {
    for (const [s, e] of this.inFlight) if (s < c1 && c0 < e) return true;
    return false;
  }

  async run(): Promise<CopyOutcome> {
    let cursor = 0;
    let lastCheckpoint = Date.now();
    let checkpointing: Promise<void> | null = null;
    const running = new Set<Promise<void>>();
    this.record(true);
    for (;;) {
      if (this.failure || this.cancelled) break;
      if (this.paused || this.pool.length === 0) {
        await this.changed;
        continue;
      }
      // Checkpoints run beside the copies (one at a time): copying never waits for a sync.
      if (
        this.work.checkpoint &&
        !checkpointing &&
        Date.now() - lastCheckpoint >= this.checkpointMs
      ) {
        lastCheckpoint = Date.now();
        checkpointing = this.work.checkpoint().then(
          () => {
            checkpointing = null;
            lastCheckpoint = Date.now();
          },
          (err: unknown) => {
            checkpointing = null;
            this.failure ??= err;
          },
        );
      }
      // Chunks end on a granularity boundary and hold at most one buffer.
      const g = this.granularityClusters;
      const run = await this.work.findRun(cursor, this.chunkClusters);
      if (!run) break;
      const c0 = run[0];
      const alignedEnd = (Math.floor(c0 / g) + Math.ceil(this.chunkClusters / g)) * g;
      const c1 = Math.min(run[1], alignedEnd, c0 + this.chunkClusters);
      cursor = c1;
      const bytes = this.chunkBytes(c0, c1);
      await this.throttle(bytes);
      while (this.overlaps(c0, c1)) await this.changed;
      if (this.cancelled || this.failure) break;
      if (this.paused || this.pool.length === 0) {
        // Paused while waiting: this chunk is taken up again after resume.
        cursor = c0;
        continue;
      }
      const buf = this.pool.pop()!;
      this.inFlight.set(c0, c1);
      this.peak = Math.max(this.peak, this.inFlight.size);
      const p: Promise<void> = this.work
        .copy(c0, c1, buf)
        .then(
          () => {
            this.done += bytes;
            this.record(false);
          },
          (err: unknown) => {
            this.failure ??= err;
          },
        )
        .finally(() => {
          this.inFlight.delete(c0);
          this.pool.push(buf);
          running.delete(p);
          this.notify();
        });
      running.add(p);
    }
    await Promise.all(running);
    if (checkpointing) await checkpointing;
    if (this.work.checkpoint && !this.failure) await this.work.checkpoint();
    if (this.failure) throw this.failure;
    if (!this.cancelled) this.total = this.done;
    this.record(true);
    log.job(
      "copy %s: %d bytes, peak %d in flight",
      this.cancelled ? "cancelled" : "done",
      this.done,
      this.peak,
    );
    return this.cancelled ? "cancelled" : "completed";
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
