import { describe, expect, it } from "vitest";
import { readHeader } from "../../src/addcow/open-addcow";
import { readPinState } from "../../src/addcow/pin";
import { RawDevice } from "../../src/block/raw-device";
import { commitDisk } from "../../src/jobs/commit";
import { Job } from "../../src/jobs/job";
import { rebaseDisk } from "../../src/jobs/rebase";
import {
  MemoryFs,
  type SparseBytes,
  createMemoryDisk,
  openDiskVia,
  pinMemoryDisk,
  scribbleAndKeep,
} from "../helpers/memory-io";
import { Rng, crashStates, describeCrash } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { readAll } from "../helpers/jobs";

/**
 * Power loss at every point of the operations that write a disk's backing
 * pin (the crash simulator: unsynced writes kept, dropped or torn per
 * 512-byte sector; renames done or not). The pin is written in place only by
 * commit (two slots, the one not in use), and by a new file renamed into
 * place otherwise (rebase, resize). After every crash the disk must open,
 * which means its pin is readable and matches the backing it names, and read
 * exactly as before.
 */
const CLUSTER_BITS = 12;
const SIZE = 64 * 1024 + 700;

async function setUp(seed: number) {
  const rng = new Rng(seed);
  const mfs = new MemoryFs();
  const paths = createMemoryDisk(mfs, {
    clusterBits: CLUSTER_BITS,
    size: SIZE,
    backing: rng.bytes(SIZE),
  });
  await pinMemoryDisk(mfs, paths);
  // Guest writes in the first clusters: commit then changes bytes the fingerprint samples.
  const { before, initial } = await scribbleAndKeep(mfs, paths.addcow, rng, 6, 6000, 20000);
  return { mfs, paths, before, initial, rng };
}

/** Every crash state opens (its pin readable and right for its backing) and reads `before`. */
async function checkAllCrashes(
  recorder: Recorder,
  initial: Map<string, SparseBytes>,
  addcow: string,
  before: Buffer | ((dev: { size: number }) => Buffer),
): Promise<{ states: number; generations: Set<string> }> {
  let states = 0;
  const generations = new Set<string>();
  for (const state of crashStates(recorder.log, initial, { samplesPerPoint: 6, tornPerPoint: 4 })) {
    states++;
    const after = new MemoryFs();
    for (const [p, b] of state.files) after.set(p, b.clone());
    let dev;
    try {
      dev = await openDiskVia(after.opener, addcow, { writable: false });
    } catch (err) {
      throw new Error(`the disk does not open after ${describeCrash(state)}: ${String(err)}`);
    }
    const pin = dev.pin;
    if (pin.kind !== "pinned") throw new Error(`no pin after ${describeCrash(state)}`);
    generations.add(`${pin.generation}:${pin.record.status}`);
    const got = await readAll(dev);
    await dev.close();
    const want = typeof before === "function" ? before(dev) : before;
    if (!got.equals(want)) throw new Error(`the disk changed after ${describeCrash(state)}`);
  }
  return { states, generations };
}

describe("power loss while the pin is written", () => {
  it.each([1, 2])(
    "commit: the pin says 'committing' before the backing is written, and is renewed after; every crash state opens and reads as before (seed %i)",
    async (seed) => {
      const { mfs, paths, before, initial } = await setUp(seed);
      const recorder = new Recorder();
      const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, {
        writable: true,
        writableBacking: true,
      });
      const status = await new Job("commit", paths.addcow).start((j) =>
        commitDisk(dev, j, { inFlight: 2, bufSize: 2 * 8192 }),
      );
      expect(status.error).toBeUndefined();
      await dev.close();
      // The order: pin marked, synced, and only then the first write into the backing.
      const log = recorder.log;
      const firstBackingWrite = log.findIndex(
        (e) => e.kind === "write" && e.file === paths.backing,
      );
      const pinSync = log.findIndex(
        (e, i) => i < firstBackingWrite && e.kind === "sync" && e.file === paths.addcow,
      );
      expect(firstBackingWrite).toBeGreaterThan(0);
      expect(pinSync).toBeGreaterThanOrEqual(0);
      const { states, generations } = await checkAllCrashes(
        recorder,
        initial,
        paths.addcow,
        before,
      );
      expect(states).toBeGreaterThan(20);
      // Crash points saw the first pin, the commit marker and the renewed pin.
      expect([...generations].sort()).toEqual(["1:pinned", "2:committing", "3:pinned"]);
      // Done: pinned to the backing as the commit left it.
      const done = await openDiskVia(mfs.opener, paths.addcow, { writable: false });
      expect(done.pin).toMatchObject({ kind: "pinned", generation: 3n });
      await done.close();
    },
  );

  it.each([3, 4])(
    "safe rebase onto another base: every crash state opens on the backing it names, pinned for it (seed %i)",
    async (seed) => {
      const { mfs, paths, before, initial, rng } = await setUp(seed);
      const other = Buffer.from(mfs.get(paths.backing!).toBuffer());
      rng.bytes(9000).copy(other, 30000);
      mfs.set("/mem/base2.raw", other);
      initial.set("/mem/base2.raw", mfs.get("/mem/base2.raw").clone());
      const recorder = new Recorder();
      const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, { writable: true });
      const device = await RawDevice.open(await mfs.opener("/mem/base2.raw", "read"));
      const target = {
        name: "base2.raw",
        format: "raw" as const,
        device,
        path: "/mem/base2.raw",
        identity: await device.identity(),
      };
      const status = await new Job("rebase", paths.addcow).start((j) =>
        rebaseDisk(dev, target, j, {
          inFlight: 2,
          bufSize: 2 * 8192,
          checkpointMs: 0,
          replacer: recorder.replacer(mfs.replacer),
        }),
      );
      expect(status.error).toBeUndefined();
      await device.close();
      await dev.close();
      const { states, generations } = await checkAllCrashes(
        recorder,
        initial,
        paths.addcow,
        before,
      );
      expect(states).toBeGreaterThan(20);
      expect([...generations].sort()).toEqual(["1:pinned", "2:pinned"]);
    },
  );

  it.each([
    [5, SIZE * 3],
    [6, 20 * 1024],
  ])(
    "resize of a pinned disk (seed %i, to %i bytes): the pin follows the bitmap into a new file; every crash state opens",
    async (seed, newSize) => {
      const { mfs, paths, before, initial } = await setUp(seed);
      const recorder = new Recorder();
      const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, {
        writable: true,
        replacer: recorder.replacer(mfs.replacer),
      });
      if (newSize > SIZE) await dev.grow(newSize);
      else await dev.shrink(newSize);
      await dev.close();
      // Before the image file's new length is durable: the old disk; after: the new one.
      const grown = Buffer.alloc(newSize);
      before.copy(grown, 0, 0, Math.min(SIZE, newSize));
      const { states, generations } = await checkAllCrashes(recorder, initial, paths.addcow, (d) =>
        d.size === SIZE ? before : grown,
      );
      expect(states).toBeGreaterThan(5);
      expect([...generations].sort()).toEqual(["1:pinned", "2:pinned"]);
      const meta = await mfs.opener(paths.addcow, "read");
      const pin = await readPinState(meta, await readHeader(meta, paths.addcow), await meta.size());
      expect(pin).toMatchObject({ kind: "pinned", generation: 2n });
    },
  );
});
