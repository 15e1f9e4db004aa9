/**
 * Model-based property test of the add-cow engine: random sequences of reads,
 * writes (any offset and length, across clusters, concurrent ones), flushes and
 * close/reopen, checked against an in-memory model of the disk, over raw and
 * add-cow backing files, chains, no backing, a disk larger than its backing,
 * and a bitmap cache small enough to evict.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import fc from "fast-check";
import { afterAll, describe, expect, it } from "vitest";
import type { AddCowDevice } from "../../src/addcow/addcow-device";
import { createDisk } from "../../src/ops/create";
import { openDisk } from "../../src/chain/open-chain";
import type { ExtentKind } from "../../src/block/block-device";
import { forEachExtent } from "../../src/block/extents";
import { jitterOpener, prng } from "../helpers/jitter-io";
import { SparseModel, bufferBaseline } from "../helpers/sparse-model";

const root = fs.mkdtempSync(path.join(os.tmpdir(), "addcow-model-"));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
let caseNo = 0;

function pattern(seed: number, length: number): Buffer {
  const rnd = prng(seed);
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i += 4) {
    const v = (rnd() * 0x100000000) >>> 0;
    for (let k = 0; k < 4 && i + k < length; k++) buf[i + k] = (v >>> (8 * k)) & 0xff;
  }
  return buf;
}

const sha = (file: string) => createHash("sha256").update(fs.readFileSync(file)).digest("hex");

interface Layout {
  clusterSize: number;
  /** Disk size in bytes. */
  size: number;
  /** Raw backing size in bytes; 0 = no backing file. */
  backingSize: number;
  /** Put an add-cow layer (with random writes of its own) between the raw base and the disk. */
  chain: boolean;
  bitmapCacheBytes?: number;
}

type Op =
  | { kind: "write"; at: number; len: number; seed: number }
  | { kind: "read"; at: number; len: number }
  | { kind: "batch"; ops: Array<{ write: boolean; at: number; len: number; seed: number }> }
  | { kind: "flush" }
  | { kind: "reopen" };

// Uniform fractions (fc.double favours extreme values, which would pin every offset near 0).
const frac = fc.integer({ min: 0, max: 999_999 }).map((v) => v / 1e6);
const writeArb = fc.record({
  kind: fc.constant("write" as const),
  at: frac,
  len: frac,
  seed: fc.integer(),
});
const readArb = fc.record({ kind: fc.constant("read" as const), at: frac, len: frac });
const batchArb = fc.record({
  kind: fc.constant("batch" as const),
  ops: fc.array(fc.record({ write: fc.boolean(), at: frac, len: frac, seed: fc.integer() }), {
    minLength: 2,
    maxLength: 8,
  }),
});
const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 6, arbitrary: writeArb },
  { weight: 4, arbitrary: readArb },
  { weight: 3, arbitrary: batchArb },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "reopen" as const }) },
);

/** Turns fractions into a byte range inside the disk; lengths up to ~3 clusters. */
function range(layout: Layout, at: number, len: number): [number, number] {
  // Bias a third of the offsets onto cluster boundaries and the disk's end.
  const cs = layout.clusterSize;
  let offset = Math.floor(at * layout.size);
  if (Math.floor(at * 1000) % 3 === 0) offset -= offset % cs;
  const length = Math.max(1, Math.min(layout.size - offset, 1 + Math.floor(len * 3 * cs)));
  return [offset, length];
}

