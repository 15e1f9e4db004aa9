/**
 * Fuzzing the open path: valid disks are mutated at random (bit flips, byte
 * sets, boundary values in u32/u64 fields, truncation, extension, other file
 * lengths) and opened. Open must either refuse with an AddCowError or give a
 * disk whose reads match a simple model of the files and stay in bounds;
 * never another exception, never a hang, never a write on a read-only open.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AddCowError } from "../../src/util/errors";
import { decodeHeader } from "../../src/addcow/header";
import { type FileIO, type FileOpener, openPosixFile } from "../../src/block/file-io";
import { openDisk } from "../../src/chain/open-chain";
import { F, header, tempDir } from "../helpers/bad-files";
import { FileIOWrapper } from "../helpers/file-io-wrapper";
import { heapGrowth, withTimeout } from "../helpers/fuzz";
import { bitmapBytes, encodeHeader } from "../../src/addcow/header";

const RUNS = Number(process.env.ADDCOW_FUZZ_RUNS ?? 1);

let root: string;
beforeAll(() => {
  root = tempDir("fuzz");
});
afterAll(() => {
  fs.rmSync(root, { recursive: true, force: true });
});

// ---------------------------------------------------------------------------
// Base disks.

type BackingKind = "none" | "raw" | "add-cow";

interface Base {
  clusterBits: number;
  size: number;
  backing: BackingKind;
  backingSize: number;
  /** Seed for the bitmap and the contents. */
  seed: number;
  /** Fraction of clusters allocated, in 1/8ths. */
  density: number;
  allAllocated: boolean;
}

const clusterBitsArb = fc.oneof(
  { weight: 8, arbitrary: fc.integer({ min: 12, max: 14 }) },
  { weight: 2, arbitrary: fc.integer({ min: 15, max: 18 }) },
  { weight: 1, arbitrary: fc.integer({ min: 19, max: 21 }) },
);

const baseArb: fc.Arbitrary<Base> = clusterBitsArb.chain((clusterBits) => {
  const cs = 2 ** clusterBits;
  const maxClusters = Math.max(1, Math.floor((256 * 1024) / cs));
  return fc.record({
    clusterBits: fc.constant(clusterBits),
    size: fc
      .tuple(
        fc.integer({ min: 0, max: maxClusters }),
        fc.oneof(fc.constant(0), fc.integer({ min: 1, max: cs - 1 })),
      )
      .map(([n, tail]) => Math.max(1, n * cs + tail)),
    backing: fc.constantFrom<BackingKind>("none", "raw", "raw", "add-cow"),
    backingSize: fc.integer({ min: 0, max: 300 * 1024 }),
    seed: fc.integer({ min: 0, max: 255 }),
    density: fc.integer({ min: 0, max: 8 }),
    allAllocated: fc.boolean().map((b) => b && Math.random() < 0.3),
  });
});

/** Content that differs per file (seed) and per position (a 251-byte period crosses clusters). */
function pattern(len: number, seed: number): Buffer {
  const period = Buffer.alloc(251);
  for (let i = 0; i < period.length; i++) period[i] = (i * 31 + seed) & 0xff;
  return len === 0 ? Buffer.alloc(0) : Buffer.alloc(len, period);
}

function randomBitmap(numClusters: number, clusterBits: number, seed: number, density: number) {
  const bitmap = Buffer.alloc(bitmapBytes(numClusters, clusterBits).padded);
  let x = seed * 2654435761 + 1;
  for (let c = 0; c < numClusters; c++) {
    x = (x * 1103515245 + 12345) >>> 0;
    if ((x >>> 16) % 8 < density) bitmap[c >> 3]! |= 1 << (c & 7);
  }
  return bitmap;
}

interface Files {
  dir: string;
  addcow: string;
  /** Every file with its content as written, to prove a read-only open changed nothing. */
  written: Map<string, Buffer>;
}

