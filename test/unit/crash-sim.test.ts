import { describe, expect, it } from "vitest";
import { AddCowDevice, type CacheMode } from "../../src/addcow/addcow-device";
import { DiskModel, type Violation, orderViolations } from "../helpers/crash-model";
import {
  type DeviceClass,
  MemoryFs,
  SparseBytes,
  createMemoryDisk,
  openDiskVia,
} from "../helpers/memory-io";
import { type CrashOptions, Rng, SECTOR, crashStates, describeCrash } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { runWorkload } from "../helpers/workload";

/**
 * TEST ONLY: an engine with the ordering rule broken on purpose. It writes and
 * syncs the bitmap before the image data is synced, so a power loss can leave a
 * bit at 1 over data that never reached the disk. The checker must catch it.
 */
class BitmapBeforeDataDevice extends AddCowDevice {
  protected override async flushOrdered(): Promise<void> {
    await this.bitmap.writeBack(async () => undefined);
    await this.image.sync();
  }
}

interface Scenario {
  seed: number;
  clusterBits: number;
  /** Virtual disk size. */
  size: number;
  /** Backing file size (random data inside the zones). */
  backingSize: number;
  zones: Array<[number, number]>;
  steps: number;
  cacheMode?: CacheMode;
  bitmapCacheBytes?: number;
  Device?: DeviceClass;
  copyOnRead?: boolean;
  crash?: CrashOptions;
  /** Stop checking after this many violations (the broken-engine tests need only one). */
  stopAfter?: number;
}

interface Outcome {
  states: number;
  points: number;
  writes: number;
  /** [offset, length] of every write to the .add-cow file. */
  metaWrites: Array<[number, number]>;
  /** Syncs of the .add-cow file while no flush was running: write-backs forced by eviction. */
  unaskedWriteBacks: number;
  violations: Array<Violation & { crash: string }>;
  backingProblems: string[];
  /** Bits written before their data was synced, found in the log without any crash. */
  orderProblems: string[];
}

function countUnaskedWriteBacks(recorder: Recorder, metaPath: string): number {
  let running = 0;
  let count = 0;
  for (const e of recorder.log) {
    if (e.kind === "mark" && e.label === "flush-start") running++;
    else if (e.kind === "mark" && e.label === "flush-done") running--;
    else if (e.kind === "sync" && e.file === metaPath && running === 0) count++;
  }
  return count;
}

async function simulate(s: Scenario): Promise<Outcome> {
  const rng = new Rng(s.seed);
  const cs = 2 ** s.clusterBits;
  const backing = new SparseBytes(s.backingSize);
  for (const [zs, ze] of s.zones) {
    const end = Math.min(ze, s.backingSize);
    if (zs < end) backing.write(rng.bytes(end - zs), zs);
  }
  const mfs = new MemoryFs();
  const paths = createMemoryDisk(mfs, { clusterBits: s.clusterBits, size: s.size, backing });
  const initial = new Map<string, SparseBytes>();
  for (const [p, b] of mfs.files) initial.set(p, b.clone());

  const recorder = new Recorder();
  const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, {
    writable: true,
    cacheMode: s.cacheMode,
    bitmapCacheBytes: s.bitmapCacheBytes,
    Device: s.Device,
    copyOnRead: s.copyOnRead,
  });
  const original = (sector: number) => {
    const b = Buffer.alloc(SECTOR);
    backing.read(b, sector * SECTOR);
    return b;
  };
  const model = new DiskModel(s.size, original, s.cacheMode === "writethrough");
  await runWorkload(dev, recorder, model, { rng, clusterSize: cs, zones: s.zones, steps: s.steps });
  const start = recorder.mark("flush-start");
  await dev.close();
  model.flushed(start, recorder.mark("flush-done", { start }));

  const out: Outcome = {
    states: 0,
    points: recorder.log.length + 1,
    writes: recorder.writes().length,
    unaskedWriteBacks: countUnaskedWriteBacks(recorder, paths.addcow),
    metaWrites: recorder
      .writes()
      .filter((w) => w.file === paths.addcow)
      .map((w) => [w.pos, w.data.length]),
    violations: [],
    backingProblems: [],
    orderProblems: orderViolations(recorder.log, {
      image: paths.image,
      meta: paths.addcow,
      headerSize: dev.header.headerSize,
      clusterSize: cs,
      numClusters: dev.numClusters,
      size: s.size,
    }),
  };
  if (recorder.illegalWrites.length > 0) {
    out.backingProblems.push(`writes to read-only files: ${recorder.illegalWrites.join(", ")}`);
  }
  if (recorder.writes().some((w) => w.file === paths.backing)) {
    out.backingProblems.push("the backing file received writes");
  }
  for (const state of crashStates(recorder.log, initial, { seed: s.seed, ...s.crash })) {
    out.states++;
    if (!state.files.get(paths.backing!)!.equals(backing)) {
      out.backingProblems.push(`backing changed: ${describeCrash(state)}`);
    }
    const after = new MemoryFs();
    for (const [p, b] of state.files) after.set(p, b);
    const reopened = await openDiskVia(after.opener, paths.addcow, { writable: false });
    const found = await model.check(reopened, state.point, s.zones);
    await reopened.close();
    // Keep a few per scenario: enough to explain a failure without drowning it.
    for (const v of found.slice(0, 2)) {
      if (out.violations.length < 10) out.violations.push({ ...v, crash: describeCrash(state) });
    }
    if (s.stopAfter !== undefined && out.violations.length >= s.stopAfter) break;
  }
  return out;
}

