import { readHeader } from "../../src/addcow/open-addcow";
import { describe, expect, it } from "vitest";
import { RawDevice } from "../../src/block/raw-device";
import { Job } from "../../src/jobs/job";
import { type RebaseTarget, rebaseDisk } from "../../src/jobs/rebase";
import { MemoryFs, createMemoryDisk, openDiskVia, scribbleAndKeep } from "../helpers/memory-io";
import { Rng, crashStates, describeCrash } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { readAll } from "../helpers/jobs";

/**
 * Power loss at every point of a safe rebase (the crash simulator: unsynced
 * writes kept, dropped or torn per sector; the rename of the new .add-cow
 * file happened or not): whichever backing file the header names afterwards,
 * the disk reads exactly as before, and running the rebase again finishes it.
 */
const CLUSTER_BITS = 12;
const SIZE = 80 * 1024 + 700;
const NEW_BACKING = "/mem/base2.raw";

/** The new backing: the old one with some clusters changed, some zeroed, and another length. */
function newBacking(rng: Rng, old: Buffer, length: number): Buffer {
  const b = Buffer.alloc(length);
  old.copy(b, 0, 0, Math.min(length, old.length));
  for (let i = 0; i < 5; i++) {
    const at = rng.int(0, Math.floor(length / 4096) - 1) * 4096 + rng.int(0, 100);
    rng.bytes(rng.int(1, 5000)).copy(b, at);
  }
  b.fill(0, rng.int(0, 8) * 4096, rng.int(9, 12) * 4096);
  return b;
}

async function setUp(seed: number, newLength: number) {
  const rng = new Rng(seed);
  const mfs = new MemoryFs();
  const old = rng.bytes(SIZE + 3000);
  old.fill(0, 40 * 1024, 48 * 1024); // zeros in the old one too
  const paths = createMemoryDisk(mfs, { clusterBits: CLUSTER_BITS, size: SIZE, backing: old });
  mfs.set(NEW_BACKING, newBacking(rng, old, newLength));
  const { before, initial } = await scribbleAndKeep(mfs, paths.addcow, rng, 5, 7000);
  return { mfs, paths, before, initial };
}

async function target(mfs: MemoryFs): Promise<RebaseTarget> {
  return {
    name: "base2.raw",
    format: "raw",
    device: await RawDevice.open(await mfs.opener(NEW_BACKING, "read")),
    path: NEW_BACKING,
    identity: null,
  };
}

async function rebase(mfs: MemoryFs, addcow: string, recorder?: Recorder) {
  const opener = recorder ? recorder.opener(mfs.opener) : mfs.opener;
  const replacer = recorder ? recorder.replacer(mfs.replacer) : mfs.replacer;
  const dev = await openDiskVia(opener, addcow, { writable: true });
  const t = await target(mfs);
  const status = await new Job("rebase", addcow).start((job) =>
    rebaseDisk(dev, t, job, { inFlight: 2, bufSize: 2 * 8192, checkpointMs: 0, replacer }),
  );
  await t.device.close();
  await dev.close();
  if (status.error) throw new Error(status.error);
  return status;
}

async function backingNamed(mfs: MemoryFs, addcow: string): Promise<string | null> {
  const meta = await mfs.opener(addcow, "read");
  return (await readHeader(meta, addcow)).backingName;
}

describe("power loss during a safe rebase", () => {
  it.each([
    [1, SIZE + 3000],
    [2, SIZE - 9000],
    [3, SIZE + 20000],
  ])(
    "every crash state reads as before, under the old or the new name; a rerun finishes (seed %i, new backing %i bytes)",
    async (seed, newLength) => {
      const { mfs, paths, before, initial } = await setUp(seed, newLength);
      const recorder = new Recorder();
      const status = await rebase(mfs, paths.addcow, recorder);
      expect(status.message).toMatch(/that read differently from it were copied/);
      expect(recorder.illegalWrites).toEqual([]);
      expect(await backingNamed(mfs, paths.addcow)).toBe("base2.raw");
      expect(recorder.writes().some((w) => w.file.endsWith(".raw") && w.file !== paths.image)).toBe(
        false,
      );
      const done = await openDiskVia(mfs.opener, paths.addcow, { writable: false });
      expect((await readAll(done)).equals(before)).toBe(true);
      await done.close();

      let states = 0;
      const names = new Set<string | null>();
      for (const state of crashStates(recorder.log, initial, {
        samplesPerPoint: 8,
        tornPerPoint: 4,
      })) {
        states++;
        const after = new MemoryFs();
        for (const [p, b] of state.files) after.set(p, b.clone());
        names.add(await backingNamed(after, paths.addcow));
        const disk = await openDiskVia(after.opener, paths.addcow, { writable: false });
        const got = await readAll(disk);
        await disk.close();
        if (!got.equals(before)) throw new Error(`the disk changed after ${describeCrash(state)}`);
        if (states % 7 === 0) {
          // Running the rebase again from here finishes it, still reading the same.
          await rebase(after, paths.addcow);
          const final = await openDiskVia(after.opener, paths.addcow, { writable: false });
          const again = await readAll(final);
          await final.close();
          if (!again.equals(before) || (await backingNamed(after, paths.addcow)) !== "base2.raw") {
            throw new Error(`a rerun did not finish after ${describeCrash(state)}`);
          }
        }
      }
      expect(states).toBeGreaterThan(30);
      // Both names were seen: the crash points cover the switch.
      expect([...names].sort()).toEqual(["base.raw", "base2.raw"]);
    },
  );
});
