/**
 * Fuzzing the qcow2 reader: qcow2 files made by qemu-img are mutated at random
 * (bit flips and byte sets in the header, the extensions, the L1 and L2
 * tables and compressed data; boundary values in header fields; truncation;
 * extension) and opened as a backing device. Open must refuse with one
 * AddCowError line or give a device whose reads either fail with EIO or
 * return exactly what QEMU reads from the same file (qemu-img convert, when
 * QEMU can read it at all); never another exception, never a hang, never a
 * write, never unbounded memory.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AddCowError } from "../../src/util/errors";
import { type FileIO, type FileOpener, openPosixFile } from "../../src/block/file-io";
import { openBacking } from "../../src/chain/open-chain";
import { FileIOWrapper } from "../helpers/file-io-wrapper";
import { heapGrowth, withTimeout } from "../helpers/fuzz";
import { run } from "../helpers/mount";
import { HDR, compressedAt, firstCompressed, l2EntryPos, layoutOf } from "../helpers/qcow2-layout";
import {
  mixedContent,
  qemuImg,
  qemuIo,
  createQcow2,
  compressToQcow2,
} from "../helpers/qcow2-images";

const RUNS = Number(process.env.ADDCOW_FUZZ_RUNS ?? 1);

interface Base {
  name: string;
  bytes: Buffer;
  /** Other files the image needs beside it (its backing file). */
  beside: Array<[string, Buffer]>;
  /** [start, end) byte regions worth mutating: header, L1, L2, compressed data. */
  regions: Array<[number, number]>;
}

let root: string;
const bases: Base[] = [];
const MiB = 1 << 20;

async function addBase(name: string, file: string, beside: string[] = []) {
  const bytes = fs.readFileSync(file);
  const l = layoutOf(bytes);
  const regions: Array<[number, number]> = [
    [0, 112],
    [112, 1024],
    [l.l1Offset, l.l1Offset + 64],
    [l.refcountOffset, l.refcountOffset + 64],
  ];
  const l2 = l2EntryPos(bytes, 0);
  if (l2 !== null) regions.push([l2, l2 + 512]);
  const guest = firstCompressed(bytes);
  expect(guest, `${name} has a compressed cluster`).not.toBeNull();
  const c = compressedAt(bytes, guest!);
  regions.push([c.offset, c.offset + c.length]);
  bases.push({
    name,
    bytes,
    beside: beside.map((p) => [path.basename(p), fs.readFileSync(p)]),
    regions,
  });
}

beforeAll(async () => {
  root = fs.mkdtempSync("/tmp/addcow-fuzz-qcow2-");
  const f = (n: string) => path.join(root, n);
  const src = f("src.raw");
  fs.writeFileSync(src, mixedContent(3 * MiB, 3));
  await createQcow2(f("plain.qcow2"), { options: "cluster_size=64k", size: "3M" });
  await qemuIo(f("plain.qcow2"), "qcow2", [
    "write -P 1 0 512k",
    "write -z 1M 128k",
    "write -c -P 2 2M 64k",
    "write -P 3 1600k 4k",
  ]);
  await addBase("v3 64K, data, zero, compressed", f("plain.qcow2"));
  await compressToQcow2(src, f("zstd.qcow2"), "cluster_size=4k,compression_type=zstd");
  await addBase("zstd 4K, compressed", f("zstd.qcow2"));
  fs.writeFileSync(f("base.raw"), mixedContent(2 * MiB, 5));
  await createQcow2(f("v2.qcow2"), {
    options: "compat=0.10",
    backing: "base.raw",
    backingFormat: "raw",
    size: "3M",
  });
  await qemuIo(f("v2.qcow2"), "qcow2", ["write -P 4 64k 64k", "write -c -P 5 2M 64k"]);
  await addBase("v2 over raw", f("v2.qcow2"), [f("base.raw")]);
  await qemuImg([
    "create",
    "-q",
    "-f",
    "qcow2",
    "-o",
    "extended_l2=on,cluster_size=32k",
    "-b",
    "base.raw",
    "-F",
    "raw",
    f("extl2.qcow2"),
    "3M",
  ]);
  await qemuIo(f("extl2.qcow2"), "qcow2", [
    "write -P 6 0 4k",
    "write -z 8k 2k",
    "write -P 7 40k 3k",
    "write -c -P 8 2M 32k",
  ]);
  await addBase("extended L2 over raw", f("extl2.qcow2"), [f("base.raw")]);
}, 60_000);