async function buildDisk(layout: Layout, seed: number) {
  const dir = path.join(root, `case-${caseNo++}`);
  fs.mkdirSync(dir);
  const file = path.join(dir, "disk.add-cow");
  let backing: Buffer | null = null;
  let backingFile: string | undefined;
  let backingFormat: string | undefined;
  if (layout.backingSize > 0) {
    backing = pattern(seed, layout.backingSize);
    backingFile = path.join(dir, "base.img");
    fs.writeFileSync(backingFile, backing);
    backingFormat = "raw";
  }
  if (layout.chain) {
    // A middle add-cow layer over the raw base, with some data of its own.
    const mid = path.join(dir, "mid.add-cow");
    await createDisk({ file: mid, backing: backingFile, backingFormat, size: layout.size });
    const dev = await openDisk(mid, { writable: true });
    const content = Buffer.alloc(layout.size);
    if (backing) backing.copy(content);
    const rnd = prng(seed ^ 0x5eed);
    for (let i = 0; i < 8; i++) {
      const [off, len] = range(layout, rnd(), rnd());
      const data = pattern(seed + i, len);
      await dev.write(data, off);
      data.copy(content, off);
    }
    await dev.close();
    backing = content;
    backingFile = mid;
    backingFormat = "add-cow";
  }
  await createDisk({
    file,
    backing: backingFile,
    backingFormat,
    clusterSize: layout.clusterSize,
    size: layout.size,
  });
  const guarded = fs.readdirSync(dir).filter((f) => f !== "disk.add-cow" && f !== "disk.raw");
  const before = new Map(guarded.map((f) => [f, sha(path.join(dir, f))]));
  const model = new SparseModel(layout.size, bufferBaseline(backing));
  const checkBackingUnchanged = () => {
    for (const [f, h] of before) expect(sha(path.join(dir, f)), `${f} was modified`).toBe(h);
  };
  return { file, model, checkBackingUnchanged };
}

async function runOps(layout: Layout, seed: number, ops: Op[]): Promise<void> {
  const { file, model, checkBackingUnchanged } = await buildDisk(layout, seed);
  const opener = jitterOpener(prng(seed * 7 + 1));
  const open = () =>
    openDisk(file, { writable: true, opener, bitmapCacheBytes: layout.bitmapCacheBytes });
  let dev: AddCowDevice = await open();
  const cs = layout.clusterSize;
  /** Clusters written at least once: the engine must report them as this layer's data. */
  const written = new Set<number>();
  const noteWrite = (off: number, len: number) => {
    for (let c = Math.floor(off / cs); c < Math.ceil((off + len) / cs); c++) written.add(c);
  };
  // Unwritten clusters come from the layer below (its size), zeros past it.
  const below = layout.chain ? layout.size : layout.backingSize;
  const expectedKind = (pos: number): ExtentKind =>
    written.has(Math.floor(pos / cs)) ? "data" : pos < below ? "backing" : "zero";
  /** Block status of [start, end) agrees byte for byte (at cluster and backing edges) with the model. */
  const verifyStatus = async (start: number, end: number) => {
    let pos = start;
    await forEachExtent(dev, start, end, (e) => {
      if (e.start !== pos) throw new Error(`extent at ${e.start}, expected ${pos}`);
      // Kinds only change at cluster boundaries and at the end of the layer below.
      for (
        let p = e.start;
        p < e.start + e.length;
        p = Math.min(
          e.start + e.length,
          (Math.floor(p / cs) + 1) * cs,
          p < below ? below : Infinity,
        )
      ) {
        if (expectedKind(p) !== e.kind) {
          throw new Error(`blockStatus says ${e.kind} at ${p}, the model ${expectedKind(p)}`);
        }
      }
      pos = e.start + e.length;
    });
    if (pos !== end) throw new Error(`extents end at ${pos}, expected ${end}`);
  };
  const verify = async (offset: number, length: number) => {
    const got = Buffer.alloc(length);
    await dev.read(got, offset);
    if (!got.equals(model.read(length, offset))) {
      throw new Error(`read [${offset}, +${length}) differs from the model`);
    }
  };
  try {
    for (const op of ops) {
      switch (op.kind) {
        case "write": {
          const [off, len] = range(layout, op.at, op.len);
          const data = pattern(op.seed, len);
          await dev.write(data, off);
          model.write(data, off);
          noteWrite(off, len);
          break;
        }
        case "read": {
          const [off, len] = range(layout, op.at, op.len);
          await verify(off, len);
          await verifyStatus(off, off + len);
          break;
        }
        case "batch": {
          // Concurrent requests; writes never overlap each other (their order
          // would be undefined) but may share clusters; reads that overlap a
          // write of the same batch are not checked.
          const writes: Array<[number, number, Buffer]> = [];
          const reads: Array<[number, number]> = [];
          const overlaps = (o: number, l: number) =>
            writes.some(([wo, wl]) => o < wo + wl && wo < o + l);
          for (const r of op.ops) {
            const [off, len] = range(layout, r.at, r.len);
            if (r.write) {
              if (!overlaps(off, len)) writes.push([off, len, pattern(r.seed, len)]);
            } else reads.push([off, len]);
          }
          const checked = reads.filter(([o, l]) => !overlaps(o, l));
          const expected = checked.map(([o, l]) => model.read(l, o));
          const results = checked.map(([, l]) => Buffer.alloc(l));
          await Promise.all([
            ...writes.map(([o, , d]) => dev.write(d, o)),
            ...checked.map(([o], i) => dev.read(results[i]!, o)),
            ...reads
              .filter(([o, l]) => overlaps(o, l))
              .map(([o, l]) => dev.read(Buffer.alloc(l), o)),
          ]);
          for (const [o, , d] of writes) {
            model.write(d, o);
            noteWrite(o, d.length);
          }
          checked.forEach(([o, l], i) => {
            if (!results[i]!.equals(expected[i]!)) {
              throw new Error(`concurrent read [${o}, +${l}) differs from the model`);
            }
          });
          break;
        }
        case "flush":
          await dev.flush();
          break;
        case "reopen":
          await dev.close();
          dev = await open();
          break;
      }
    }
    await dev.close();
    dev = await open();
    // Everything survives a close and reopen.
    if (layout.size <= 8 << 20) {
      await verify(0, layout.size);
      await verifyStatus(0, layout.size);
    } else {
      for (const off of model.writtenPages()) await verify(off, Math.min(4096, layout.size - off));
      await verifyStatus(0, layout.size);
    }
  } finally {
    await dev.close();
  }
  checkBackingUnchanged();
}

