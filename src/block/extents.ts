import type { BlockDevice, Extent } from "./block-device";

/**
 * Calls fn for each extent of [start, end) as the device reports it, asking
 * again wherever an answer stops short. Neighbours of the same kind are merged
 * so fn sees maximal extents.
 */
export async function forEachExtent(
  dev: BlockDevice,
  start: number,
  end: number,
  fn: (e: Extent) => void | Promise<void>,
): Promise<void> {
  let pending: Extent | null = null;
  let pos = start;
  while (pos < end) {
    const list = await dev.blockStatus(pos, end - pos);
    if (list.length === 0 || list[0]!.start !== pos) {
      throw new Error(`blockStatus(${pos}) of ${dev.describe().name} did not start at ${pos}`);
    }
    for (const e of list) {
      const length = Math.min(e.length, end - e.start);
      if (length <= 0) continue;
      if (pending && pending.kind === e.kind && pending.start + pending.length === e.start) {
        pending.length += length;
      } else {
        if (pending) await fn(pending);
        pending = { start: e.start, length, kind: e.kind };
      }
      pos = e.start + length;
    }
  }
  if (pending) await fn(pending);
}

/** Bytes of [start, end) whose extents have one of the given kinds. */
export async function bytesOfKind(
  dev: BlockDevice,
  kinds: ReadonlyArray<Extent["kind"]>,
  start = 0,
  end = dev.size,
): Promise<number> {
  let bytes = 0;
  await forEachExtent(dev, start, end, (e) => {
    if (kinds.includes(e.kind)) bytes += e.length;
  });
  return bytes;
}

/** Appends an extent to a list, merging it into the last one when they touch and match. */
export function pushExtent(list: Extent[], start: number, length: number, kind: Extent["kind"]) {
  if (length <= 0) return;
  const last = list[list.length - 1];
  if (last && last.kind === kind && last.start + last.length === start) last.length += length;
  else list.push({ start, length, kind });
}

/** The chain of layers from dev down, dev first. */
export function chainOf(dev: BlockDevice): BlockDevice[] {
  const layers: BlockDevice[] = [];
  for (let d: BlockDevice | null = dev; d; d = d.backing) layers.push(d);
  return layers;
}

/** A range resolved down a chain: the layer that holds its bytes, or zeros. */
export interface ResolvedExtent {
  start: number;
  length: number;
  /** data: `layer` holds the bytes; zero: they read as zeros (known without reading). */
  kind: "data" | "zero";
  /** 0 = dev itself, 1 = its backing, ...; for zero extents, the layer that knew. */
  depth: number;
  layer: BlockDevice;
}

/**
 * Walks [start, end) of `dev` by block status, handing each `backing` range
 * down the chain until a layer holds it or it reads as zeros (a zero extent,
 * past the end of the layer below, or no layer below).
 */
export async function resolveExtents(
  dev: BlockDevice,
  start: number,
  end: number,
  fn: (e: ResolvedExtent) => void | Promise<void>,
  depth = 0,
): Promise<void> {
  await forEachExtent(dev, start, end, async (e) => {
    const { start: s, length } = e;
    const below = dev.backing;
    if (e.kind !== "backing" || !below) {
      await fn({ start: s, length, kind: e.kind === "data" ? "data" : "zero", depth, layer: dev });
      return;
    }
    const split = Math.min(s + length, Math.max(s, below.size));
    if (split > s) await resolveExtents(below, s, split, fn, depth + 1);
    if (split < s + length) {
      await fn({ start: split, length: s + length - split, kind: "zero", depth, layer: dev });
    }
  });
}

/** The ranges of [start, end) that `dev` reads as zeros, known from block status alone. */
export async function zeroRanges(
  dev: BlockDevice,
  start: number,
  end: number,
): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  await resolveExtents(dev, start, end, (e) => {
    if (e.kind !== "zero") return;
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] = e.start + e.length;
    else out.push([e.start, e.start + e.length]);
  });
  return out;
}

/**
 * Reads [pos, pos + buf.length) of `dev` into buf, filling the ranges block
 * status says read as zeros instead of reading them (a sparse base is never
 * read where it is a hole). Returns those ranges.
 */
export async function readSkippingZeros(
  dev: BlockDevice,
  buf: Buffer,
  pos: number,
): Promise<Array<[number, number]>> {
  const end = pos + buf.length;
  const zeros = await zeroRanges(dev, pos, end);
  const reads: Array<Promise<void>> = [];
  let at = pos;
  for (const [a, b] of [...zeros, [end, end] as [number, number]]) {
    if (a > at) reads.push(dev.read(buf.subarray(at - pos, a - pos), at));
    buf.fill(0, a - pos, b - pos);
    at = b;
  }
  // Every read settles before a failure is reported: buf is the caller's.
  const results = await Promise.allSettled(reads);
  for (const r of results) if (r.status === "rejected") throw r.reason;
  return zeros;
}

/**
 * The bytes of `dev` at [pos, pos + buf.length) for a copy: zeros past its end
 * (or with no device at all), and what block status says reads as zeros is
 * filled, not read (a sparse base is never read where it is a hole).
 */
export async function readSparse(dev: BlockDevice | null, buf: Buffer, pos: number): Promise<void> {
  const avail = dev ? Math.max(0, Math.min(buf.length, dev.size - pos)) : 0;
  buf.fill(0, avail);
  if (avail > 0) await readSkippingZeros(dev!, buf.subarray(0, avail), pos);
}