afterAll(() => {
  if (root) fs.rmSync(root, { recursive: true, force: true });
});

const U32_AT = [
  HDR.version,
  HDR.clusterBits,
  HDR.l1Size,
  HDR.backingSize,
  HDR.refcountClusters,
  HDR.nbSnapshots,
  HDR.headerLength,
  HDR.cryptMethod,
];
const U64_AT = [
  HDR.size,
  HDR.l1Offset,
  HDR.refcountOffset,
  HDR.backingOffset,
  HDR.snapshotsOffset,
  HDR.incompatible,
];
const U32_VALUES = [
  0,
  1,
  2,
  3,
  8,
  9,
  12,
  16,
  21,
  22,
  72,
  104,
  112,
  4096,
  65536,
  2 ** 24,
  2 ** 31,
  2 ** 32 - 1,
];
const U64_VALUES = [
  0n,
  1n,
  512n,
  65536n,
  1n << 20n,
  1n << 32n,
  1n << 40n,
  1n << 53n,
  1n << 62n,
  (1n << 64n) - 1n,
];

type Mutation =
  | { kind: "flip"; region: number; at: number; bit: number }
  | { kind: "set"; region: number; at: number; value: number }
  | { kind: "u32"; field: number; value: number }
  | { kind: "u64"; field: number; value: bigint }
  | { kind: "truncate"; fraction: number }
  | { kind: "extend"; by: number };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc.record({
      kind: fc.constant("flip" as const),
      region: fc.nat(),
      at: fc.nat(),
      bit: fc.integer({ min: 0, max: 7 }),
    }),
  },
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("set" as const),
      region: fc.nat(),
      at: fc.nat(),
      value: fc.oneof(fc.constantFrom(0, 0xff, 0x80, 0x40, 1), fc.integer({ min: 0, max: 255 })),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("u32" as const),
      field: fc.constantFrom(...U32_AT),
      value: fc.oneof(fc.constantFrom(...U32_VALUES), fc.nat()),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("u64" as const),
      field: fc.constantFrom(...U64_AT),
      value: fc.constantFrom(...U64_VALUES),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("truncate" as const),
      fraction: fc.double({ min: 0, max: 1, noNaN: true }),
    }),
  },
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("extend" as const),
      by: fc.integer({ min: 1, max: 200_000 }),
    }),
  },
);

function mutate(base: Base, buf: Buffer, m: Mutation): Buffer {
  const where = (region: number, at: number) => {
    const [lo, hi] = base.regions[region % base.regions.length]!;
    return lo + (at % Math.max(1, hi - lo));
  };
  switch (m.kind) {
    case "flip": {
      const i = where(m.region, m.at);
      if (i < buf.length) buf[i]! ^= 1 << m.bit;
      return buf;
    }
    case "set": {
      const i = where(m.region, m.at);
      if (i < buf.length) buf[i] = m.value;
      return buf;
    }
    case "u32":
      if (buf.length >= m.field + 4) buf.writeUInt32BE(m.value >>> 0, m.field);
      return buf;
    case "u64":
      if (buf.length >= m.field + 8) buf.writeBigUInt64BE(m.value, m.field);
      return buf;
    case "truncate":
      return buf.subarray(0, Math.floor(buf.length * m.fraction));
    case "extend":
      return Buffer.concat([buf, Buffer.alloc(m.by, 0x5a)]);
  }
}

/** Fails any write or sync: a read-only open must never try one. */
class ReadOnlyGuard extends FileIOWrapper {
  override write(): Promise<void> {
    throw new Error(`write to ${this.path} during a read-only open`);
  }
  override sync(): Promise<void> {
    throw new Error(`sync of ${this.path} during a read-only open`);
  }
}
const guardedOpener: FileOpener = async (p, mode) => {
  expect(mode).toBe("read");
  return new ReadOnlyGuard(await openPosixFile(p, mode)) as FileIO;
};

