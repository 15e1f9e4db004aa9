import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { AddCowDevice, CacheMode } from "../../src/addcow/addcow-device";
import { createDisk } from "../../src/ops/create";
import { openDisk } from "../../src/chain/open-chain";
import { openPosixFile } from "../../src/block/file-io";
import { DiskModel, orderViolations } from "../helpers/crash-model";
import { FaultInjector } from "../helpers/fault-io";
import { MemoryFs, SparseBytes, createMemoryDisk, openDiskVia } from "../helpers/memory-io";
import { Rng, SECTOR, crashStates, describeCrash } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { runWorkload } from "../helpers/workload";

const CS = 4096;
const CLUSTERS = 8;
const SIZE = CS * CLUSTERS;

let dir: string;
let files: { addcow: string; image: string; backing: string };
let backingData: Buffer;
let faults: FaultInjector;
const open: AddCowDevice[] = [];

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "addcow-faults-"));
  files = {
    addcow: path.join(dir, "disk.add-cow"),
    image: path.join(dir, "disk.raw"),
    backing: path.join(dir, "base.raw"),
  };
  backingData = new Rng(7).bytes(SIZE);
  fs.writeFileSync(files.backing, backingData);
  await createDisk({
    file: files.addcow,
    backing: files.backing,
    backingFormat: "raw",
    clusterSize: CS,
  });
  faults = new FaultInjector();
});

afterEach(async () => {
  faults.clear();
  for (const d of open.splice(0)) await d.close().catch(() => undefined);
  fs.rmSync(dir, { recursive: true, force: true });
});

async function openFaulty(cacheMode?: CacheMode): Promise<AddCowDevice> {
  const dev = await openDisk(files.addcow, {
    writable: true,
    cacheMode,
    opener: faults.opener(openPosixFile),
  });
  open.push(dev);
  return dev;
}

async function readAll(dev: AddCowDevice): Promise<Buffer> {
  const buf = Buffer.alloc(dev.size);
  await dev.read(buf, 0);
  return buf;
}

/** The bit of cluster c as it is on disk (4 KiB clusters: HEADER_SIZE is 4096). */
function bitOnDisk(c: number): number {
  const meta = fs.readFileSync(files.addcow);
  return (meta[4096 + (c >> 3)]! >> (c & 7)) & 1;
}

function snapshot(): Buffer[] {
  return [files.addcow, files.image, files.backing].map((f) => fs.readFileSync(f));
}

/** Closes, reopens without faults and compares the whole disk with what it must hold. */
async function reopenAndExpect(dev: AddCowDevice, expected: Buffer): Promise<void> {
  await dev.close();
  const again = await openDisk(files.addcow, { writable: false });
  try {
    expect((await readAll(again)).equals(expected)).toBe(true);
  } finally {
    await again.close();
  }
  expect(fs.readFileSync(files.backing).equals(backingData)).toBe(true);
}

describe("I/O errors from the backing file", () => {
  it("EIO on a backing read goes to the reader and changes nothing", async () => {
    const dev = await openFaulty();
    const expected = Buffer.from(backingData);
    const mine = Buffer.alloc(CS, 0xab);
    await dev.write(mine, CS);
    mine.copy(expected, CS);
    await dev.flush();
    const before = snapshot();

    faults.arm({ file: "base.raw", op: "read", code: "EIO" });
    await expect(dev.read(Buffer.alloc(CS), 0)).rejects.toMatchObject({ code: "EIO" });
    await expect(dev.read(Buffer.alloc(2 * CS), 0)).rejects.toMatchObject({ code: "EIO" });
    // Allocated clusters do not need the backing file.
    const got = Buffer.alloc(CS);
    await dev.read(got, CS);
    expect(got.equals(mine)).toBe(true);
    // A first partial write needs the backing data for copy-on-write: it fails the same way.
    await expect(dev.write(Buffer.alloc(10, 1), 2 * CS + 5)).rejects.toMatchObject({
      code: "EIO",
    });
    await dev.flush();
    expect(snapshot()).toEqual(before);
    expect(bitOnDisk(2)).toBe(0);

    faults.clear();
    expect((await readAll(dev)).equals(expected)).toBe(true);
    await reopenAndExpect(dev, expected);
  });
});

