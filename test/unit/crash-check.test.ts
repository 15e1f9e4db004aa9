import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { checkDisk } from "../../src/ops/check";
import { createDisk } from "../../src/ops/create";
import { DiskModel } from "../helpers/crash-model";
import { MemoryFs, SparseBytes, createMemoryDisk, openDiskVia } from "../helpers/memory-io";
import { Rng, SECTOR, crashStates } from "../helpers/power-loss";
import { Recorder } from "../helpers/recording-io";
import { runWorkload } from "../helpers/workload";

const dirs: string[] = [];
function tempDir(): string {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), "addcow-crashcheck-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

describe("addcow check after a crash", () => {
  it("calls every state a power loss can leave consistent", async () => {
    const rng = new Rng(77);
    const size = 8 * 4096;
    const backing = SparseBytes.from(rng.bytes(size));
    const mfs = new MemoryFs();
    const paths = createMemoryDisk(mfs, { clusterBits: 12, size, backing });
    const initial = new Map([...mfs.files].map(([p, b]) => [p, b.clone()] as const));
    const recorder = new Recorder();
    const dev = await openDiskVia(recorder.opener(mfs.opener), paths.addcow, { writable: true });
    const model = new DiskModel(size, (s) =>
      backing.toBuffer().subarray(s * SECTOR, (s + 1) * SECTOR),
    );
    await runWorkload(dev, recorder, model, {
      rng,
      clusterSize: 4096,
      zones: [[0, size]],
      steps: 12,
    });
    await dev.close();

    const dir = tempDir();
    let checked = 0;
    for (const state of crashStates(recorder.log, initial, {
      samplesPerPoint: 2,
      tornPerPoint: 1,
      exhaustiveUpTo: 1,
    })) {
      if (state.point % 3 !== 0) continue;
      for (const [p, bytes] of state.files)
        fs.writeFileSync(path.join(dir, path.basename(p)), bytes.toBuffer());
      const report = await checkDisk(path.join(dir, "disk.add-cow"));
      expect(report.findings, `crash at ${state.point}`).toEqual([]);
      expect(report.clean).toBe(true);
      checked++;
    }
    expect(checked).toBeGreaterThan(20);
  });

  it("notes the temporary file of an interrupted create, and still calls the disk consistent", async () => {
    const dir = tempDir();
    const file = path.join(dir, "disk.add-cow");
    await createDisk({ file, size: 1 << 20 });
    // A pid that cannot run: above the kernel's pid_max.
    const stray = path.join(dir, ".disk.add-cow.99999999.tmp");
    fs.writeFileSync(stray, "half a header");
    const report = await checkDisk(file);
    expect(report.clean).toBe(true);
    expect(report.findings).toHaveLength(1);
    expect(report.findings[0]).toMatchObject({ severity: "warning", field: "leftover file" });
    expect(report.findings[0]!.message).toContain(stray);
    expect(fs.existsSync(stray)).toBe(true);
  });

  it("reports an image file cut short: a warning, or corruption when bits lie past the end", async () => {
    const dir = tempDir();
    const file = path.join(dir, "disk.add-cow");
    // 4 KiB clusters: one bitmap cluster maps 128 MiB; shrink far below that boundary.
    await createDisk({ file, size: 256 << 20, clusterSize: 4096 });
    fs.truncateSync(path.join(dir, "disk.raw"), 64 << 20);
    let report = await checkDisk(file);
    expect(report.clean).toBe(true);
    expect(report.findings.map((f) => f.message).join("\n")).toMatch(
      /shorter than when the disk was created/,
    );

    // The bit of cluster 20000: past the new end (16384 clusters), inside the old one (65536).
    const fd = fs.openSync(file, "r+");
    fs.writeSync(fd, Buffer.from([1]), 0, 1, 4096 + 20000 / 8);
    fs.closeSync(fd);
    report = await checkDisk(file);
    expect(report.clean).toBe(false);
    expect(
      report.findings.some((f) => f.severity === "corruption" && /past the end/.test(f.message)),
    ).toBe(true);
  });

  it("reports a missing image file as corruption", async () => {
    const dir = tempDir();
    const file = path.join(dir, "disk.add-cow");
    await createDisk({ file, size: 1 << 20 });
    fs.rmSync(path.join(dir, "disk.raw"));
    const report = await checkDisk(file);
    expect(report.clean).toBe(false);
    expect(report.findings[0]!.message).toMatch(/does not exist/);
  });
});
