/**
 * The bitmap cache's write-back bookkeeping against a model: which bits are
 * in memory and which are on disk. A failed write-back (data sync, bitmap
 * write or .add-cow sync) drops nothing: every bit stays in memory and the next
 * successful write-back persists it.
 * Bits are spread over several pages of several bitmap clusters, the cache
 * holds fewer clusters than the bitmap has (evictions), and bits are set while
 * a write-back waits for its data sync (the snapshot race).
 */
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { BitmapCache } from "../../src/addcow/bitmap-cache";
import { MemoryFile, SparseBytes } from "../helpers/memory-io";

const CLUSTER_BITS = 12; // a bitmap cluster is 4 KiB here: 32768 disk clusters, one page
const WIDE_BITS = 15; // 32 KiB bitmap clusters: eight pages each
const OFFSET = 4096;

type Op =
  | { kind: "set"; at: number; count: number }
  | { kind: "flush"; fail: Failure; during: Array<{ at: number; count: number }> };

/** Where a write-back fails: not at all, the data sync, a bitmap write, the .add-cow sync. */
type Failure = "none" | "data" | "write" | "sync";
const failure = fc.constantFrom<Failure>("none", "none", "data", "write", "sync");

function opsFor(numClusters: number) {
  const range = fc.record({
    at: fc.integer({ min: 0, max: numClusters - 1 }),
    count: fc.integer({ min: 1, max: 40 }),
  });
  const set = range.map((r) => ({ kind: "set" as const, ...r }));
  const flush = fc.record({
    kind: fc.constant("flush" as const),
    fail: failure,
    during: fc.array(range, { maxLength: 3 }),
  });
  return fc.array(fc.oneof({ weight: 3, arbitrary: set }, { weight: 1, arbitrary: flush }), {
    minLength: 1,
    maxLength: 40,
  });
}

async function check(clusterBits: number, entries: number, capacityEntries: number, ops: Op[]) {
  const clustersPerEntry = 2 ** (clusterBits + 3);
  const numClusters = entries * clustersPerEntry;
  const file = new MemoryFile("disk.add-cow", new SparseBytes(OFFSET), true);
  let failNext: Failure = "none";
  const meta: typeof file = Object.create(file) as typeof file;
  meta.write = async (buf, pos) => {
    if (failNext === "write") {
      failNext = "none";
      // A short write: the first half reaches the file, then ENOSPC.
      await file.write(buf.subarray(0, buf.length >> 1), pos);
      throw Object.assign(new Error("ENOSPC"), { code: "ENOSPC" });
    }
    return file.write(buf, pos);
  };
  meta.sync = async () => {
    if (failNext === "sync") {
      failNext = "none";
      throw Object.assign(new Error("EIO"), { code: "EIO" });
    }
  };
  // Write-backs never overlap: the engine runs them through its flush coalescer.
  let queue: Promise<unknown> = Promise.resolve();
  const serial = (syncData: () => Promise<void>) => {
    const run = queue.then(() => cache.writeBack(syncData));
    queue = run.catch(() => undefined);
    return run;
  };
  const cache: BitmapCache = new BitmapCache(meta, {
    offset: OFFSET,
    clusterBits,
    numClusters,
    capacityBytes: capacityEntries * 2 ** clusterBits,
    onPressure: () => serial(async () => {}),
  });
  const memory = new Set<number>();
  const touched = new Set<number>();

  const clamp = (at: number, count: number): [number, number] => [
    at,
    Math.min(numClusters, at + count),
  ];
  const setBits = async (at: number, end: number) => {
    await cache.pin(at, end);
    cache.set(at, end);
    cache.unpin(at, end);
  };
  const diskBit = (c: number) => {
    const b = Buffer.alloc(1);
    file.bytes.read(b, OFFSET + (c >> 3));
    return (b[0]! >> (c & 7)) & 1;
  };
  const cached = async (c: number) => {
    await cache.pin(c, c + 1);
    const set = cache.isSet(c);
    cache.unpin(c, c + 1);
    return set;
  };

  for (const op of ops) {
    if (op.kind === "set") {
      const [at, end] = clamp(op.at, op.count);
      await setBits(at, end);
      for (let c = at; c < end; c++) {
        memory.add(c);
        touched.add(c);
      }
      continue;
    }
    const before = new Set(memory);
    // Sets racing with the data sync: those whose bitmap cluster is cached land
    // during it; the others wait for a load, which may wait for this write-back.
    const during = op.during.map((r) => clamp(r.at, r.count));
    for (const [at, end] of during) for (let c = at; c < end; c++) touched.add(c);
    let racing: Array<Promise<void>> = [];
    const flush = serial(async () => {
      racing = during.map(([at, end]) => setBits(at, end));
      for (let i = 0; i < 10; i++) await Promise.resolve();
      failNext = op.fail;
      if (op.fail === "data") throw Object.assign(new Error("EIO"), { code: "EIO" });
    });
    // A bitmap write or sync can only fail when the snapshot had something to write.
    const failed = await flush.then(
      () => false,
      () => true,
    );
    failNext = "none";
    if (op.fail === "data") expect(failed).toBe(true);
    if (op.fail === "none") expect(failed).toBe(false);
    await Promise.all(racing);
    await queue;
    // Nothing is ever dropped from memory, whatever failed.
    for (const [at, end] of during) for (let c = at; c < end; c++) memory.add(c);
    if (!failed) {
      for (const c of before) expect(diskBit(c), `cluster ${c} durable after flush`).toBe(1);
    }
    for (const c of touched) {
      expect(await cached(c), `cluster ${c} in memory`).toBe(memory.has(c));
      if (diskBit(c)) expect(memory.has(c), `cluster ${c} on disk but not in memory`).toBe(true);
    }
  }

  // A final successful write-back leaves the file equal to memory.
  await serial(async () => {});
  for (const c of touched) {
    expect(await cached(c), `cluster ${c} in memory at the end`).toBe(memory.has(c));
    expect(diskBit(c), `cluster ${c} on disk at the end`).toBe(memory.has(c) ? 1 : 0);
  }
}

describe("bitmap cache write-back, with failures", () => {
  it("one page per bitmap cluster, more clusters than the cache holds", async () => {
    await fc.assert(
      fc.asyncProperty(opsFor(3 * 2 ** (CLUSTER_BITS + 3)), (ops) =>
        check(CLUSTER_BITS, 3, 2, ops),
      ),
      { numRuns: 150 },
    );
  });

  it("several pages per bitmap cluster: a failed page is written again", async () => {
    // Bits bunched into a few pages so pages are dirtied, written and failed repeatedly.
    const pages = 2 * 8;
    const clustersPerPage = 4096 * 8;
    const ops = fc
      .array(
        fc.oneof(
          fc.record({
            kind: fc.constant("set" as const),
            at: fc.integer({ min: 0, max: pages - 1 }).map((p) => p * clustersPerPage),
            count: fc.integer({ min: 1, max: 20 }),
          }),
          fc.record({
            kind: fc.constant("flush" as const),
            fail: failure,
            during: fc.array(
              fc.record({
                at: fc.integer({ min: 0, max: pages - 1 }).map((p) => p * clustersPerPage + 30),
                count: fc.integer({ min: 1, max: 5 }),
              }),
              { maxLength: 3 },
            ),
          }),
        ),
        { minLength: 1, maxLength: 40 },
      )
      .map((list) => list as Op[]);
    await fc.assert(
      fc.asyncProperty(ops, (list) => check(WIDE_BITS, 2, 2, list)),
      { numRuns: 150 },
    );
  });
});
