import type { ChangeEntry, LogEntry } from "./recording-io";
import { SparseBytes } from "./memory-io";

export const SECTOR = 512;

/** Small seeded PRNG (mulberry32): the same seed gives the same workload and crash states. */
export class Rng {
  private state: number;
  constructor(readonly seed: number) {
    this.state = seed >>> 0;
  }
  next(): number {
    this.state = (this.state + 0x6d2b79f5) >>> 0;
    let t = this.state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(items: readonly T[]): T {
    return items[Math.floor(this.next() * items.length)]!;
  }
  bytes(n: number): Buffer {
    const b = Buffer.allocUnsafe(n);
    for (let i = 0; i < n; i++) b[i] = Math.floor(this.next() * 256);
    return b;
  }
}

/** What a crash did to one write that was not yet synced. */
export type Fate =
  | { kind: "kept" }
  | { kind: "dropped" }
  /** Only these sectors (indexes relative to the write's first sector) reached the disk. */
  | { kind: "torn"; sectors: number[] };

export interface CrashState {
  /** Log entries [0, point) happened before the power went. */
  point: number;
  files: Map<string, SparseBytes>;
  /** The unsynced writes (and size changes) and what happened to each: for messages. */
  pending: Array<{ write: ChangeEntry; fate: Fate }>;
}

export interface CrashOptions {
  /** Crash points to use; default every point 0..log.length. */
  points?: number[];
  /** Up to 2^this many pending writes, every keep/drop subset is tried. */
  exhaustiveUpTo?: number;
  /** Random variants per point when there are more pending writes. */
  samplesPerPoint?: number;
  /** Extra variants with torn writes per point. */
  tornPerPoint?: number;
  seed?: number;
}

/**
 * The writes (and size changes) to each file that are durable (synced) and
 * pending (may be lost) at a crash point.
 */
export function splitAt(
  log: readonly LogEntry[],
  point: number,
): { durable: ChangeEntry[]; pending: ChangeEntry[] } {
  const coveredUpTo = new Map<string, number>();
  for (let i = 0; i < point; i++) {
    const e = log[i]!;
    if (e.kind === "sync") {
      coveredUpTo.set(e.file, Math.max(coveredUpTo.get(e.file) ?? 0, e.covers));
    }
  }
  const durable: ChangeEntry[] = [];
  const pending: ChangeEntry[] = [];
  for (let i = 0; i < point; i++) {
    const e = log[i]!;
    if (e.kind !== "write" && e.kind !== "truncate") continue;
    if (e.seq < (coveredUpTo.get(e.file) ?? 0)) durable.push(e);
    else pending.push(e);
  }
  return { durable, pending };
}

/** Applies a durable write or size change. */
function apply(bytes: SparseBytes, e: ChangeEntry): void {
  if (e.kind === "truncate") bytes.truncate(e.length);
  else bytes.write(e.data, e.pos);
}

/**
 * Applies the sectors of a write that survived; a sector is all new or all
 * old, never mixed. A size change happens whole or not at all.
 */
function applyFate(bytes: SparseBytes, w: ChangeEntry, fate: Fate): void {
  if (fate.kind === "dropped") return;
  if (w.kind === "truncate") {
    bytes.truncate(w.length);
    return;
  }
  if (fate.kind === "kept") {
    bytes.write(w.data, w.pos);
    return;
  }
  const first = Math.floor(w.pos / SECTOR);
  for (const i of fate.sectors) {
    const start = Math.max(w.pos, (first + i) * SECTOR);
    const end = Math.min(w.pos + w.data.length, (first + i + 1) * SECTOR);
    if (start < end) bytes.write(w.data.subarray(start - w.pos, end - w.pos), start);
  }
}

function sectorCount(w: ChangeEntry): number {
  if (w.kind === "truncate") return 1;
  const first = Math.floor(w.pos / SECTOR);
  return Math.ceil((w.pos + w.data.length) / SECTOR) - first;
}

function tornFate(rng: Rng, w: ChangeEntry): Fate {
  const n = sectorCount(w);
  const sectors: number[] = [];
  for (let i = 0; i < n; i++) if (rng.chance(0.5)) sectors.push(i);
  return { kind: "torn", sectors };
}

/**
 * The file states a loss of power could leave at each crash point: every
 * synced write kept; of the writes since each file's last sync, any subset
 * dropped or torn at 512-byte granularity. Each file's pending writes are
 * chosen independently (the image file and the .add-cow file sync on their own).
 * Small cases are enumerated exhaustively, large ones sampled with a seeded PRNG.
 */
export function* crashStates(
  log: readonly LogEntry[],
  initial: ReadonlyMap<string, SparseBytes>,
  opts: CrashOptions = {},
): Generator<CrashState> {
  const exhaustiveUpTo = opts.exhaustiveUpTo ?? 6;
  const samples = opts.samplesPerPoint ?? 24;
  const tornCount = opts.tornPerPoint ?? 4;
  const rng = new Rng(opts.seed ?? 1);
  const points = opts.points ?? Array.from({ length: log.length + 1 }, (_, i) => i);

  for (const point of points) {
    const { durable, pending } = splitAt(log, point);
    const base = new Map<string, SparseBytes>();
    for (const [path, bytes] of initial) base.set(path, bytes.clone());
    for (const w of durable) apply(fileOf(base, w.file), w);

    const variants: Fate[][] = [];
    const kept: Fate = { kind: "kept" };
    const dropped: Fate = { kind: "dropped" };
    if (pending.length <= exhaustiveUpTo) {
      for (let mask = 0; mask < 2 ** pending.length; mask++) {
        variants.push(pending.map((_, i) => ((mask >> i) & 1 ? kept : dropped)));
      }
    } else {
      variants.push(pending.map(() => kept));
      variants.push(pending.map(() => dropped));
      // Each file's writes all kept while the other file's are all lost, both ways round.
      const files = [...new Set(pending.map((w) => w.file))];
      for (const f of files) variants.push(pending.map((w) => (w.file === f ? kept : dropped)));
      // A prefix of the writes kept, the rest lost (the usual write-back order).
      for (let i = 0; i < 4; i++) {
        const cut = rng.int(1, pending.length - 1);
        variants.push(pending.map((_, j) => (j < cut ? kept : dropped)));
      }
      for (let i = 0; i < samples; i++) {
        variants.push(pending.map(() => (rng.chance(0.5) ? kept : dropped)));
      }
    }
    if (pending.length > 0) {
      for (let i = 0; i < tornCount; i++) {
        variants.push(
          pending.map((w) => {
            const r = rng.next();
            return r < 0.4 ? tornFate(rng, w) : r < 0.7 ? kept : dropped;
          }),
        );
      }
    }

    for (const fates of variants) {
      const files = new Map<string, SparseBytes>();
      for (const [path, bytes] of base) files.set(path, fates.length ? bytes.clone() : bytes);
      pending.forEach((w, i) => applyFate(fileOf(files, w.file), w, fates[i]!));
      applyRenames(log, point, files);
      yield { point, files, pending: pending.map((write, i) => ({ write, fate: fates[i]! })) };
    }
  }
}

/** Renames before the crash point happened (each is logged once durable), in order. */
function applyRenames(log: readonly LogEntry[], point: number, files: Map<string, SparseBytes>) {
  for (let i = 0; i < point; i++) {
    const e = log[i]!;
    if (e.kind !== "rename") continue;
    files.set(e.to, files.get(e.from) ?? new SparseBytes());
    files.delete(e.from);
  }
}

function fileOf(files: Map<string, SparseBytes>, path: string): SparseBytes {
  let f = files.get(path);
  if (!f) {
    f = new SparseBytes();
    files.set(path, f);
  }
  return f;
}

/** A short description of the lost and torn writes of a crash state, for failure messages. */
export function describeCrash(state: CrashState): string {
  const parts = state.pending.map(({ write, fate }) => {
    const name = write.file.split("/").pop();
    const what =
      write.kind === "truncate"
        ? `${name} truncate to ${write.length}`
        : `${name}@${write.pos}+${write.data.length}`;
    if (fate.kind === "torn")
      return `${what} torn(kept sectors ${fate.sectors.join(",") || "none"})`;
    return `${what} ${fate.kind}`;
  });
  return `crash at log entry ${state.point}; unsynced writes: ${parts.join("; ") || "none"}`;
}