function writeAddCow(
  dir: string,
  name: string,
  size: number,
  clusterBits: number,
  backing: { name: string; format: "raw" | "add-cow" } | null,
  seed: number,
  density: number,
  allAllocated: boolean,
  written: Map<string, Buffer>,
): string {
  const h = header({
    clusterBits,
    imageName: `${name}.raw`,
    backingName: backing?.name ?? null,
    backingFormat: backing?.format ?? null,
    compatibleFeatures: allAllocated ? 1n : 0n,
  });
  const numClusters = Math.ceil(size / 2 ** clusterBits);
  const meta = Buffer.concat([
    encodeHeader(h),
    randomBitmap(numClusters, clusterBits, seed, density),
  ]);
  const addcow = path.join(dir, `${name}.add-cow`);
  written.set(addcow, meta);
  written.set(path.join(dir, `${name}.raw`), pattern(size, seed ^ 0x55));
  return addcow;
}

function buildBase(dir: string, b: Base): Files {
  const written = new Map<string, Buffer>();
  let backing: { name: string; format: "raw" | "add-cow" } | null = null;
  if (b.backing === "raw") {
    written.set(path.join(dir, "base.raw"), pattern(b.backingSize, b.seed ^ 0xaa));
    backing = { name: "base.raw", format: "raw" };
  } else if (b.backing === "add-cow") {
    written.set(path.join(dir, "base0.raw"), pattern(b.backingSize, b.seed ^ 0x33));
    writeAddCow(
      dir,
      "mid",
      Math.max(1, b.backingSize),
      b.clusterBits,
      { name: "base0.raw", format: "raw" },
      b.seed + 1,
      4,
      false,
      written,
    );
    backing = { name: "mid.add-cow", format: "add-cow" };
  }
  const addcow = writeAddCow(
    dir,
    "top",
    b.size,
    b.clusterBits,
    backing,
    b.seed,
    b.density,
    b.allAllocated,
    written,
  );
  return { dir, addcow, written };
}

// ---------------------------------------------------------------------------
// Mutations.

const U32_FIELDS = [
  F.backingNameOffset,
  F.backingNameSize,
  F.imageNameOffset,
  F.imageNameSize,
  F.clusterBits,
  F.headerSize,
];
const U32_VALUES = [
  0,
  1,
  2,
  11,
  12,
  16,
  21,
  22,
  32,
  63,
  64,
  75,
  76,
  77,
  80,
  84,
  100,
  4095,
  4096,
  4097,
  8192,
  65535,
  65536,
  2 ** 20,
  2 ** 21,
  2 ** 21 + 4096,
  2 ** 24,
  2 ** 31 - 1,
  2 ** 31,
  2 ** 32 - 4096,
  2 ** 32 - 1,
];
const U64_VALUES = [0n, 1n, 2n, 3n, 1n << 31n, 1n << 32n, 1n << 63n, (1n << 64n) - 1n];

type Mutation =
  | { kind: "flip"; region: number; at: number; bit: number }
  | { kind: "set"; region: number; at: number; value: number }
  | { kind: "u32"; field: number; value: number }
  | { kind: "u64"; field: number; value: bigint }
  | { kind: "truncate"; file: "top" | "image" | "backing"; fraction: number }
  | { kind: "extend"; file: "top" | "image" | "backing"; by: number; fill: number };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({
    kind: fc.constant("flip" as const),
    region: fc.constantFrom(2, 3),
    at: fc.nat(),
    bit: fc.integer({ min: 0, max: 7 }),
  }),
  fc.record({
    kind: fc.constant("flip" as const),
    region: fc.integer({ min: 0, max: 3 }),
    at: fc.nat(),
    bit: fc.integer({ min: 0, max: 7 }),
  }),
  fc.record({
    kind: fc.constant("set" as const),
    region: fc.integer({ min: 0, max: 3 }),
    at: fc.nat(),
    value: fc.oneof(fc.constantFrom(0, 0xff, 0x2f, 0x2e), fc.integer({ min: 0, max: 255 })),
  }),
  fc.record({
    kind: fc.constant("u32" as const),
    field: fc.constantFrom(...U32_FIELDS),
    value: fc.oneof(fc.constantFrom(...U32_VALUES), fc.nat()),
  }),
  fc.record({
    kind: fc.constant("u64" as const),
    field: fc.constantFrom(F.incompatible, F.compatible),
    value: fc.oneof(fc.constantFrom(...U64_VALUES), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n })),
  }),
  fc.record({
    kind: fc.constant("truncate" as const),
    file: fc.constantFrom("top" as const, "image" as const, "backing" as const),
    fraction: fc.double({ min: 0, max: 1, noNaN: true }),
  }),
  fc.record({
    kind: fc.constant("extend" as const),
    file: fc.constantFrom("top" as const, "image" as const, "backing" as const),
    by: fc.oneof(fc.integer({ min: 1, max: 16 }), fc.integer({ min: 1, max: 300_000 })),
    fill: fc.constantFrom(0, 0xff, 0x01),
  }),
);