describe.each(["EIO", "ENOSPC"] as const)("%s from the image file", (code) => {
  it.each([false, true])(
    "a copy-on-write that fails (short write: %s) reports it and leaves the bit 0",
    async (partial) => {
      const dev = await openFaulty();
      const expected = Buffer.from(backingData);
      faults.arm({ file: "disk.raw", op: "write", code, partial });
      await expect(dev.write(Buffer.alloc(100, 0x11), 3 * CS + 700)).rejects.toMatchObject({
        code,
      });
      await expect(dev.write(Buffer.alloc(2 * CS, 0x12), 4 * CS)).rejects.toMatchObject({ code });
      expect((await readAll(dev)).equals(expected)).toBe(true);
      await dev.flush();
      expect(bitOnDisk(3)).toBe(0);
      expect(bitOnDisk(4)).toBe(0);
      expect(bitOnDisk(5)).toBe(0);

      // Once the fault is gone the same writes work, and nothing of the failed ones shows.
      faults.clear();
      const data = Buffer.alloc(100, 0x21);
      await dev.write(data, 3 * CS + 700);
      data.copy(expected, 3 * CS + 700);
      await dev.flush();
      expect(bitOnDisk(3)).toBe(1);
      expect(bitOnDisk(4)).toBe(0);
      expect((await readAll(dev)).equals(expected)).toBe(true);
      await reopenAndExpect(dev, expected);
    },
  );

  it("a failing write to an allocated cluster reports it; the disk works afterwards", async () => {
    const dev = await openFaulty();
    const expected = Buffer.from(backingData);
    const first = Buffer.alloc(CS, 0x31);
    await dev.write(first, 0);
    first.copy(expected, 0);
    await dev.flush();
    faults.arm({ file: "disk.raw", op: "write", code, times: 1 });
    await expect(dev.write(Buffer.alloc(CS, 0x32), 0)).rejects.toMatchObject({ code });
    expect((await readAll(dev)).equals(expected)).toBe(true);
    const second = Buffer.alloc(CS, 0x33);
    await dev.write(second, 0);
    second.copy(expected, 0);
    await reopenAndExpect(dev, expected);
  });
});

