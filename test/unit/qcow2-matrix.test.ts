/**
 * qcow2 images written by QEMU (qemu-img, qemu-io) read by addcow exactly as
 * `qemu-img convert -O raw` reads them, at the engine level: the qcow2 device
 * alone, an add-cow disk over it (reads, then writes against a reference
 * written the same way), and block status against `qemu-img map`. The qcow2
 * files are never modified.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { BlockDevice, ExtentKind } from "../../src/block/block-device";
import { forEachExtent } from "../../src/block/extents";
import { openBacking, openDisk } from "../../src/chain/open-chain";
import { createDisk } from "../../src/ops/create";
import { mapDevice } from "../../src/ops/map";
import { diskInfo } from "../../src/ops/info";
import { pattern } from "../helpers/pattern";
import { openPosixFile } from "../../src/block/file-io";
import { ClusterMap } from "../../src/qcow2/cluster-map";
import { loadQcow2 } from "../../src/qcow2/load";
import {
  type Qcow2Case,
  QCOW2_CASES,
  buildMatrix,
  qemuIo,
  qcow2OverAddCow,
  qemuMap,
  sha256,
  createQcow2,
} from "../helpers/qcow2-images";

/** QCOW2_CASES plus the qcow2 over an add-cow disk, in build order. */
const NAMES = [...Object.keys(QCOW2_CASES), "qcow2 over an add-cow disk"];
let root: string;
let cases: Qcow2Case[] = [];
const sums = new Map<string, string>();

beforeAll(async () => {
  root = fs.mkdtempSync("/tmp/addcow-qcow2-matrix-");
  cases = await buildMatrix(root);
  const mixed = path.join(root, "mixed");
  fs.mkdirSync(mixed);
  cases.push(
    await qcow2OverAddCow(mixed, async (addcow, base, writes) => {
      await createDisk({ file: addcow, backing: base, backingFormat: "raw" });
      const disk = await openDisk(addcow, { writable: true });
      try {
        for (const w of writes) await disk.write(w.data, w.at);
      } finally {
        await disk.close();
      }
    }),
  );
  for (const c of cases) for (const file of c.files) sums.set(file, sha256(file));
}, 240_000);

afterAll(() => {
  if (root) fs.rmSync(root, { recursive: true, force: true });
});

/** Reads the whole device in pieces of varying, unaligned lengths. */
async function readAll(dev: BlockDevice, seed: number): Promise<Buffer> {
  const out = Buffer.alloc(dev.size);
  let x = seed + 1;
  for (let pos = 0; pos < dev.size;) {
    x = (x * 1103515245 + 12345) >>> 0;
    const len = Math.min(
      dev.size - pos,
      [512, 4096, 65536, 131072, 1 << 20][x % 5]! + (x % 3) * 511,
    );
    await dev.read(out.subarray(pos, pos + len), pos);
    pos += len;
  }
  return out;
}

function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

function expectSame(got: Buffer, want: Buffer, what: string): void {
  const at = firstDifference(got, want);
  expect(at, `${what}: first difference at byte ${at}`).toBe(-1);
}

function expectUnmodified(c: Qcow2Case): void {
  for (const file of c.files) expect(sha256(file), `${file} was modified`).toBe(sums.get(file));
}

type Span = { start: number; length: number; kind: ExtentKind };

function mergeSpans(list: Span[]): Span[] {
  const out: Span[] = [];
  for (const s of list) {
    const last = out[out.length - 1];
    if (last && last.kind === s.kind && last.start + last.length === s.start)
      last.length += s.length;
    else if (s.length > 0) out.push({ ...s });
  }
  return out;
}