function mutate(files: Files, m: Mutation): void {
  const top = files.addcow;
  const pick = (which: "top" | "image" | "backing"): string | undefined => {
    if (which === "top") return top;
    if (which === "image") return path.join(files.dir, "top.raw");
    return [...files.written.keys()].find((p) => /base\.raw$|mid\.add-cow$/.test(p));
  };
  const meta = files.written.get(top)!;
  const hs = meta.length >= 44 ? meta.readUInt32LE(F.headerSize) : 0;
  // Regions: fixed header, name area, start of the bitmap, anywhere.
  const where = (region: number, at: number) => {
    const ranges: Array<[number, number]> = [
      [0, 76],
      [76, 160],
      [hs, hs + 64],
      [0, meta.length],
    ];
    const [lo, hi] = ranges[region]!;
    const span = Math.max(1, Math.min(hi, meta.length) - lo);
    return lo + (at % span);
  };
  switch (m.kind) {
    case "flip": {
      const i = where(m.region, m.at);
      if (i < meta.length) meta[i]! ^= 1 << m.bit;
      return;
    }
    case "set": {
      const i = where(m.region, m.at);
      if (i < meta.length) meta[i] = m.value;
      return;
    }
    case "u32":
      if (meta.length >= m.field + 4) meta.writeUInt32LE(m.value >>> 0, m.field);
      return;
    case "u64":
      if (meta.length >= m.field + 8) meta.writeBigUInt64LE(m.value, m.field);
      return;
    case "truncate": {
      const f = pick(m.file);
      if (!f) return;
      const buf = files.written.get(f)!;
      files.written.set(f, buf.subarray(0, Math.floor(buf.length * m.fraction)));
      return;
    }
    case "extend": {
      const f = pick(m.file);
      if (!f) return;
      const buf = files.written.get(f)!;
      files.written.set(f, Buffer.concat([buf, Buffer.alloc(m.by, m.fill)]));
      return;
    }
  }
}

// ---------------------------------------------------------------------------
// The model: what the disk must read as, computed from the bytes of the files.

function readU32(buf: Buffer, off: number) {
  return buf.readUInt32LE(off);
}

function cstr(buf: Buffer, off: number): string {
  const raw = buf.subarray(off, off + 16);
  const nul = raw.indexOf(0);
  return raw.subarray(0, nul === -1 ? 16 : nul).toString("latin1");
}

