/**
 * Sizes at the edges: a 16 TiB sparse disk opens and works with bounded memory,
 * and a disk whose size is not a multiple of the cluster size is never read or
 * written past its end.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import * as v8 from "node:v8";
import * as vm from "node:vm";
import { afterAll, describe, expect, it } from "vitest";
import { createDisk } from "../../src/ops/create";
import { headerSizeFor } from "../../src/addcow/header";
import { openDisk } from "../../src/chain/open-chain";
import { AddCowError } from "../../src/util/errors";
import { type FileOpener, openPosixFile } from "../../src/block/file-io";
import { writeRaw } from "../helpers/bad-files";

v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc") as () => void;

const TiB = 2 ** 40;
const dirs: string[] = [];
afterAll(() => {
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

/** tmpfs holds a sparse 16 TiB file; ext4 stops 4 KiB short of it. */
function bigDir(): string {
  const base = fs.existsSync("/dev/shm") ? "/dev/shm" : os.tmpdir();
  const dir = fs.mkdtempSync(path.join(base, "addcow-big-"));
  dirs.push(dir);
  return dir;
}

function fillPattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 13 + seed) & 0xff;
  return b;
}

describe("a 16 TiB virtual disk", () => {
  it.each([
    [65536, "default 64 KiB"],
    [4096, "4 KiB (2^32 clusters)"],
  ])(
    "cluster size %d (%s): opens, writes far apart, reads and closes in bounded memory",
    async (cs) => {
      const dir = bigDir();
      const file = path.join(dir, "big.add-cow");
      let size = 16 * TiB;
      try {
        await createDisk({ file, size, clusterSize: cs });
      } catch (err) {
        // A file system that cannot hold it (ext4: 16 TiB - 4 KiB at most): the largest it can.
        if (!/too large|EFBIG/i.test(String(err))) throw err;
        fs.rmSync(path.join(dir, "big.raw"), { force: true });
        size = 16 * TiB - 4096;
        await createDisk({ file, size, clusterSize: cs });
      }
      gc();
      const heapBefore = process.memoryUsage().heapUsed;
      const started = Date.now();

      const disk = await openDisk(file, { writable: true, bitmapCacheBytes: 1 << 20 });
      expect(disk.size).toBe(size);
      const writes: Array<[number, Buffer]> = [
        [100, fillPattern(5000, 1)],
        [Math.floor(size / 2) + 12345, fillPattern(3 * cs, 2)],
        [size - 7, fillPattern(7, 3)],
        [size - cs - 10, fillPattern(5, 4)],
      ];
      for (const [at, data] of writes) await disk.write(data, at);
      for (const [at, data] of writes) {
        const got = Buffer.alloc(data.length);
        await disk.read(got, at);
        expect(got.equals(data)).toBe(true);
      }
      const zeros = Buffer.alloc(4096, 1);
      await disk.read(zeros, 4 * TiB);
      expect(zeros.every((b) => b === 0)).toBe(true);
      await expect(disk.write(Buffer.alloc(8), size - 4)).rejects.toBeInstanceOf(AddCowError);
      await disk.close();

      const again = await openDisk(file, { bitmapCacheBytes: 1 << 20 });
      for (const [at, data] of writes) {
        const got = Buffer.alloc(data.length);
        await again.read(got, at);
        expect(got.equals(data)).toBe(true);
      }
      if (cs === 65536) {
        // Scans the whole 32 MiB bitmap through a 1 MiB cache.
        const expected = 1 + 4 + 1 + 1;
        expect(await again.countAllocated()).toBe(expected);
      }
      await again.close();
      const elapsed = Date.now() - started;
      gc();
      const grown = process.memoryUsage().heapUsed - heapBefore;
      console.log(
        `16 TiB disk, ${cs}-byte clusters: ${elapsed} ms, heap +${(grown / 2 ** 20).toFixed(1)} MiB`,
      );
      // Sanity bounds only, far above what it needs.
      expect(grown).toBeLessThan(64 * 2 ** 20);
      expect(elapsed).toBeLessThan(45_000);
      // The image file stays sparse: only what was written takes space. The .add-cow
      // file holds its whole bitmap for real (setting a bit must never need a new block).
      expect(fs.statSync(path.join(dir, "big.raw")).blocks * 512).toBeLessThan(64 * 2 ** 20);
      const metaBytes = fs.statSync(file).size;
      expect(metaBytes).toBe(headerSizeFor(Math.log2(cs)) + Math.ceil(size / cs / 8 / cs) * cs);
      expect(fs.statSync(file).blocks * 512).toBeGreaterThanOrEqual(metaBytes);
      expect(fs.statSync(file).blocks * 512).toBeLessThan(metaBytes + 64 * 2 ** 20);
      expect(fs.statSync(path.join(dir, "big.raw")).size).toBe(size);
    },
  );
});