describe("qcow2 images made by qemu-img read like qemu-img convert -O raw", () => {
  it("builds the whole matrix", () => {
    expect(cases.length).toBe(NAMES.length);
  });

  NAMES.forEach((name, i) => {
    it(`${name}: the qcow2 device, an add-cow disk over it, writes, block status`, async () => {
      const c = cases[i]!;
      const reference = fs.readFileSync(c.reference);

      // The qcow2 device on its own.
      const dev = await openBacking(c.top, "qcow2");
      try {
        expect(dev.size, c.name).toBe(reference.length);
        expectSame(await readAll(dev, i), reference, `${c.name} (qcow2 device)`);
        expect(dev.describe().format).toBe("qcow2");

        // Block status agrees with qemu-img map (depth 0 data / zero, deeper = backing).
        if (!c.name.includes("add-cow")) {
          const want: Span[] = (await qemuMap(c.top, c.cwd)).map((e) => ({
            start: e.start,
            length: e.length,
            kind: e.depth > 0 ? "backing" : e.data ? "data" : "zero",
          }));
          const got: Span[] = [];
          await forEachExtent(dev, 0, dev.size, (e) => void got.push({ ...e }));
          expect(mergeSpans(got), c.name).toEqual(mergeSpans(want));
        }
      } finally {
        await dev.close();
      }

      // An add-cow disk over it, bigger than the qcow2: the tail reads as zeros.
      const dir = path.dirname(c.top);
      const addcow = path.join(dir, `vm${i}.add-cow`);
      fs.rmSync(addcow, { force: true });
      fs.rmSync(path.join(dir, `vm${i}.raw`), { force: true });
      await createDisk({
        file: addcow,
        backing: c.top,
        backingFormat: "qcow2",
        size: c.size + (1 << 20),
        clusterSize: 4096 << (i % 5),
      });
      const expected = Buffer.concat([reference, Buffer.alloc(1 << 20)]);
      const disk = await openDisk(addcow, { writable: true });
      try {
        expectSame(await readAll(disk, i + 100), expected, `${c.name} (add-cow over it)`);
        for (let w = 0; w < 12; w++) {
          const data = pattern(1000 + w * 9000, i * 100 + w);
          const at = Math.floor(((w * 0.37 + i * 0.11) % 1) * (disk.size - data.length));
          await disk.write(data, at);
          data.copy(expected, at);
        }
        await disk.flush();
        expectSame(await readAll(disk, i + 200), expected, `${c.name} (after writes)`);
      } finally {
        await disk.close();
      }
      const reopened = await openDisk(addcow);
      try {
        expectSame(await readAll(reopened, i + 300), expected, `${c.name} (reopened)`);
        // map resolves through the qcow2 layer: every byte has a source.
        const extents = await mapDevice(reopened);
        expect(extents.reduce((n, e) => n + e.length, 0)).toBe(reopened.size);
      } finally {
        await reopened.close();
      }
      const info = await diskInfo(addcow, { backingChain: true });
      const layer = info.backingChain![0]!;
      expect(layer.format).toBe("qcow2");
      expect(layer).toMatchObject({
        virtualSize: c.size,
        clusterSize: expect.any(Number),
        compressionType: expect.stringMatching(/^(zlib|zstd)$/),
      });
      expectUnmodified(c);
    });
  });
});

describe("the L2 cache stays bounded", () => {
  it("reading a disk that spans many L2 tables keeps at most the configured number", async () => {
    const dir = fs.mkdtempSync("/tmp/addcow-qcow2-l2-");
    try {
      const file = path.join(dir, "wide.qcow2");
      // 4K clusters: one L2 table maps 2 MiB; 64 MiB with a write in each 2 MiB = 32 tables.
      await createQcow2(file, { options: "cluster_size=4k", size: "64M" });
      await qemuIo(
        file,
        "qcow2",
        Array.from({ length: 32 }, (_, i) => `write -P ${i + 1} ${i * 2 + 1}M 4k`),
      );
      const io = await openPosixFile(file, "read");
      try {
        const { header, l1, fileSize } = await loadQcow2(io, file);
        const map = new ClusterMap(io, header, l1, file, fileSize, 4 * 4096);
        for (let pos = 0; pos < header.size; pos += 1 << 20) {
          const pieces = await map.pieces(pos, 1 << 20);
          expect(pieces.length).toBeGreaterThan(0);
          expect(map.cachedTables).toBeLessThanOrEqual(4);
        }
        expect(map.cachedTables).toBe(4);
      } finally {
        await io.close();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