const runs = Number(process.env.ADDCOW_MODEL_RUNS ?? 25);
const opsArb = fc.array(opArb, { minLength: 20, maxLength: 80 });
const layouts: Record<string, fc.Arbitrary<Layout>> = {
  "raw backing, disk as large as the backing": fc
    .record({ cb: fc.constantFrom(12, 16), extra: fc.integer({ min: 1, max: 600_000 }) })
    .map(({ cb, extra }) => ({
      clusterSize: 2 ** cb,
      size: 2 ** cb * 8 + extra,
      backingSize: 2 ** cb * 8 + extra,
      chain: false,
    })),
  "disk larger than its raw backing (zeros past its end)": fc
    .record({ cb: fc.constantFrom(12, 16), b: fc.integer({ min: 1, max: 300_000 }) })
    .map(({ cb, b }) => ({
      clusterSize: 2 ** cb,
      size: b + 2 ** cb * 5 + 777,
      backingSize: b,
      chain: false,
    })),
  "no backing file": fc
    .constantFrom(12, 16)
    .map((cb) => ({ clusterSize: 2 ** cb, size: 2 ** cb * 9 + 123, backingSize: 0, chain: false })),
  "chain: raw base -> add-cow -> add-cow": fc
    .record({ cb: fc.constantFrom(12, 16), extra: fc.integer({ min: 0, max: 200_000 }) })
    .map(({ cb, extra }) => ({
      clusterSize: 2 ** cb,
      size: 400_000 + extra,
      backingSize: 300_000,
      chain: true,
    })),
};

describe("add-cow engine against a model", () => {
  for (const [name, layoutArb] of Object.entries(layouts)) {
    it(
      name,
      async () => {
        await fc.assert(
          fc.asyncProperty(layoutArb, fc.integer(), opsArb, (layout, seed, ops) =>
            runOps(layout, seed, ops),
          ),
          { numRuns: runs },
        );
      },
      300_000,
    );
  }

  it("evicts and reloads bitmap clusters of a large sparse disk", async () => {
    // 4 KiB clusters: one bitmap cluster covers 128 MiB; a 700 MiB disk has six,
    // and a cache of two forces dirty evictions through the ordered flush.
    const layout: Layout = {
      clusterSize: 4096,
      size: 700 * 2 ** 20 + 1234,
      backingSize: 2 ** 20,
      chain: false,
      bitmapCacheBytes: 1,
    };
    await fc.assert(
      fc.asyncProperty(fc.integer(), opsArb, (seed, ops) => runOps(layout, seed, ops)),
      { numRuns: Math.max(3, Math.floor(runs / 3)) },
    );
  }, 300_000);
});
