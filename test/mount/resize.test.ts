import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { resizeDisk } from "../../src/ops/resize";
import { checkDisk } from "../../src/ops/check";
import {
  MemoryFs,
  type SparseBytes,
  createMemoryDisk,
  openDiskVia,
  scribbleAndKeep,
} from "../helpers/memory-io";
import { Rng, crashStates, describeCrash } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { MiB, pattern, readAll, readDisk, scribble } from "../helpers/jobs";
import { cleanupAll, makeOverlay, mountDisk, tempDir } from "../helpers/mount";
import { addcow } from "../helpers/cli";

afterEach(cleanupAll);
const dir = (tag: string) => tempDir(`addcow-${tag}-`);

const CLUSTER_BITS = 12;
const OLD = 60 * 1024 + 1000; // a partial last cluster
const NEW = 100 * 1024 + 300;
const BACKING = 120 * 1024; // longer than both: the new area overlaps it

/** Bits set past the last cluster of a disk of `size` (what check calls corruption). */
function paddingBitsSet(meta: SparseBytes, size: number): boolean {
  const clusters = Math.ceil(size / 4096);
  const buf = meta.toBuffer().subarray(4096);
  for (let c = clusters; c < buf.length * 8; c++) {
    if ((buf[c >> 3]! >> (c & 7)) & 1) return true;
  }
  return false;
}

describe("resize: power loss at every point of a grow", () => {
  it.each([1, 2, 3])(
    "reads as the old disk or the grown one (zeros past the old end), and a rerun finishes (seed %i)",
    async (seed) => {
      const rng = new Rng(seed);
      const mfs = new MemoryFs();
      const paths = createMemoryDisk(mfs, {
        clusterBits: CLUSTER_BITS,
        size: OLD,
        backing: rng.bytes(BACKING),
      });
      const { before, initial } = await scribbleAndKeep(
        mfs,
        paths.addcow,
        rng,
        6,
        6000,
        OLD - 5000,
      );
      const after = Buffer.concat([before, Buffer.alloc(NEW - OLD)]);

      const recorder = new Recorder();
      const grow = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, {
        writable: true,
      });
      await resizeDisk(grow, NEW);
      await grow.close();
      expect(recorder.illegalWrites).toEqual([]);
      const done = await openDiskVia(mfs.opener, paths.addcow, { writable: false });
      expect((await readAll(done)).equals(after)).toBe(true);
      await done.close();
      expect(paddingBitsSet(mfs.get(paths.addcow), NEW)).toBe(false);

      let states = 0;
      let grown = 0;
      for (const state of crashStates(recorder.log, initial, { samplesPerPoint: 8 })) {
        states++;
        const fsAfter = new MemoryFs();
        for (const [p, b] of state.files) fsAfter.set(p, b.clone());
        const disk = await openDiskVia(fsAfter.opener, paths.addcow, { writable: false });
        const got = await readAll(disk);
        await disk.close();
        const want = disk.size === NEW ? after : before;
        if (disk.size === NEW) grown++;
        else if (disk.size !== OLD)
          throw new Error(`size ${disk.size} after ${describeCrash(state)}`);
        if (!got.equals(want)) throw new Error(`wrong content after ${describeCrash(state)}`);
        // Running resize again finishes the job from any of these states.
        const again = await openDiskVia(fsAfter.opener, paths.addcow, { writable: true });
        await resizeDisk(again, NEW);
        await again.close();
        const final = await openDiskVia(fsAfter.opener, paths.addcow, { writable: false });
        if (!(await readAll(final)).equals(after)) {
          throw new Error(`rerun did not finish after ${describeCrash(state)}`);
        }
        await final.close();
        if (paddingBitsSet(fsAfter.get(paths.addcow), NEW)) {
          throw new Error(`bits past the end after the rerun, ${describeCrash(state)}`);
        }
      }
      expect(states).toBeGreaterThan(20);
      expect(grown).toBeGreaterThan(0);
    },
  );
});

