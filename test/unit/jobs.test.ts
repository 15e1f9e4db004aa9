import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { openDisk } from "../../src/chain/open-chain";
import { Job } from "../../src/jobs/job";
import { overriding } from "../helpers/file-io-wrapper";
import { commitAtRest, streamAtRest } from "../../src/jobs/at-rest";
import { snapshotDisk } from "../../src/jobs/snapshot";
import { streamDisk } from "../../src/jobs/stream";
import {
  KiB,
  MiB,
  delayingOpener,
  makeChain,
  pattern,
  qemuCompareRaw,
  readAll,
  readDisk,
  scribble,
  tempDir,
} from "../helpers/jobs";

const dirs: string[] = [];
function dir(tag: string): string {
  const d = tempDir(tag);
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

async function stream(file: string, opts = {}) {
  const job = new Job("stream", file);
  const status = await job.start((j) => streamAtRest(file, j, opts));
  if (status.error) throw new Error(status.error);
  return status;
}

async function commit(file: string, opts = {}) {
  const job = new Job("commit", file);
  const status = await job.start((j) => commitAtRest(file, j, opts));
  if (status.error) throw new Error(status.error);
  return status;
}

describe("stream", () => {
  it("makes the image file byte-identical to the disk and sets all-allocated", async () => {
    const d = dir("stream");
    const size = 8 * MiB + 12345; // partial last cluster
    const { layers } = await makeChain(d, size, 1);
    const top = layers[0]!;
    await scribble(top, 7, 40);
    const before = await readDisk(top);
    const status = await stream(top, { inFlight: 4, bufSize: 1 * MiB });
    expect(status.state).toBe("completed");
    expect(status.message).toMatch(/standalone raw disk/);
    expect(status.done).toBe(status.total);
    const image = path.join(d, "layer0.raw");
    expect(fs.readFileSync(image).equals(before)).toBe(true);
    const expected = path.join(d, "expected.raw");
    fs.writeFileSync(expected, before);
    execFileSync("cmp", [image, expected]);
    qemuCompareRaw(image, expected);
    const dev = await openDisk(top);
    try {
      expect(dev.allAllocated).toBe(true);
      expect((await readAll(dev)).equals(before)).toBe(true);
    } finally {
      await dev.close();
    }
    // The backing file is no longer needed.
    fs.rmSync(path.join(d, "base.raw"));
    expect((await readDisk(top)).equals(before)).toBe(true);
  });

  it("streams a chain of three layers", async () => {
    const d = dir("stream3");
    const size = 6 * MiB;
    const { layers } = await makeChain(d, size, 3, 4 * KiB);
    await scribble(layers[0]!, 11, 30);
    await scribble(layers[1]!, 12, 30);
    await scribble(layers[2]!, 13, 30);
    const before = await readDisk(layers[2]!);
    await stream(layers[2]!, { inFlight: 16 });
    const image = path.join(d, "layer2.raw");
    const expected = path.join(d, "expected.raw");
    fs.writeFileSync(expected, before);
    qemuCompareRaw(image, expected);
    // The lower layers were only read.
    expect((await readDisk(layers[1]!)).equals(before)).toBe(false);
  });

  it("refuses a disk without backing file", async () => {
    const d = dir("nobacking");
    const { createDisk } = await import("../../src/ops/create");
    const file = path.join(d, "solo.add-cow");
    await createDisk({ file, size: MiB });
    await expect(stream(file)).rejects.toThrow(/has no backing file: there is nothing to stream/);
  });

  it("resumes after a cancel and keeps progress", async () => {
    const d = dir("resume");
    const { layers } = await makeChain(d, 8 * MiB, 1, 4 * KiB);
    const top = layers[0]!;
    const before = await readDisk(top);
    const job = new Job("stream", top);
    job.on("progress", (s: { done: number }) => {
      if (s.done > 0) job.cancel();
    });
    const first = await job.start((j) =>
      streamAtRest(top, j, { inFlight: 2, bufSize: 64 * KiB, speed: 2 * MiB }),
    );
    expect(first.state).toBe("cancelled");
    expect(first.message).toMatch(/progress is kept/);
    const dev = await openDisk(top);
    const allocated = await dev.countAllocated();
    await dev.close();
    expect(allocated).toBeGreaterThan(0);
    expect(allocated).toBeLessThan(dev.numClusters);
    const second = await stream(top);
    expect(second.total).toBeLessThan(8 * MiB);
    expect(fs.readFileSync(path.join(d, "layer0.raw")).equals(before)).toBe(true);
  });

  it("limits the speed", async () => {
    const d = dir("speed");
    const { layers } = await makeChain(d, 2 * MiB, 1, 64 * KiB);
    const t0 = Date.now();
    await stream(layers[0]!, { speed: 4 * MiB, bufSize: 256 * KiB, inFlight: 4 });
    // 2 MiB at 4 MiB/s: about half a second (the first chunk starts at once).
    expect(Date.now() - t0).toBeGreaterThan(350);
  });
});

describe("stream concurrency", () => {
  it("runs copies in parallel and a user write racing a copy survives", async () => {
    const d = dir("race");
    const { layers } = await makeChain(d, 4 * MiB, 1, 64 * KiB);
    const top = layers[0]!;
    const stats = {
      concurrentReads: 0,
      peakReads: 0,
      onRead: undefined as ((pos: number) => void) | undefined,
    };
    const opener = delayingOpener(20, (f) => f.endsWith("base.raw"), stats);
    const dev = await openDisk(top, { writable: true, opener });
    const target = 40 * 64 * KiB; // cluster 40
    const mine = pattern(10 * KiB, 99);
    let userWrite: Promise<void> | null = null;
    stats.onRead = (pos) => {
      // The copy of cluster 40 has read its backing data: race a write into that cluster.
      if (!userWrite && pos <= target && target < pos + 64 * KiB * 4) {
        userWrite = dev.write(mine, target + 1000);
      }
    };
    try {
      const job = new Job("stream", top);
      const status = await job.start((j) =>
        streamDisk(dev, j, { inFlight: 8, bufSize: 2 * MiB, granularity: 64 * KiB }),
      );
      expect(status.error).toBeUndefined();
      expect(status.peakInFlight).toBeGreaterThan(1);
      expect(stats.peakReads).toBeGreaterThan(1);
      expect(userWrite).not.toBeNull();
      await userWrite;
      const got = Buffer.alloc(mine.length);
      await dev.read(got, target + 1000);
      expect(got.equals(mine)).toBe(true);
      // The rest of that cluster is still the backing data.
      const head = Buffer.alloc(1000);
      await dev.read(head, target);
      expect(head.equals(pattern(4 * MiB, 1).subarray(target, target + 1000))).toBe(true);
    } finally {
      await dev.close();
    }
    const image = fs.readFileSync(path.join(d, "layer0.raw"));
    expect(image.subarray(target + 1000, target + 1000 + mine.length).equals(mine)).toBe(true);
  });
});

describe("commit", () => {
  it("writes the overlay into a raw backing and empties the overlay", async () => {
    const d = dir("commit");
    const size = 8 * MiB;
    const { base, layers } = await makeChain(d, size, 1);
    const top = layers[0]!;
    await scribble(top, 21, 40);
    const before = await readDisk(top);
    const status = await commit(top, { inFlight: 4 });
    expect(status.message).toMatch(/emptied the overlay/);
    expect(fs.readFileSync(base).equals(before)).toBe(true);
    const dev = await openDisk(top);
    try {
      expect(await dev.countAllocated()).toBe(0);
      expect((await readAll(dev)).equals(before)).toBe(true);
    } finally {
      await dev.close();
    }
  });

  it("--keep leaves the overlay allocated", async () => {
    const d = dir("keep");
    const { base, layers } = await makeChain(d, 4 * MiB, 1);
    const top = layers[0]!;
    await scribble(top, 22, 10);
    const before = await readDisk(top);
    const dev0 = await openDisk(top);
    const allocated = await dev0.countAllocated();
    await dev0.close();
    await commit(top, { keep: true });
    expect(fs.readFileSync(base).equals(before)).toBe(true);
    const dev = await openDisk(top);
    try {
      expect(await dev.countAllocated()).toBe(allocated);
    } finally {
      await dev.close();
    }
  });

  it("commits into an add-cow backing in a chain of three layers", async () => {
    const d = dir("commit3");
    const { base, layers } = await makeChain(d, 6 * MiB, 3, 16 * KiB);
    await scribble(layers[0]!, 31, 20);
    await scribble(layers[1]!, 32, 20);
    await scribble(layers[2]!, 33, 20);
    const baseBefore = fs.readFileSync(base);
    const top = await readDisk(layers[2]!);
    await commit(layers[2]!);
    expect((await readDisk(layers[1]!)).equals(top)).toBe(true);
    expect((await readDisk(layers[2]!)).equals(top)).toBe(true);
    // Only the first backing layer was written.
    expect(fs.readFileSync(base).equals(baseBefore)).toBe(true);
  });

  it("refuses a read-only backing file with a clear message", async () => {
    const d = dir("robacking");
    const { base, layers } = await makeChain(d, MiB, 1);
    await scribble(layers[0]!, 41, 3);
    const before = fs.readFileSync(base);
    fs.chmodSync(base, 0o444);
    const { openPosixFile } = await import("../../src/block/file-io");
    // root ignores modes; emulate what a non-root user sees.
    const opener = async (file: string, mode: "read" | "write") => {
      if (file === base && mode === "write") {
        throw Object.assign(new Error("EACCES: permission denied"), { code: "EACCES" });
      }
      return openPosixFile(file, mode);
    };
    const job = new Job("commit", layers[0]!);
    const status = await job.start((j) => commitAtRest(layers[0]!, j, {}, { opener }));
    expect(status.state).toBe("failed");
    expect(status.error).toMatch(
      /cannot commit .*backing file .*base\.raw cannot be opened for writing \(permission denied\)/,
    );
    expect(fs.readFileSync(base).equals(before)).toBe(true);
  });
});

describe("snapshot", () => {
  it("stacks a new overlay over the disk and refuses an existing file", async () => {
    const d = dir("snap");
    const { layers } = await makeChain(d, 2 * MiB, 1);
    const top = layers[0]!;
    await scribble(top, 51, 5);
    const before = await readDisk(top);
    const snap = path.join(d, "snap.add-cow");
    const msg = await snapshotDisk(top, snap);
    expect(msg).toMatch(/from now on use/);
    expect((await readDisk(snap)).equals(before)).toBe(true);
    await scribble(snap, 52, 5);
    expect((await readDisk(top)).equals(before)).toBe(true);
    await expect(snapshotDisk(top, snap)).rejects.toThrow(/already exists/);
    const other = path.join(d, "other.add-cow");
    fs.writeFileSync(path.join(d, "other.raw"), "x");
    await expect(snapshotDisk(top, other)).rejects.toThrow(
      /image file .*other\.raw already exists/,
    );
    expect(fs.existsSync(other)).toBe(false);
  });
});

describe("commit crash order", () => {
  it("syncs the backing before any bit is cleared, and a torn clear still reads the same", async () => {
    const d = dir("commitcrash");
    const { base, layers } = await makeChain(d, 8 * MiB, 1, 4 * KiB);
    const top = layers[0]!;
    await scribble(top, 61, 60, 64 * KiB);
    const before = await readDisk(top);
    const dev0 = await openDisk(top);
    const allocated = await dev0.countAllocated();
    const headerSize = dev0.header.headerSize;
    // Writes at or past the pin are the pin's (commit marks it "committing" first), not bits.
    const pinStart = dev0.pin.kind === "pinned" ? dev0.pin.areaStart : Infinity;
    await dev0.close();

    const { openPosixFile } = await import("../../src/block/file-io");
    const ops: string[] = [];
    // The first bitmap write after the copy is torn: only 16 bytes land, then the "power" fails.
    let tear = false;
    const opener = async (file: string, mode: "read" | "write") => {
      const inner = await openPosixFile(file, mode);
      const name = path.basename(file);
      return overriding(inner, {
        async write(b: Buffer, p: number) {
          ops.push(`${name} write ${p}`);
          if (name === "layer0.add-cow" && p >= headerSize && p < pinStart && tear) {
            await inner.write(b.subarray(0, 16), p);
            throw Object.assign(new Error("EIO: simulated power loss"), { code: "EIO" });
          }
          return inner.write(b, p);
        },
        async sync() {
          ops.push(`${name} sync`);
          await inner.sync();
          if (name === "base.raw") tear = true;
        },
      });
    };
    const job = new Job("commit", top);
    const status = await job.start((j) => commitAtRest(top, j, {}, { opener }));
    expect(status.state).toBe("failed");
    const firstClear = ops.findIndex(
      (o) => o.startsWith("layer0.add-cow write") && Number(o.split(" ")[2]) < pinStart,
    );
    const lastBackingWrite = ops.map((o) => o.startsWith("base.raw write")).lastIndexOf(true);
    const backingSync = ops.indexOf("base.raw sync");
    expect(lastBackingWrite).toBeGreaterThan(0);
    expect(backingSync).toBeGreaterThan(lastBackingWrite);
    expect(firstClear).toBeGreaterThan(backingSync);

    // After the crash: some bits cleared, some not, and the disk reads exactly as before.
    const dev = await openDisk(top);
    try {
      const left = await dev.countAllocated();
      expect(left).toBeLessThan(allocated);
      expect(left).toBeGreaterThan(0);
      expect((await readAll(dev)).equals(before)).toBe(true);
    } finally {
      await dev.close();
    }
    // Running commit again finishes the job.
    await commit(top);
    expect(fs.readFileSync(base).equals(before)).toBe(true);
    expect((await readDisk(top)).equals(before)).toBe(true);
  });
});

describe("copy engine", () => {
  it("stops copying while paused and finishes after resume", async () => {
    const { CopyEngine } = await import("../../src/jobs/copy-engine");
    const copied: number[] = [];
    const engine = new CopyEngine(
      {
        clusterSize: 4096,
        numClusters: 64,
        size: 64 * 4096,
        findRun: async (from) => (from < 64 ? [from, 64] : null),
        copy: async (c0) => {
          copied.push(c0);
          await new Promise((r) => setTimeout(r, 5));
        },
      },
      { inFlight: 2, bufSize: 8192 },
    );
    expect(engine.chunkClusters).toBe(1);
    expect(engine.inFlightLimit).toBe(2);
    engine.pause();
    const running = engine.run();
    await new Promise((r) => setTimeout(r, 50));
    expect(copied.length).toBe(0);
    engine.resume();
    await new Promise((r) => setTimeout(r, 30));
    engine.pause();
    await new Promise((r) => setTimeout(r, 30));
    const whilePaused = copied.length;
    expect(whilePaused).toBeGreaterThan(0);
    await new Promise((r) => setTimeout(r, 50));
    expect(copied.length).toBe(whilePaused);
    engine.resume();
    expect(await running).toBe("completed");
    expect([...copied].sort((a, b) => a - b)).toEqual([...Array(64).keys()]);
    expect(engine.progress().done).toBe(64 * 4096);
    expect(engine.progress().peakInFlight).toBe(2);
  });
});