function smallScenario(seed: number, extra: Partial<Scenario> = {}): Scenario {
  const rng = new Rng(seed * 7919 + 1);
  const clusterBits = 12;
  const cs = 2 ** clusterBits;
  // 6..12 clusters; sometimes a partial last cluster; backing shorter, equal or absent-length.
  const sectors = rng.int(6, 12) * (cs / SECTOR) - (rng.chance(0.3) ? rng.int(1, 7) : 0);
  const size = sectors * SECTOR;
  const backingSize = rng.pick([size, size, Math.floor(size / 2 / SECTOR) * SECTOR, size + cs]);
  return {
    seed,
    clusterBits,
    size,
    backingSize,
    zones: [[0, size]],
    steps: 14,
    ...extra,
  };
}

function report(o: Outcome): string {
  return o.violations.map((v) => `${v.message}\n    ${v.crash}`).join("\n");
}

// Seeds are fixed so a failure reproduces; CRASH_SIM_SEEDS=n runs more of them.
const SEEDS = Number(process.env.CRASH_SIM_SEEDS ?? 10);

describe("power-loss simulation of the real engine", () => {
  it(`keeps promises 1 and 2 at every crash point (writeback, ${SEEDS} random workloads)`, async () => {
    let states = 0;
    for (let seed = 1; seed <= SEEDS; seed++) {
      const o = await simulate(smallScenario(seed));
      expect(o.writes).toBeGreaterThan(5);
      expect(o.backingProblems).toEqual([]);
      expect(o.orderProblems).toEqual([]);
      expect(report(o), `seed ${seed}`).toBe("");
      states += o.states;
    }
    expect(states).toBeGreaterThan(SEEDS * 100);
  });

  it("keeps promises 1 and 2 with copy-on-read: reads allocate clusters, racing writes win", async () => {
    let allocatedByReads = 0;
    for (let seed = 201; seed < 201 + Math.ceil(SEEDS / 2); seed++) {
      const o = await simulate(smallScenario(seed, { copyOnRead: true, steps: 16 }));
      expect(o.backingProblems).toEqual([]);
      expect(o.orderProblems).toEqual([]);
      expect(report(o), `seed ${seed}`).toBe("");
      allocatedByReads += o.writes;
    }
    expect(allocatedByReads).toBeGreaterThan(0);
  });

  it("keeps promise 3 with cache=writethrough: every acknowledged write survives", async () => {
    for (let seed = 101; seed < 101 + Math.ceil(SEEDS / 3); seed++) {
      const o = await simulate(smallScenario(seed, { cacheMode: "writethrough", steps: 10 }));
      expect(o.backingProblems).toEqual([]);
      expect(report(o), `seed ${seed}`).toBe("");
    }
  });

  it("keeps the order when a full bitmap cache evicts dirty bitmap clusters", async () => {
    // Three bitmap clusters (4 KiB clusters: one bitmap cluster maps 128 MiB) and a cache
    // of two, so writes that hop between regions force write-backs through eviction.
    const clusterBits = 12;
    const cs = 2 ** clusterBits;
    const region = cs * 8 * cs;
    const size = 3 * region;
    const zones: Array<[number, number]> = [0, 1, 2].map((r) => [r * region, r * region + 6 * cs]);
    let pressureWriteBacks = 0;
    for (const seed of [201, 202, 203]) {
      const o = await simulate({
        seed,
        clusterBits,
        size,
        backingSize: size,
        zones,
        steps: 14,
        bitmapCacheBytes: 2 * cs,
        crash: { samplesPerPoint: 8, tornPerPoint: 2 },
      });
      expect(o.backingProblems).toEqual([]);
      expect(report(o), `seed ${seed}`).toBe("");
      pressureWriteBacks += o.unaskedWriteBacks;
    }
    // Write-backs that no flush asked for: evictions of dirty bitmap clusters happened.
    expect(pressureWriteBacks).toBeGreaterThan(0);
  });
});