describe("a disk size that is not a multiple of the cluster size", () => {
  const CS = 4096;

  /** Records every I/O so no access past a file's end goes unnoticed. */
  function recording(log: Array<{ p: string; op: string; end: number }>): FileOpener {
    return async (p, mode) => {
      const f = await openPosixFile(p, mode);
      const wrap = Object.create(f) as typeof f;
      wrap.read = (buf, pos) => {
        log.push({ p, op: "read", end: pos + buf.length });
        return f.read(buf, pos);
      };
      wrap.write = (buf, pos) => {
        log.push({ p, op: "write", end: pos + buf.length });
        return f.write(buf, pos);
      };
      return wrap;
    };
  }

  it.each([
    ["backing longer than the disk", 3 * CS + 1000, 10 * CS],
    ["backing ending inside the partial cluster", 3 * CS + 1000, 3 * CS + 500],
    ["backing shorter than the disk", 3 * CS + 1000, CS + 7],
    ["one partial cluster only", 1000, 5000],
    ["a disk of one byte", 1, 1],
  ])("%s: reads and writes at the end, never past it", async (_name, size, backingSize) => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "addcow-tail-"));
    dirs.push(dir);
    const backing = writeRaw(path.join(dir, "base.raw"), backingSize, 0x77);
    const file = path.join(dir, "d.add-cow");
    const cwd = process.cwd();
    process.chdir(dir);
    try {
      await createDisk({ file, size, backing: "base.raw", backingFormat: "raw", clusterSize: CS });
    } finally {
      process.chdir(cwd);
    }
    const image = path.join(dir, "d.raw");
    const model = Buffer.alloc(size);
    model.fill(0x77, 0, Math.min(size, backingSize));

    const log: Array<{ p: string; op: string; end: number }> = [];
    const disk = await openDisk(file, { writable: true, opener: recording(log) });
    expect(disk.size).toBe(size);
    const all = Buffer.alloc(size);
    await disk.read(all, 0);
    expect(all.equals(model)).toBe(true);

    // The last byte, the last few bytes, and a write crossing into the partial cluster.
    const edits: Array<[number, number]> = [
      [size - 1, 1],
      [Math.max(0, size - 300), Math.min(size, 200)],
      [Math.max(0, size - 1500), Math.min(size, 1400)],
    ];
    let seed = 1;
    for (const [at, len] of edits) {
      const data = Buffer.alloc(len, seed++);
      await disk.write(data, at);
      data.copy(model, at);
    }
    for (const [at, len] of [
      [size - 1, 1],
      [0, size],
    ] as const) {
      const got = Buffer.alloc(len);
      await disk.read(got, at);
      expect(got.equals(model.subarray(at, at + len))).toBe(true);
    }
    // Past the end: refused, whatever the alignment.
    for (const [at, len] of [
      [size, 1],
      [size - 1, 2],
      [size + CS, 1],
      [-1, 1],
    ] as const) {
      await expect(disk.write(Buffer.alloc(len), at)).rejects.toBeInstanceOf(AddCowError);
      await expect(disk.read(Buffer.alloc(len), at)).rejects.toBeInstanceOf(AddCowError);
    }
    await disk.close();

    // Nothing went past the end of the image or the backing file; neither grew.
    expect(fs.statSync(image).size).toBe(size);
    expect(fs.statSync(backing).size).toBe(backingSize);
    for (const r of log) {
      if (r.p === image) expect(r.end).toBeLessThanOrEqual(size);
      if (r.p === backing) {
        expect(r.op).toBe("read");
        expect(r.end).toBeLessThanOrEqual(backingSize);
      }
    }
    const again = await openDisk(file);
    const got = Buffer.alloc(size);
    await again.read(got, 0);
    expect(got.equals(model)).toBe(true);
    await again.close();
  });
});