let caseNo = 0;
const outcomes = { refused: 0, opened: 0, readsOk: 0, readsEio: 0, compared: 0 };

async function runCase(baseIndex: number, mutations: Mutation[], reads: Array<[number, number]>) {
  const base = bases[baseIndex % bases.length]!;
  const dir = path.join(root, `c${caseNo++}`);
  fs.mkdirSync(dir);
  try {
    let bytes: Buffer = Buffer.from(base.bytes);
    for (const m of mutations) bytes = mutate(base, bytes, m);
    const file = path.join(dir, "img.qcow2");
    fs.writeFileSync(file, bytes);
    for (const [name, content] of base.beside) fs.writeFileSync(path.join(dir, name), content);

    let dev;
    try {
      dev = await withTimeout(openBacking(file, "qcow2", { opener: guardedOpener }), "open");
    } catch (err) {
      if (!(err instanceof AddCowError)) throw err;
      expect(err.message).not.toMatch(/[\n\r]/);
      outcomes.refused++;
      return;
    }
    outcomes.opened++;
    let qemu: Buffer | null = null;
    try {
      const out = path.join(dir, "qemu.raw");
      const r = await run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", file, out], {
        timeoutMs: 20_000,
      });
      if (r.code === 0) qemu = fs.readFileSync(out);
      if (qemu) expect(dev.size).toBe(qemu.length);
      for (const [a, b] of reads) {
        if (dev.size === 0) break;
        const at = Math.floor(a * dev.size) % dev.size;
        const len = Math.max(1, Math.min(dev.size - at, b));
        const got = Buffer.alloc(len);
        const ok = await withTimeout(dev.read(got, at), "read").then(
          () => true,
          (err: unknown) => {
            if (!(err instanceof AddCowError) || err.code !== "EIO") throw err;
            expect(err.message).not.toMatch(/[\n\r]/);
            return false;
          },
        );
        if (!ok) {
          outcomes.readsEio++;
          continue;
        }
        outcomes.readsOk++;
        if (qemu) {
          outcomes.compared++;
          expect(got.equals(qemu.subarray(at, at + len)), `bytes at ${at}+${len}`).toBe(true);
        }
      }
      await withTimeout(
        dev.blockStatus(0, dev.size).catch((err: unknown) => {
          if (!(err instanceof AddCowError) || err.code !== "EIO") throw err;
          return [];
        }),
        "blockStatus",
      );
    } finally {
      await withTimeout(dev.close(), "close");
    }
    expect(fs.readFileSync(file).equals(bytes)).toBe(true);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe("fuzzing the qcow2 reader with mutated qemu-img images", () => {
  it(
    "refuses cleanly, fails reads with EIO, or reads what QEMU reads",
    async () => {
      const grown = await heapGrowth(async () => {
        await fc.assert(
          fc.asyncProperty(
            fc.nat(),
            fc.array(mutationArb, { minLength: 1, maxLength: 3 }),
            fc.array(
              fc.tuple(
                fc.double({ min: 0, max: 1, noNaN: true }),
                fc.oneof(fc.integer({ min: 1, max: 4096 }), fc.integer({ min: 1, max: 300_000 })),
              ),
              { minLength: 1, maxLength: 6 },
            ),
            (b, ms, reads) => runCase(b, ms, reads),
          ),
          { numRuns: 400 * RUNS, endOnFailure: true, interruptAfterTimeLimit: 40_000 * RUNS },
        );
      });
      console.log(
        `qcow2 fuzz: ${outcomes.refused} refused, ${outcomes.opened} opened; reads ${outcomes.readsOk} ok (${outcomes.compared} compared with QEMU), ${outcomes.readsEio} EIO; heap +${(grown / 2 ** 20).toFixed(1)} MiB`,
      );
      expect(grown).toBeLessThan(64 * 2 ** 20);
      expect(outcomes.opened).toBeGreaterThan(20);
      expect(outcomes.refused).toBeGreaterThan(20);
      expect(outcomes.compared).toBeGreaterThan(20);
    },
    90_000 * RUNS,
  );
});