describe("failing syncs", () => {
  it.each(["EIO", "ENOSPC"] as const)(
    "an image sync error (%s) goes to flush; every later flush fails until the disk is reopened",
    async (code) => {
      const dev = await openFaulty();
      const expected = Buffer.from(backingData);
      const flushed = Buffer.alloc(CS, 0x40);
      await dev.write(flushed, 1 * CS);
      flushed.copy(expected, 1 * CS);
      await dev.flush();
      const metaBefore = fs.readFileSync(files.addcow);
      await dev.write(Buffer.alloc(300, 0x41), 4 * CS + 100);
      await dev.write(Buffer.alloc(CS, 0x42), 5 * CS);
      faults.arm({ file: "disk.raw", op: "sync", code, times: 1 });
      await expect(dev.flush()).rejects.toMatchObject({ code, reason: "sync-failed" });
      expect(faults.injected).toHaveLength(1);
      // The kernel may have dropped those pages: a retried fdatasync would succeed without
      // them. So no later flush succeeds, and no bit is written any more (QEMU does the same).
      await expect(dev.flush()).rejects.toMatchObject({ code: "EIO", reason: "sync-failed" });
      await dev.write(Buffer.alloc(CS, 0x43), 6 * CS);
      await expect(dev.flush()).rejects.toMatchObject({ code: "EIO", reason: "sync-failed" });
      await expect(dev.close()).rejects.toMatchObject({ code: "EIO", reason: "sync-failed" });
      expect(faults.injected).toHaveLength(1);
      expect(fs.readFileSync(files.addcow).equals(metaBefore)).toBe(true);
      // Reopened, the disk holds what the last good flush made durable, and works again.
      const again = await openFaulty();
      expect((await readAll(again)).equals(expected)).toBe(true);
      const data = Buffer.alloc(CS, 0x44);
      await again.write(data, 5 * CS);
      data.copy(expected, 5 * CS);
      await again.flush();
      expect(bitOnDisk(5)).toBe(1);
      expect(bitOnDisk(4)).toBe(0);
      await reopenAndExpect(again, expected);
    },
  );

  it("with cache=writethrough the failing sync goes to the writer, and so do later writes", async () => {
    const dev = await openFaulty("writethrough");
    const expected = Buffer.from(backingData);
    faults.arm({ file: "disk.raw", op: "sync", code: "ENOSPC", times: 1 });
    await expect(dev.write(Buffer.alloc(CS, 0x51), 6 * CS)).rejects.toMatchObject({
      code: "ENOSPC",
    });
    expect(bitOnDisk(6)).toBe(0);
    await expect(dev.write(Buffer.alloc(CS, 0x52), 6 * CS)).rejects.toMatchObject({
      code: "EIO",
    });
    expect(bitOnDisk(6)).toBe(0);
    await expect(dev.close()).rejects.toMatchObject({ code: "EIO" });
    const again = await openFaulty("writethrough");
    const data = Buffer.alloc(CS, 0x53);
    await again.write(data, 6 * CS);
    data.copy(expected, 6 * CS);
    expect(bitOnDisk(6)).toBe(1);
    await reopenAndExpect(again, expected);
  });

  it.each([
    ["sync", "EIO"],
    ["sync", "ENOSPC"],
    ["write", "EIO"],
    ["write", "ENOSPC"],
  ] as const)(
    "a failing %s of the .add-cow file (%s) goes to flush; the bits stay and a later flush persists them",
    async (op, code) => {
      const dev = await openFaulty();
      const expected = Buffer.from(backingData);
      const data = Buffer.alloc(200, 0x61);
      await dev.write(data, 7 * CS + 40);
      data.copy(expected, 7 * CS + 40);
      faults.arm({ file: "disk.add-cow", op, code, times: 2, partial: true });
      await expect(dev.flush()).rejects.toMatchObject({ code });
      await expect(dev.flush()).rejects.toMatchObject({ code });
      // The data was synced first, so the cluster keeps reading the new data.
      expect((await readAll(dev)).equals(expected)).toBe(true);
      await dev.flush();
      expect(bitOnDisk(7)).toBe(1);
      await reopenAndExpect(dev, expected);
    },
  );

  it("a full bitmap cache whose write-back fails keeps serving; the bits are written later", async () => {
    // Three bitmap clusters (4 KiB clusters: one maps 128 MiB) and a cache of two.
    const region = CS * 8 * CS;
    const mfs = new MemoryFs();
    const paths = createMemoryDisk(mfs, { clusterBits: 12, size: 3 * region });
    const inject = new FaultInjector();
    const dev = await openDiskVia(inject.opener(mfs.opener), paths.addcow, {
      writable: true,
      bitmapCacheBytes: 2 * CS,
    });
    inject.arm({ file: "disk.add-cow", op: "write", code: "ENOSPC" });
    for (const r of [0, 1, 2, 0, 2]) await dev.write(Buffer.alloc(CS, 0x80 + r), r * region);
    const got = Buffer.alloc(CS);
    await dev.read(got, region);
    expect(got[0]).toBe(0x81);
    await expect(dev.flush()).rejects.toMatchObject({ code: "ENOSPC" });
    inject.clear();
    await dev.close();
    const again = await openDiskVia(mfs.opener, paths.addcow, { writable: false });
    for (const r of [0, 1, 2]) {
      await again.read(got, r * region);
      expect(got[0]).toBe(0x80 + r);
    }
  });

  it("a failing sync during close is reported and leaves no bit without its data", async () => {
    const dev = await openFaulty();
    await dev.write(Buffer.alloc(CS, 0x71), 2 * CS);
    faults.arm({ file: "disk.raw", op: "sync", code: "EIO" });
    await expect(dev.close()).rejects.toMatchObject({ code: "EIO" });
    faults.clear();
    expect(bitOnDisk(2)).toBe(0);
    const again = await openDisk(files.addcow, { writable: false });
    try {
      expect((await readAll(again)).equals(backingData)).toBe(true);
    } finally {
      await again.close();
    }
  });
});