describe("addcow resize", () => {
  it("grows over a longer backing: the new area reads zeros, check is clean", async () => {
    const d = dir("resize");
    const base = path.join(d, "base.raw");
    fs.writeFileSync(base, pattern(8 * MiB, 3));
    expect(
      addcow(d, "create", "-q", "-b", "base.raw", "-F", "raw", "d.add-cow", "3000000").code,
    ).toBe(0);
    await scribble(path.join(d, "d.add-cow"), 4, 6, 100 * 1024);
    const before = await readDisk(path.join(d, "d.add-cow"));
    const r = addcow(d, "resize", "-f", "add-cow", "d.add-cow", "+2M");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^resized d\.add-cow from .* to .* \(5097152 bytes\)/);
    const now = await readDisk(path.join(d, "d.add-cow"));
    expect(now.equals(Buffer.concat([before, Buffer.alloc(2 * MiB)]))).toBe(true);
    const check = addcow(d, "check", "d.add-cow");
    expect(check.code, check.stdout).toBe(0);
    // The image file grew sparse: the new zeros take no space.
    expect(fs.statSync(path.join(d, "d.raw")).size).toBe(5097152);
    // Streamed, the image file alone is the grown disk.
    expect(addcow(d, "stream", "-q", "d.add-cow").code).toBe(0);
    expect(fs.readFileSync(path.join(d, "d.raw")).equals(now)).toBe(true);
    // An all-allocated disk grows too, and stays all allocated.
    expect(addcow(d, "resize", "d.add-cow", "6M").code).toBe(0);
    expect(addcow(d, "check", "d.add-cow").code).toBe(0);
    const info = JSON.parse(addcow(d, "info", "--json", "d.add-cow").stdout) as {
      virtualSize: number;
      allocatedClusters: number;
      clusters: number;
    };
    expect(info.virtualSize).toBe(6 * MiB);
    expect(info.allocatedClusters).toBe(info.clusters);
  });

  it("shrinks only with --shrink and only past the last allocated cluster", async () => {
    const d = dir("shrink");
    expect(addcow(d, "create", "-q", "d.add-cow", "4M").code).toBe(0);
    await scribble(path.join(d, "d.add-cow"), 7, 1, 1); // one byte: one cluster
    const disk = await readDisk(path.join(d, "d.add-cow"));
    let last = disk.length - 1;
    while (last > 0 && disk[last] === 0) last--;
    const r = addcow(d, "resize", "d.add-cow", "-1M");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/smaller than d\.add-cow .* add --shrink/);
    const cut = Math.floor(last / 65536) * 65536;
    const refused = addcow(d, "resize", "--shrink", "d.add-cow", String(cut));
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/holds 64 KiB of its own data past/);
    const ok = addcow(d, "resize", "--shrink", "d.add-cow", String(cut + 65536));
    expect(ok.code, ok.stderr).toBe(0);
    expect(fs.statSync(path.join(d, "d.raw")).size).toBe(cut + 65536);
    expect((await readDisk(path.join(d, "d.add-cow"))).equals(disk.subarray(0, cut + 65536))).toBe(
      true,
    );
    const report = await checkDisk(path.join(d, "d.add-cow"));
    expect(report.findings).toEqual([]);
  });

  it("refuses a mounted disk: unmount first", async () => {
    const d = dir("resize-mounted");
    const o = await makeOverlay(d, "vm", { size: MiB });
    const m = await mountDisk(o.addcow, path.join(d, "mnt"));
    const r = addcow(d, "resize", o.addcow, "+1M");
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(`is mounted at ${m.dir}`);
    expect(r.stderr).toContain(`unmount it first (fusermount -u ${m.dir})`);
    expect(r.stderr).not.toContain("-U");
    await m.unmount();
    expect(addcow(d, "resize", o.addcow, "+1M").code).toBe(0);
  });
});
