/**
 * Full file systems keep every acknowledged write. The image and .add-cow files
 * live on a small tmpfs or a small loop-mounted ext4 made by the test; a
 * writer fills it through the mounted disk until ENOSPC. Every write
 * acknowledged before that must read back after an unmount and a read-only
 * remount, `addcow check` must call the disk clean, and once space is freed
 * writes work again in the same mount.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { createDisk } from "../../src/ops/create";
import { openDisk } from "../../src/chain/open-chain";
import { findHoles } from "../../src/os/holes";
import { addcow, stderrLines } from "../helpers/cli";
import {
  MOUNT_BIN,
  cleanupAll,
  mountDisk,
  run,
  sh,
  smallFileSystem,
  tempDir,
  trackMount,
  writePatternFile,
} from "../helpers/mount";
import { blocksDiffering, pattern } from "../helpers/pattern";

afterEach(cleanupAll);

const KiB = 1024;
const MiB = 1 << 20;
const BLOCK = 128 * KiB; // one FUSE request: a write is acknowledged whole or not at all
const DISK = 64 * MiB;
const BALLAST = 2 * MiB;

const blockData = (i: number) => pattern(BLOCK, 1000 + i);

/** Fills `small` with a file until the file system has no free block left. */
function fillUp(small: string, name = "filler"): void {
  const fd = fs.openSync(path.join(small, name), "w");
  const chunk = Buffer.alloc(64 * KiB, 0xee);
  try {
    for (;;) fs.writeSync(fd, chunk);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOSPC") throw err;
  } finally {
    fs.closeSync(fd);
  }
}

async function overlayOn(small: string, outside: string): Promise<string> {
  const backing = path.join(outside, "base.raw");
  writePatternFile(backing, DISK, 7);
  const file = path.join(small, "disk.add-cow");
  await createDisk({ file, backing, backingFormat: "raw", clusterSize: 64 * KiB });
  return file;
}