/** The whole content of the add-cow disk at file, straight from the bytes. */
function modelDisk(files: Map<string, Buffer>, file: string): Buffer {
  const meta = files.get(file)!;
  const dir = path.dirname(file);
  const clusterBits = readU32(meta, F.clusterBits);
  const hs = readU32(meta, F.headerSize);
  const image = files.get(
    path.resolve(
      dir,
      meta
        .subarray(
          readU32(meta, F.imageNameOffset),
          readU32(meta, F.imageNameOffset) + readU32(meta, F.imageNameSize),
        )
        .toString("utf8"),
    ),
  )!;
  const size = image.length;
  if (meta.readBigUInt64LE(F.compatible) & 1n) return Buffer.from(image);
  const bo = readU32(meta, F.backingNameOffset);
  const bs = readU32(meta, F.backingNameSize);
  let backing: Buffer = Buffer.alloc(0);
  if (bs > 0) {
    const name = path.resolve(dir, meta.subarray(bo, bo + bs).toString("utf8"));
    backing = cstr(meta, F.backingFormat) === "raw" ? files.get(name)! : modelDisk(files, name);
  }
  const out = Buffer.alloc(size);
  const cs = 2 ** clusterBits;
  for (let c = 0; c * cs < size; c++) {
    const byte = meta[hs + (c >> 3)] ?? 0;
    const start = c * cs;
    const end = Math.min(size, start + cs);
    if ((byte >> (c & 7)) & 1) image.copy(out, start, start, end);
    else if (start < backing.length) backing.copy(out, start, start, Math.min(end, backing.length));
  }
  return out;
}

// ---------------------------------------------------------------------------
// Running one case.

interface IoRecord {
  path: string;
  op: "read" | "write" | "sync";
  pos: number;
  len: number;
  mode: "read" | "write";
}

/** Records every I/O; syncs are skipped to keep thousands of cases fast. */
class RecordingFile extends FileIOWrapper {
  constructor(
    inner: FileIO,
    private readonly log: IoRecord[],
    private readonly mode: "read" | "write",
  ) {
    super(inner);
  }

  private note(op: IoRecord["op"], pos: number, len: number): void {
    this.log.push({ path: this.path, op, pos, len, mode: this.mode });
  }

  override read(buf: Buffer, pos: number): Promise<number> {
    this.note("read", pos, buf.length);
    return this.inner.read(buf, pos);
  }

  override write(buf: Buffer, pos: number): Promise<void> {
    this.note("write", pos, buf.length);
    return this.inner.write(buf, pos);
  }

  override async sync(): Promise<void> {
    this.note("sync", 0, 0);
  }
}

function recordingOpener(log: IoRecord[]): FileOpener {
  return async (p, mode) => new RecordingFile(await openPosixFile(p, mode), log, mode);
}

let caseNo = 0;
const outcomes = { refused: 0, opened: 0 };

interface Op {
  write: boolean;
  at: number;
  len: number;
  fill: number;
}

const opsArb = fc.array(
  fc.record({
    write: fc.boolean(),
    at: fc.double({ min: 0, max: 1, noNaN: true }),
    len: fc.oneof(fc.integer({ min: 1, max: 16 }), fc.integer({ min: 1, max: 300_000 })),
    fill: fc.integer({ min: 0, max: 255 }),
  }),
  { minLength: 1, maxLength: 6 },
);

