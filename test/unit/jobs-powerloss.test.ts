import { describe, expect, it } from "vitest";
import { commitDisk } from "../../src/jobs/commit";
import { Job } from "../../src/jobs/job";
import { streamDisk } from "../../src/jobs/stream";
import {
  MemoryFs,
  type SparseBytes,
  createMemoryDisk,
  openDiskVia,
  scribbleAndKeep,
} from "../helpers/memory-io";
import { Rng, crashStates, describeCrash } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { readAll } from "../helpers/jobs";

/**
 * Power loss at every point of a stream and of a commit (the crash helper's
 * simulator: unsynced writes kept, dropped or torn per 512-byte sector): after
 * each crash the disk must read exactly as before the job.
 */
const CLUSTER_BITS = 12;
const SIZE = 96 * 1024 + 1000; // partial last cluster

async function setUp(seed: number, opts: { zeros?: boolean } = {}) {
  const rng = new Rng(seed);
  const mfs = new MemoryFs();
  const backing = rng.bytes(SIZE);
  if (opts.zeros) {
    // Zeros in the backing (some whole clusters), and old bytes in the image file under
    // some of them: a sparse stream must write zeros there and nothing over its holes.
    for (let i = 0; i < 6; i++) backing.fill(0, rng.int(0, 20) * 4096, rng.int(0, 24) * 4096);
  }
  const paths = createMemoryDisk(mfs, {
    clusterBits: CLUSTER_BITS,
    size: SIZE,
    backing,
  });
  if (opts.zeros) {
    for (let i = 0; i < 4; i++) mfs.get(paths.image).write(rng.bytes(4096), rng.int(0, 22) * 4096);
  }
  const { before, initial } = await scribbleAndKeep(mfs, paths.addcow, rng, 8, 9000);
  return { mfs, paths, before, initial };
}

async function checkAllCrashes(
  recorder: Recorder,
  initial: Map<string, SparseBytes>,
  addcow: string,
  before: Buffer,
): Promise<number> {
  let states = 0;
  for (const state of crashStates(recorder.log, initial, { samplesPerPoint: 6, tornPerPoint: 2 })) {
    states++;
    const after = new MemoryFs();
    for (const [p, b] of state.files) after.set(p, b);
    const dev = await openDiskVia(after.opener, addcow, { writable: false });
    const got = await readAll(dev);
    await dev.close();
    if (!got.equals(before)) throw new Error(`the disk changed after ${describeCrash(state)}`);
  }
  return states;
}

describe("power loss during jobs", () => {
  it.each([1, 2])("stream: every crash state reads as before (seed %i)", async (seed) => {
    const { mfs, paths, before, initial } = await setUp(seed);
    const recorder = new Recorder();
    const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, { writable: true });
    const job = new Job("stream", paths.addcow);
    // Checkpoint at every chance, so the log has many flushes between copies.
    const status = await job.start((j) =>
      streamDisk(dev, j, { inFlight: 3, bufSize: 3 * 8192, granularity: 4096, checkpointMs: 0 }),
    );
    expect(status.error).toBeUndefined();
    await dev.close();
    expect(recorder.illegalWrites).toEqual([]);
    expect(recorder.writes().some((w) => w.file === paths.backing)).toBe(false);
    const states = await checkAllCrashes(recorder, initial, paths.addcow, before);
    expect(states).toBeGreaterThan(50);
  });

  it.each([3, 4])(
    "sparse stream over zeros, holes and old image bytes: every crash state reads as before (seed %i)",
    async (seed) => {
      const { mfs, paths, before, initial } = await setUp(seed, { zeros: true });
      const recorder = new Recorder();
      const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, { writable: true });
      const job = new Job("stream", paths.addcow);
      const status = await job.start((j) =>
        streamDisk(dev, j, { inFlight: 2, bufSize: 2 * 8192, checkpointMs: 0 }),
      );
      expect(status.error).toBeUndefined();
      await dev.close();
      // Zero clusters over holes got their bit without a write: fewer image writes than clusters.
      const imageWrites = recorder.writes().filter((w) => w.file === paths.image);
      const written = imageWrites.reduce((n, w) => n + w.data.length, 0);
      expect(written).toBeLessThan(SIZE);
      // ...and the old bytes under zero clusters were overwritten: the image alone is the disk.
      expect(mfs.get(paths.image).toBuffer().equals(before)).toBe(true);
      const states = await checkAllCrashes(recorder, initial, paths.addcow, before);
      expect(states).toBeGreaterThan(50);
    },
  );

  it.each([1, 2])("commit: every crash state reads as before (seed %i)", async (seed) => {
    const { mfs, paths, before, initial } = await setUp(seed);
    const recorder = new Recorder();
    const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, {
      writable: true,
      writableBacking: true,
    });
    const job = new Job("commit", paths.addcow);
    const status = await job.start((j) => commitDisk(dev, j, { inFlight: 3, bufSize: 3 * 8192 }));
    expect(status.error).toBeUndefined();
    await dev.close();
    // The backing got the data, and after the commit the overlay is empty.
    expect(mfs.get(paths.backing!).read(Buffer.alloc(SIZE), 0)).toBe(SIZE);
    const backing = Buffer.alloc(SIZE);
    mfs.get(paths.backing!).read(backing, 0);
    expect(backing.equals(before)).toBe(true);
    const states = await checkAllCrashes(recorder, initial, paths.addcow, before);
    expect(states).toBeGreaterThan(20);
  });
});