describe("power-loss simulation with 64 KiB clusters", () => {
  it("writes back only the dirty bitmap pages, in order, across several pages", async () => {
    // One bitmap page (4 KiB) maps 32768 clusters = 2 GiB: zones on pages 0, 1 and 3.
    const clusterBits = 16;
    const cs = 2 ** clusterBits;
    const page = 32768 * cs;
    const zones: Array<[number, number]> = [0, 1, 3].map((p) => [
      p * page + 3 * cs,
      p * page + 6 * cs,
    ]);
    const metaWrites: Array<[number, number]> = [];
    for (const seed of [301, 302]) {
      const o = await simulate({
        seed,
        clusterBits,
        size: 4 * page,
        backingSize: 4 * page,
        zones,
        steps: 8,
        crash: { samplesPerPoint: 8, tornPerPoint: 2 },
      });
      expect(o.backingProblems).toEqual([]);
      expect(o.orderProblems).toEqual([]);
      expect(report(o), `seed ${seed}`).toBe("");
      metaWrites.push(...o.metaWrites);
    }
    // Only the pages with changed bits were written, never the whole 64 KiB bitmap cluster.
    expect(metaWrites.length).toBeGreaterThan(0);
    expect(metaWrites.every(([, len]) => len < cs)).toBe(true);
    expect(metaWrites.some(([pos, len]) => pos > cs && len === 4096)).toBe(true);
  });
});

describe("the checker catches a broken engine", () => {
  it("reports bits written before the data sync", async () => {
    let caught = 0;
    const messages: string[] = [];
    for (let seed = 1; seed <= 4; seed++) {
      const o = await simulate(
        smallScenario(seed, { Device: BitmapBeforeDataDevice, stopAfter: 1 }),
      );
      if (o.violations.length > 0) caught++;
      messages.push(...o.violations.map((v) => v.message));
      expect(o.orderProblems.length).toBeGreaterThan(0);
    }
    expect(caught).toBe(4);
    // A bit that reached the disk before its data shows what the sparse image held: zeros.
    expect(messages.some((m) => m.includes("holds zeros"))).toBe(true);
  });

  it("reports a flushed write that was lost", async () => {
    // A flush that does nothing: flushed writes vanish; promise 1 must flag it.
    class NoFlushDevice extends AddCowDevice {
      protected override async flushOrdered(): Promise<void> {}
    }
    const messages: string[] = [];
    for (let seed = 1; seed <= 4; seed++) {
      const o = await simulate(smallScenario(seed, { Device: NoFlushDevice, stopAfter: 1 }));
      messages.push(...o.violations.map((v) => v.message));
    }
    expect(messages.some((m) => /although a (newer|flushed) write/.test(m))).toBe(true);
  });
});

describe("the power-loss simulator itself", () => {
  it("keeps synced writes, and tries every subset of the unsynced ones per file", async () => {
    const mfs = new MemoryFs();
    mfs.set("/a", Buffer.alloc(2048));
    mfs.set("/b", Buffer.alloc(1024));
    const initial = new Map([...mfs.files].map(([p, b]) => [p, b.clone()] as const));
    const rec = new Recorder();
    const open = rec.opener(mfs.opener);
    const a = await open("/a", "write");
    const b = await open("/b", "write");
    await a.write(Buffer.alloc(512, 1), 0);
    await a.sync();
    await a.write(Buffer.alloc(512, 2), 512);
    await b.write(Buffer.alloc(10, 3), 100); // logged as the whole sector 0 of /b
    await a.write(Buffer.alloc(1024, 4), 1024);

    const end = rec.log.length;
    const states = [...crashStates(rec.log, initial, { points: [end], tornPerPoint: 0 })];
    expect(states).toHaveLength(8);
    const seen = new Set<string>();
    for (const s of states) {
      const fa = s.files.get("/a")!.toBuffer();
      const fb = s.files.get("/b")!.toBuffer();
      expect(fa.subarray(0, 512).every((x) => x === 1)).toBe(true);
      const sector = fb.subarray(0, 512);
      // The partial write reaches the disk as a whole sector or not at all.
      expect(sector.every((x) => x === 0) || sector.subarray(100, 110).every((x) => x === 3)).toBe(
        true,
      );
      seen.add(`${fa[512]}${fa[1024]}${fb[100]}`);
    }
    expect(seen.size).toBe(8);

    // Before the sync completed, the first write may be lost too.
    const early = [...crashStates(rec.log, initial, { points: [1], tornPerPoint: 0 })];
    expect(early.map((s) => s.files.get("/a")!.toBuffer()[0]).sort()).toEqual([0, 1]);

    // Torn writes keep whole sectors only.
    const torn = [...crashStates(rec.log, initial, { points: [end], tornPerPoint: 20, seed: 5 })];
    for (const s of torn) {
      const fa = s.files.get("/a")!.toBuffer();
      for (let off = 0; off < 2048; off += 512) {
        const sec = fa.subarray(off, off + 512);
        expect(sec.every((x) => x === sec[0])).toBe(true);
      }
    }
  });
});
