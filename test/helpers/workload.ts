import type { BlockDevice } from "../../src/block/block-device";
import type { AddCowDevice } from "../../src/addcow/addcow-device";
import type { DiskModel } from "./crash-model";
import { type Rng, SECTOR } from "./power-loss";
import type { Recorder } from "./recording-io";

export interface WorkloadOptions {
  rng: Rng;
  clusterSize: number;
  /** Byte ranges [start, end) the writes go to (sector aligned). */
  zones: ReadonlyArray<readonly [number, number]>;
  steps: number;
  /** Only whole-sector writes (needed when failed writes may leave half of them behind). */
  sectorAligned?: boolean;
  /** Failed writes and flushes are noted (not thrown); for fault injection. */
  tolerateErrors?: boolean;
  /** Called before each step, e.g. to arm a fault. */
  beforeStep?: (step: number) => void;
}

/** A random write inside one zone: aligned or not, inside one cluster or across several. */
function randomWrite(
  rng: Rng,
  clusterSize: number,
  zones: WorkloadOptions["zones"],
  sectorAligned = false,
): { offset: number; length: number } {
  if (sectorAligned) {
    const w = randomWrite(rng, clusterSize, zones);
    const start = Math.floor(w.offset / SECTOR) * SECTOR;
    return { offset: start, length: Math.ceil((w.offset + w.length) / SECTOR) * SECTOR - start };
  }
  const [zs, ze] = rng.pick(zones);
  const r = rng.next();
  let offset: number;
  if (r < 0.3) offset = zs + Math.floor(rng.int(0, ze - zs - 1) / clusterSize) * clusterSize;
  else if (r < 0.7) offset = zs + Math.floor(rng.int(0, ze - zs - 1) / SECTOR) * SECTOR;
  else offset = rng.int(zs, ze - 1);
  const k = rng.next();
  const length =
    k < 0.4
      ? rng.int(1, 1024)
      : k < 0.7
        ? rng.int(1, clusterSize)
        : k < 0.9
          ? rng.int(clusterSize, 3 * clusterSize)
          : clusterSize;
  return { offset, length: Math.min(length, ze - offset) };
}

function sectorSpan(w: { offset: number; length: number }): [number, number] {
  return [Math.floor(w.offset / SECTOR), Math.ceil((w.offset + w.length) / SECTOR)];
}

/**
 * Runs random writes (partial first writes that need copy-on-write, overwrites,
 * writes across clusters), flushes, block-job copies from the backing disk, copy-on-read
 * reads racing writes (when the device copies on read), and batches of concurrent writes (never
 * sharing a sector, often sharing a cluster) with a flush racing them. Every
 * write issue, acknowledgement and completed flush is marked in the recorder's
 * log and told to the model, so crash states can be judged later.
 */
export async function runWorkload(
  dev: BlockDevice,
  recorder: Recorder,
  model: DiskModel,
  opts: WorkloadOptions,
): Promise<void> {
  const { rng } = opts;
  const doWrite = async (w: { offset: number; length: number }) => {
    const data = rng.bytes(w.length);
    const issued = recorder.mark("write-issued");
    const id = model.issue(w.offset, data, issued);
    try {
      await dev.write(data, w.offset);
    } catch (err) {
      if (!opts.tolerateErrors) throw err;
      recorder.mark("write-failed", { id });
      return;
    }
    model.ack(id, recorder.mark("write-acked", { id }));
  };
  const doFlush = async () => {
    const start = recorder.mark("flush-start");
    try {
      await dev.flush();
    } catch (err) {
      if (!opts.tolerateErrors) throw err;
      recorder.mark("flush-failed", { start });
      return;
    }
    model.flushed(start, recorder.mark("flush-done", { start }));
  };

  const pickWrite = () => randomWrite(rng, opts.clusterSize, opts.zones, opts.sectorAligned);
  const copier = "copyFromBacking" in dev ? (dev as AddCowDevice) : null;
  for (let step = 0; step < opts.steps; step++) {
    opts.beforeStep?.(step);
    const r = rng.next();
    if (r < 0.15) {
      await doFlush();
    } else if (r < 0.2 && copier) {
      // A block job's copy (stream): allocates clusters without changing what they read.
      const [zs, ze] = rng.pick(opts.zones);
      const c0 = Math.floor(zs / opts.clusterSize) + rng.int(0, 3);
      const c1 = Math.min(Math.ceil(ze / opts.clusterSize), c0 + rng.int(1, 4));
      if (c0 < c1) {
        try {
          await copier.copyFromBacking(c0, c1);
        } catch (err) {
          if (!opts.tolerateErrors) throw err;
        }
      }
    } else if (r < 0.28 && copier?.copyOnRead) {
      // Copy-on-read: reads that allocate clusters, racing writes into the same clusters.
      const reads = [0, 1].map(() => {
        const w = pickWrite();
        return dev.read(Buffer.alloc(w.length), w.offset);
      });
      await Promise.all([...reads, doWrite(pickWrite())]);
    } else if (r < 0.4) {
      const batch: Array<{ offset: number; length: number }> = [];
      const want = rng.int(2, 4);
      for (let tries = 0; batch.length < want && tries < 20; tries++) {
        const w = pickWrite();
        const [a0, a1] = sectorSpan(w);
        if (batch.every((b) => sectorSpan(b)[1] <= a0 || a1 <= sectorSpan(b)[0])) batch.push(w);
      }
      const running = batch.map((w) => doWrite(w));
      if (rng.chance(0.3)) running.push(doFlush());
      await Promise.all(running);
    } else {
      await doWrite(pickWrite());
    }
  }
}
