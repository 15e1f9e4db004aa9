/**
 * One case per validation rule: each builds a bad set of files in a fresh
 * directory, opens it read-only and writable, and checks the error names the
 * file, field and value in one line, and that nothing in the directory changed.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { AddCowError } from "../../src/util/errors";
import { MAX_CHAIN_DEPTH, openDisk } from "../../src/chain/open-chain";
import { diffTrees, snapshotTree, tempDir, writeDisk, writeRaw } from "../helpers/bad-files";
import {
  SIZE,
  chain,
  hostileCases,
  immutable,
  plain,
  releaseImmutable,
  spawnQuiet,
} from "../helpers/hostile-cases";

const dirs: string[] = [];

afterAll(() => {
  releaseImmutable();
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

function fdCount(): number {
  return fs.readdirSync("/proc/self/fd").length;
}

describe("hostile files: a clear error and nothing harmed", () => {
  it.each(hostileCases.map((c) => [c.name, c] as const))("%s", async (_name, c) => {
    const dir = tempDir("hostile");
    dirs.push(dir);
    const built = c.build(dir);
    const failing = built.modes ?? ["read", "write"];
    for (const mode of ["read", "write"] as const) {
      const before = snapshotTree(dir);
      const fds = fdCount();
      let result: unknown;
      try {
        const disk = await openDisk(built.file, {
          writable: mode === "write",
          opener: built.opener,
        });
        await disk.close();
        result = "opened";
      } catch (err) {
        result = err;
      }
      if (failing.includes(mode)) {
        expect(result, `${mode} open`).toBeInstanceOf(AddCowError);
        const message = (result as AddCowError).message;
        expect(message).not.toMatch(/[\n\r]/);
        expect(message).not.toMatch(/\bat .*\.(ts|js):\d+/);
        // What to do comes after a semicolon.
        expect(message).toMatch(/; \S/);
        for (const p of built.patterns) expect(message).toMatch(p);
      } else {
        expect(result, `${mode} open`).toBe("opened");
      }
      expect(diffTrees(before, snapshotTree(dir))).toEqual([]);
      expect(fdCount()).toBe(fds);
    }
  });
});

describe("accepted oddities", () => {
  it(`opens a chain exactly MAX_CHAIN_DEPTH (${MAX_CHAIN_DEPTH}) layers deep`, async () => {
    const dir = tempDir("hostile-deep");
    dirs.push(dir);
    const files = chain(dir, MAX_CHAIN_DEPTH);
    const disk = await openDisk(files[0]!);
    const buf = Buffer.alloc(4096);
    await disk.read(buf, SIZE - 4096);
    expect(buf.every((b) => b === 0x5a)).toBe(true);
    await disk.close();
  });

  it("ignores bitmap padding bits past the last cluster", async () => {
    const dir = tempDir("hostile-pad");
    dirs.push(dir);
    writeRaw(path.join(dir, "base.raw"), SIZE + 1000, 0x11);
    // 65 clusters: the last is partial (1000 bytes); bits 65.. are padding.
    const bitmap = Buffer.alloc(4096);
    bitmap[8] = 0xfe;
    bitmap.fill(0xff, 9);
    const d = plain(dir, {
      size: SIZE + 1000,
      fill: 0x22,
      bitmap,
      backingName: "base.raw",
      backingFormat: "raw",
    });
    const before = snapshotTree(dir);
    const disk = await openDisk(d.addcow);
    const buf = Buffer.alloc(2000);
    await disk.read(buf, SIZE - 1000);
    expect(buf.every((b) => b === 0x11)).toBe(true);
    expect(await disk.countAllocated()).toBe(0);
    await disk.close();
    expect(diffTrees(before, snapshotTree(dir))).toEqual([]);
  });

  it("takes an image file shorter than its bitmap as a smaller disk, ignoring bits past its end", async () => {
    const dir = tempDir("hostile-shrunk");
    dirs.push(dir);
    writeRaw(path.join(dir, "base.raw"), 32769 * 4096, 0x11);
    // 32769 clusters need two bitmap clusters; every bit set, then the image loses half.
    const bitmap = Buffer.alloc(8192, 0xff);
    const d = plain(dir, {
      size: 32769 * 4096,
      fill: 0x22,
      bitmap,
      backingName: "base.raw",
      backingFormat: "raw",
    });
    fs.truncateSync(d.image, 64 << 20);
    const before = snapshotTree(dir);
    const disk = await openDisk(d.addcow);
    expect(disk.size).toBe(64 << 20);
    const tail = Buffer.alloc(4096);
    await disk.read(tail, (64 << 20) - 4096);
    expect(tail.every((b) => b === 0x22)).toBe(true);
    await expect(disk.read(Buffer.alloc(1), 64 << 20)).rejects.toBeInstanceOf(AddCowError);
    await disk.close();
    expect(diffTrees(before, snapshotTree(dir))).toEqual([]);
  });

  it("resolves relative names against the .add-cow file's directory, with .. and absolute names", async () => {
    const dir = tempDir("hostile-names");
    dirs.push(dir);
    fs.mkdirSync(path.join(dir, "disks"));
    fs.mkdirSync(path.join(dir, "images"));
    const base = writeRaw(path.join(dir, "images", "base.raw"), SIZE, 0x33);
    const d = writeDisk(path.join(dir, "disks"), "d", {
      size: SIZE,
      clusterBits: 12,
      imageName: "../images/d.raw",
      backingName: base,
      backingFormat: "raw",
    });
    const cwd = process.cwd();
    process.chdir("/");
    try {
      const disk = await openDisk(path.relative("/", d.addcow));
      expect(disk.imagePath).toBe(path.join(dir, "images", "d.raw"));
      expect(disk.backingPath).toBe(base);
      const buf = Buffer.alloc(10);
      await disk.read(buf, 0);
      expect(buf.every((b) => b === 0x33)).toBe(true);
      await disk.close();
    } finally {
      process.chdir(cwd);
    }
  });

  it("opens the image read-only when an image file is immutable and writing was not asked", async () => {
    const dir = tempDir("hostile-ro");
    dirs.push(dir);
    const d = plain(dir, { size: SIZE, fill: 0x44, allSet: true });
    if (!spawnQuiet("chattr", ["+i", d.image])) return;
    immutable.push(d.image);
    const disk = await openDisk(d.addcow);
    expect(disk.readOnly).toBe(true);
    await expect(disk.write(Buffer.alloc(1), 0)).rejects.toThrow(/read-only/);
    await disk.close();
  });
});