describe.each(["tmpfs", "ext4"] as const)("a full %s under the disk", (kind) => {
  it.each(["writeback", "writethrough"] as const)(
    "cache=%s: every write acknowledged before ENOSPC survives; after freeing space writes work again",
    async (cache) => {
      const dir = tempDir("addcow-fullfs-");
      const small = path.join(dir, "small");
      await smallFileSystem(kind, small, 24);
      const file = await overlayOn(small, dir);
      writePatternFile(path.join(small, "ballast"), BALLAST, 3);
      const m = await mountDisk(file, path.join(dir, "mnt"), { options: `cache=${cache}` });

      const acked: number[] = [];
      let failure: string | undefined;
      const fd = fs.openSync(m.file, "r+");
      try {
        let i = 0;
        for (; i < DISK / BLOCK; i++) {
          try {
            fs.writeSync(fd, blockData(i), 0, BLOCK, i * BLOCK);
          } catch (err) {
            failure = (err as NodeJS.ErrnoException).code;
            break;
          }
          acked.push(i);
        }
        expect(failure).toBe("ENOSPC");
        expect(acked.length).toBeGreaterThan(16);
        // What was acknowledged is still flushable: the bitmap needs no new blocks.
        fs.fdatasyncSync(fd);

        // Space comes back: the same mount takes writes again, the failed one included.
        fs.rmSync(path.join(small, "ballast"));
        for (const j of [i, i + 1, i + 2, i + 3]) {
          fs.writeSync(fd, blockData(j), 0, BLOCK, j * BLOCK);
          acked.push(j);
        }
        fs.fdatasyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
      await m.unmount();

      const check = addcow(dir, "check", file);
      expect(check.stdout + check.stderr).not.toMatch(/corrupt/i);
      expect(check.code).toBe(0);
      const ro = await mountDisk(file, path.join(dir, "mnt"), { options: "ro" });
      const lost = blocksDiffering(ro.file, acked, BLOCK, blockData);
      expect(lost, `${lost.length} of ${acked.length} acknowledged writes lost`).toEqual([]);
      await ro.unmount();
    },
  );
});

describe("bitmap space is reserved up front", () => {
  it("create writes the bitmap for real, and refuses with one line when there is no room", async () => {
    const dir = tempDir("addcow-fullfs-");
    const small = path.join(dir, "small");
    await smallFileSystem("tmpfs", small, 4);
    const made = addcow(small, "create", "-c", "4K", "a.add-cow", "64M");
    expect(made.code).toBe(0);
    const fd = fs.openSync(path.join(small, "a.add-cow"), "r");
    try {
      expect(findHoles(fd, 0, fs.fstatSync(fd).size)).toEqual([]);
    } finally {
      fs.closeSync(fd);
    }
    fillUp(small);
    const refused = addcow(small, "create", "-c", "4K", "b.add-cow", "1G");
    expect(refused.code).toBe(1);
    expect(stderrLines(refused)).toHaveLength(1);
    expect(refused.stderr).toMatch(/b\.add-cow.*free some space/);
    // Nothing is left behind: no .add-cow file, no image file, no temporary file.
    expect(fs.readdirSync(small).sort()).toEqual(["a.add-cow", "a.raw", "filler"]);
  });

  it("a writable open fills the holes of an old bitmap, keeps its bits, and says so when there is no room", async () => {
    const dir = tempDir("addcow-fullfs-");
    const small = path.join(dir, "small");
    await smallFileSystem("tmpfs", small, 8);
    // 4 KiB clusters, 1 GiB: a bitmap of eight pages. Bits on pages 0 and 5 only.
    const file = path.join(dir, "old.add-cow");
    await createDisk({ file, size: 1 << 30, clusterSize: 4 * KiB });
    const page = 4096 * 8 * 4 * KiB; // disk bytes mapped by one bitmap page
    const marks = [0, 5 * page + 12 * KiB];
    const dev = await openDisk(file, { writable: true });
    for (const at of marks) await dev.write(blockData(at).subarray(0, 4 * KiB), at);
    await dev.close();
    // A sparse copy, as `cp --sparse=always` or an old addcow makes: the other pages are holes.
    const copy = path.join(small, "old.add-cow");
    await sh("cp", ["--sparse=always", file, copy]);
    await sh("cp", ["--sparse=always", path.join(dir, "old.raw"), path.join(small, "old.raw")]);
    const holes = () => {
      const fd = fs.openSync(copy, "r");
      try {
        return findHoles(fd, 4096, fs.fstatSync(fd).size);
      } finally {
        fs.closeSync(fd);
      }
    };
    expect(holes().length).toBeGreaterThan(0);

    fillUp(small);
    trackMount(path.join(dir, "mnt"));
    const refused = await run(process.execPath, [MOUNT_BIN, copy, path.join(dir, "mnt")]);
    expect(refused.code).toBe(1);
    expect(stderrLines({ ...refused, code: refused.code })).toHaveLength(1);
    expect(refused.stderr).toMatch(/old\.add-cow.*bitmap.*free some space/);
    // Read-only use needs no room.
    const ro = await openDisk(copy, { writable: false });
    await ro.close();

    fs.rmSync(path.join(small, "filler"));
    const again = await openDisk(copy, { writable: true });
    try {
      expect(holes()).toEqual([]);
      for (const at of marks) {
        const got = Buffer.alloc(4 * KiB);
        await again.read(got, at);
        expect(got.equals(blockData(at).subarray(0, 4 * KiB))).toBe(true);
      }
      // A new bit on a page that was a hole.
      await again.write(Buffer.alloc(4 * KiB, 0x5a), 3 * page);
      await again.flush();
    } finally {
      await again.close();
    }
    const bits = fs.readFileSync(copy).subarray(4096);
    expect(bits[0]).toBe(1);
    expect(bits[5 * 4096 + 0]).toBe(1 << 3);
    expect(bits[3 * 4096]).toBe(1);
  });
});

describe("block jobs on a full file system", () => {
  it("stream stops with one line naming the file, keeps its progress, and finishes once there is room", async () => {
    const dir = tempDir("addcow-fullfs-");
    const small = path.join(dir, "small");
    await smallFileSystem("tmpfs", small, 8);
    await overlayOn(small, dir);
    const r = addcow(small, "stream", "-q", "disk.add-cow");
    expect(r.code).toBe(1);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(
      /stream of .*disk\.add-cow stopped: the file system holding .*small\/disk\.raw is full \(ENOSPC\); .* left to copy, the progress is kept: free some space and run it again/,
    );
    const info = addcow(small, "info", "--json", "disk.add-cow");
    const allocated = (JSON.parse(info.stdout) as { allocatedClusters: number }).allocatedClusters;
    expect(allocated).toBeGreaterThan(16);

    await sh("mount", ["-o", "remount,size=96m", small]);
    const again = addcow(small, "stream", "-q", "disk.add-cow");
    expect(again.stderr).toBe("");
    expect(again.code).toBe(0);
    expect(
      fs
        .readFileSync(path.join(small, "disk.raw"))
        .equals(fs.readFileSync(path.join(dir, "base.raw"))),
    ).toBe(true);
  });

  it("commit stops with one line naming the backing file; the overlay stays; it finishes once there is room", async () => {
    const dir = tempDir("addcow-fullfs-");
    const small = path.join(dir, "small");
    await smallFileSystem("tmpfs", small, 8);
    const base = path.join(small, "base.raw");
    fs.writeFileSync(base, "");
    fs.truncateSync(base, DISK);
    const file = path.join(dir, "top.add-cow");
    await createDisk({ file, backing: base, backingFormat: "raw", clusterSize: 64 * KiB });
    const dev = await openDisk(file, { writable: true });
    for (let i = 0; i < 20 * 8; i++) await dev.write(blockData(i), i * BLOCK);
    await dev.close();
    const r = addcow(dir, "commit", "-q", "top.add-cow");
    expect(r.code).toBe(1);
    expect(stderrLines(r)).toHaveLength(1);
    expect(r.stderr).toMatch(
      /commit of .*top\.add-cow stopped: the file system holding .*small\/base\.raw is full \(ENOSPC\); the overlay is unchanged: free some space and run commit again/,
    );
    await sh("mount", ["-o", "remount,size=96m", small]);
    const again = addcow(dir, "commit", "-q", "top.add-cow");
    expect(again.stderr).toBe("");
    expect(again.code).toBe(0);
    const all = Array.from({ length: 20 * 8 }, (_, i) => i);
    expect(blocksDiffering(base, all, BLOCK, blockData)).toEqual([]);
  });
});