async function runCase(base: Base, mutations: Mutation[], writable: boolean, ops: Op[]) {
  const dir = path.join(root, `c${caseNo++}`);
  fs.mkdirSync(dir);
  try {
    const files = buildBase(dir, base);
    for (const m of mutations) mutate(files, m);
    for (const [p, buf] of files.written) fs.writeFileSync(p, buf);

    const log: IoRecord[] = [];
    let disk;
    try {
      disk = await withTimeout(
        openDisk(files.addcow, { writable, opener: recordingOpener(log) }),
        "open",
      );
    } catch (err) {
      if (!(err instanceof AddCowError)) throw err;
      expect(err.message).not.toMatch(/[\n\r]/);
      outcomes.refused++;
      for (const [p, buf] of files.written) expect(fs.readFileSync(p).equals(buf)).toBe(true);
      expect(log.filter((r) => r.op !== "read")).toEqual([]);
      return;
    }
    outcomes.opened++;
    try {
      // What opened must be what the bytes say.
      const meta = files.written.get(files.addcow)!;
      decodeHeader(meta.subarray(0, Math.min(meta.length, 2 << 20)), files.addcow, meta.length);
      const expected = modelDisk(files.written, files.addcow);
      expect(disk.size).toBe(expected.length);
      for (const op of ops) {
        if (disk.size === 0) break;
        const at = Math.min(disk.size - 1, Math.floor(op.at * disk.size));
        const len = Math.min(op.len, disk.size - at);
        if (writable && op.write) {
          const data = Buffer.alloc(len, op.fill);
          await withTimeout(disk.write(data, at), "write");
          data.copy(expected, at);
        } else {
          const got = Buffer.alloc(len);
          await withTimeout(disk.read(got, at), "read");
          expect(got.equals(expected.subarray(at, at + len))).toBe(true);
        }
      }
      // Past the end is refused cleanly.
      await expect(disk.read(Buffer.alloc(1), disk.size)).rejects.toBeInstanceOf(AddCowError);
      if (writable) {
        await withTimeout(disk.flush(), "flush");
        const all = Buffer.alloc(disk.size);
        await disk.read(all, 0);
        expect(all.equals(expected)).toBe(true);
      }
    } finally {
      await withTimeout(disk.close(), "close");
    }
    // Every I/O stayed inside its file's valid range; the chain was read-only.
    const imagePath = path.join(dir, "top.raw");
    const imageSize = files.written.get(imagePath)!.length;
    for (const r of log) {
      if (r.op === "sync") continue;
      if (r.path === imagePath) expect(r.pos + r.len).toBeLessThanOrEqual(imageSize);
      if (r.path !== files.addcow && r.path !== imagePath) {
        expect(r.mode).toBe("read");
        expect(r.op).toBe("read");
      }
      if (!writable) expect(r.op).toBe("read");
    }
    if (!writable) {
      for (const [p, buf] of files.written) expect(fs.readFileSync(p).equals(buf)).toBe(true);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

describe("fuzzing openDisk with mutated files", () => {
  it(
    "refuses cleanly or reads as the model says (read-only)",
    async () => {
      const grown = await heapGrowth(async () => {
        await fc.assert(
          fc.asyncProperty(
            baseArb,
            fc.array(mutationArb, { minLength: 0, maxLength: 4 }),
            opsArb,
            (b, ms, ops) => runCase(b, ms, false, ops),
          ),
          { numRuns: 2500 * RUNS, endOnFailure: true, interruptAfterTimeLimit: 35_000 * RUNS },
        );
      });
      console.log(
        `read-only fuzz: ${outcomes.refused} refused, ${outcomes.opened} opened, heap +${(grown / 2 ** 20).toFixed(1)} MiB`,
      );
      expect(grown).toBeLessThan(64 * 2 ** 20);
      expect(outcomes.opened).toBeGreaterThan(100);
      expect(outcomes.refused).toBeGreaterThan(100);
    },
    60_000 * RUNS,
  );

  it(
    "refuses cleanly or reads back what was written (writable)",
    async () => {
      await fc.assert(
        fc.asyncProperty(
          baseArb,
          fc.array(mutationArb, { minLength: 0, maxLength: 3 }),
          opsArb,
          (b, ms, ops) => runCase(b, ms, true, ops),
        ),
        { numRuns: 600 * RUNS, endOnFailure: true, interruptAfterTimeLimit: 12_000 * RUNS },
      );
    },
    30_000 * RUNS,
  );

  it("never throws anything but AddCowError on random header bytes", () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ minLength: 0, maxLength: 300 }),
        fc.integer({ min: 0, max: 2 ** 32 }),
        (bytes, fileSize) => {
          const buf = Buffer.alloc(4096);
          buf.write("ACOW", 0, "latin1");
          Buffer.from(bytes).copy(buf, 4);
          try {
            decodeHeader(buf, "/f.add-cow", fileSize);
          } catch (err) {
            if (!(err instanceof AddCowError)) throw err;
          }
        },
      ),
      { numRuns: 20_000 * RUNS },
    );
  });
});