interface FaultRun {
  injected: number;
  /** The disk went through a failed data sync (its close failed too). */
  failed: boolean;
}

/**
 * A random workload over an in-memory disk with faults armed by `arm` before
 * each step, then the power-loss simulator at every crash point: the order
 * rule holds, every write acknowledged before a flush that succeeded survives
 * (a failed flush takes nothing back), and the backing file is never written.
 */
async function faultSimulation(
  seed: number,
  arm: (inject: FaultInjector, rng: Rng, step: number) => void,
): Promise<FaultRun> {
  const rng = new Rng(seed * 31 + 3);
  const size = 10 * CS;
  const backing = SparseBytes.from(rng.bytes(size));
  const mfs = new MemoryFs();
  const paths = createMemoryDisk(mfs, { clusterBits: 12, size, backing });
  const initial = new Map([...mfs.files].map(([p, b]) => [p, b.clone()] as const));
  const recorder = new Recorder();
  const inject = new FaultInjector();
  const writethrough = seed % 4 === 0;
  const dev = await openDiskVia(inject.opener(recorder.opener(mfs.opener)), paths.addcow, {
    writable: true,
    cacheMode: writethrough ? "writethrough" : "writeback",
  });
  const original = (s: number) => {
    const b = Buffer.alloc(SECTOR);
    backing.read(b, s * SECTOR);
    return b;
  };
  const model = new DiskModel(size, original, writethrough);
  await runWorkload(dev, recorder, model, {
    rng,
    clusterSize: CS,
    zones: [[0, size]],
    steps: 16,
    sectorAligned: true,
    tolerateErrors: true,
    beforeStep: (step) => arm(inject, rng, step),
  });
  if (process.env.DUMP_LOG === String(seed)) {
    for (const e of recorder.log) {
      const what =
        e.kind === "write"
          ? `${e.file} @${e.pos}+${e.data.length}`
          : e.kind === "sync"
            ? `${e.file} covers ${e.covers}`
            : e.kind === "truncate"
              ? `${e.file} to ${e.length}`
              : e.kind === "rename"
                ? `${e.from} -> ${e.to}`
                : `${e.label} ${JSON.stringify(e.info)}`;
      console.log(e.seq, e.kind, what);
    }
    console.log(inject.injected);
  }
  const injected = inject.injected.length;
  inject.clear();
  const start = recorder.mark("flush-start");
  // After a failed data sync the close fails too: that disk is done until reopened.
  const closed = await dev.close().then(
    () => true,
    (err: unknown) => {
      expect(err).toMatchObject({ reason: "sync-failed" });
      return false;
    },
  );
  if (closed) model.flushed(start, recorder.mark("flush-done", { start }));

  expect(
    orderViolations(recorder.log, {
      image: paths.image,
      meta: paths.addcow,
      headerSize: 4096,
      clusterSize: CS,
      numClusters: 10,
      size,
    }),
  ).toEqual([]);
  expect(recorder.illegalWrites).toEqual([]);
  for (const state of crashStates(recorder.log, initial, {
    seed,
    samplesPerPoint: 6,
    tornPerPoint: 1,
    exhaustiveUpTo: 3,
  })) {
    const after = new MemoryFs();
    for (const [p, b] of state.files) after.set(p, b);
    const reopened = await openDiskVia(after.opener, paths.addcow, { writable: false });
    const found = await model.check(reopened, state.point, [[0, size]]);
    expect(
      found.map((v) => v.message),
      `seed ${seed}: ${describeCrash(state)}`,
    ).toEqual([]);
    expect(state.files.get(paths.backing!)!.equals(backing)).toBe(true);
  }
  return { injected, failed: !closed };
}

describe("faults during workloads (in memory, with crash states)", () => {
  it("random faults never break the order, and no flushed write is lost", async () => {
    const seeds = Number(process.env.FAULT_SIM_SEEDS ?? 8);
    let injected = 0;
    let failedDisks = 0;
    for (let seed = 1; seed <= seeds; seed++) {
      const run = await faultSimulation(seed, (inject, rng) => {
        if (!rng.chance(0.3)) return;
        inject.clear();
        inject.arm({
          file: rng.pick(["disk.raw", "disk.add-cow", "base.raw"]),
          op: rng.pick(["read", "write", "sync"] as const),
          code: rng.pick(["EIO", "ENOSPC"] as const),
          nth: rng.int(1, 3),
          times: rng.int(1, 2),
          partial: rng.chance(0.5),
        });
      });
      injected += run.injected;
      if (run.failed) failedDisks++;
    }
    // The faults really fired, and some disks went through a failed data sync.
    expect(injected).toBeGreaterThan(seeds);
    expect(failedDisks).toBeGreaterThan(0);
  });

  // Every kind of write and sync of both files fails, once or for good, with either code.
  const matrix = (["disk.raw", "disk.add-cow"] as const).flatMap((file) =>
    (["write", "sync"] as const).flatMap((op) =>
      (["EIO", "ENOSPC"] as const).map((code) => [file, op, code] as const),
    ),
  );
  it.each(matrix)("%s %s failing with %s keeps every flushed write", async (file, op, code) => {
    let injected = 0;
    let failed = 0;
    for (const seed of [11, 12, 13, 16]) {
      const run = await faultSimulation(seed, (inject, _rng, step) => {
        if (step === 3) inject.arm({ file, op, code, nth: 1, times: seed % 2 ? 2 : 6 });
        if (step === 10) inject.clear();
      });
      injected += run.injected;
      if (run.failed) failed++;
    }
    expect(injected).toBeGreaterThan(0);
    // Only a failed image sync ends the disk; a failed bitmap write or sync is retried.
    if (file === "disk.raw" && op === "sync") expect(failed).toBeGreaterThan(0);
    else expect(failed).toBe(0);
  });
});

describe("the fault injector itself", () => {
  it("fails the n-th operation of the chosen file, `times` times, until cleared", async () => {
    const mfs = new MemoryFs();
    mfs.set("/d/x.raw", Buffer.alloc(4096));
    mfs.set("/d/y.raw", Buffer.alloc(4096));
    const inject = new FaultInjector();
    const open = inject.opener(mfs.opener);
    const x = await open("/d/x.raw", "write");
    const y = await open("/d/y.raw", "write");
    inject.arm({ file: "x.raw", op: "write", code: "ENOSPC", nth: 2, times: 2 });
    const buf = Buffer.alloc(1024, 9);
    const outcome = async (f: typeof x) =>
      f.write(buf, 0).then(
        () => "ok",
        (e: NodeJS.ErrnoException) => e.code,
      );
    expect([await outcome(x), await outcome(y), await outcome(x), await outcome(x)]).toEqual([
      "ok",
      "ok",
      "ENOSPC",
      "ENOSPC",
    ]);
    expect(await outcome(x)).toBe("ok");
    inject.arm({ file: "x.raw", op: "sync", code: "EIO" });
    await expect(x.sync()).rejects.toMatchObject({ code: "EIO", syscall: "fdatasync" });
    await expect(x.sync()).rejects.toMatchObject({ code: "EIO" });
    inject.clear();
    await expect(x.sync()).resolves.toBeUndefined();
    // A short write leaves whole sectors, about half, behind.
    inject.arm({ file: "y.raw", op: "write", code: "EIO", partial: true });
    await expect(y.write(Buffer.alloc(2048, 7), 0)).rejects.toMatchObject({ code: "EIO" });
    const back = Buffer.alloc(2048);
    await y.read(back, 0);
    expect(back.subarray(0, 1024).every((v) => v === 7)).toBe(true);
    expect(back.subarray(1024).every((v) => v === 0)).toBe(true);
  });
});
