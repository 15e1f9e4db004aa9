import { describe, expect, it } from "vitest";
import { AddCowError } from "../../src/util/errors";
import {
  type AddCowHeader,
  FIXED_HEADER_SIZE,
  bitmapBytes,
  decodeFixedHeader,
  decodeHeader,
  describeBits,
  encodeHeader,
  headerSizeFor,
} from "../../src/addcow/header";
import { F, header, headerBytes, setFormat } from "../helpers/bad-files";

const FILE = "/disks/x.add-cow";
/** A file size large enough for any header built here (HEADER_SIZE <= 2 MiB). */
const BIG = 4 << 20;

function decode(buf: Buffer, fileSize = BIG): AddCowHeader {
  return decodeHeader(buf, FILE, fileSize);
}

/** Decoding must fail with an AddCowError naming the file and matching every pattern. */
function expectRefused(buf: Buffer, patterns: RegExp[], fileSize = BIG): AddCowError {
  let caught: unknown;
  try {
    decode(buf, fileSize);
  } catch (err) {
    caught = err;
  }
  expect(caught).toBeInstanceOf(AddCowError);
  const err = caught as AddCowError;
  expect(err.message.startsWith(`${FILE}: `)).toBe(true);
  expect(err.message).not.toContain("\n");
  // Every message ends with what to do, after a semicolon.
  expect(err.message).toMatch(/; \S.*$/);
  for (const p of patterns) expect(err.message).toMatch(p);
  return err;
}

function withBacking(): Buffer {
  return headerBytes({
    clusterBits: 12,
    backingName: "base.raw",
    backingFormat: "raw",
    imageName: "top.raw",
  });
}

describe("header round trip", () => {
  const names = [
    "d.raw",
    "disk image.raw",
    "../images/ü-ñ.raw",
    "/abs/path/to/x.img",
    "a".repeat(900),
  ];
  const cases: AddCowHeader[] = [];
  for (let bits = 12; bits <= 21; bits++) {
    for (const backing of [null, "raw", "add-cow"] as const) {
      for (const compat of [0n, 1n, 0x8000_0000_0000_0002n]) {
        const i = cases.length;
        cases.push(
          header({
            clusterBits: bits,
            compatibleFeatures: compat,
            imageName: names[i % names.length]!,
            backingName: backing === null ? null : `base-${i}.${backing}`,
            backingFormat: backing,
          }),
        );
      }
    }
  }
  // A header larger than the minimum (a writer may leave room) is fine too.
  cases.push(header({ clusterBits: 12, headerSize: 65536, backingName: "b", imageName: "i" }));

  it.each(cases.map((h) => [h.clusterBits, h.backingFormat, h.compatibleFeatures, h]))(
    "cluster_bits %d, backing %s, compatible %s",
    (_bits, _fmt, _compat, h) => {
      const buf = encodeHeader(h);
      expect(buf.length).toBe(h.headerSize);
      expect(decode(buf)).toEqual(h);
      // Encoding what was decoded gives the same bytes.
      expect(encodeHeader(decode(buf)).equals(buf)).toBe(true);
    },
  );

  it("lays the fields out as the format says", () => {
    const buf = encodeHeader(
      header({
        clusterBits: 16,
        backingName: "base.img",
        backingFormat: "add-cow",
        imageName: "x.raw",
      }),
    );
    expect(buf.subarray(0, 4).toString("latin1")).toBe("ACOW");
    expect(buf.readUInt32LE(F.backingNameOffset)).toBe(76);
    expect(buf.readUInt32LE(F.backingNameSize)).toBe(8);
    expect(buf.readUInt32LE(F.imageNameOffset)).toBe(84);
    expect(buf.readUInt32LE(F.imageNameSize)).toBe(5);
    expect(buf.readUInt32LE(F.clusterBits)).toBe(16);
    expect(buf.readUInt32LE(F.headerSize)).toBe(65536);
    expect(buf.subarray(F.backingFormat, F.backingFormat + 16).toString("latin1")).toBe(
      "add-cow\0\0\0\0\0\0\0\0\0",
    );
    expect(buf.subarray(F.imageFormat, F.imageFormat + 4).toString("latin1")).toBe("raw\0");
    expect(buf.subarray(76, 89).toString("utf8")).toBe("base.imgx.raw");
    expect(buf.subarray(89).every((b) => b === 0)).toBe(true);
  });

  it("accepts names placed anywhere in the name area, in either order", () => {
    const buf = Buffer.alloc(4096);
    buf.set(headerBytes({ clusterBits: 12 }).subarray(0, FIXED_HEADER_SIZE));
    buf.writeUInt32LE(3000, F.backingNameOffset);
    buf.writeUInt32LE(4, F.backingNameSize);
    buf.writeUInt32LE(200, F.imageNameOffset);
    buf.writeUInt32LE(3, F.imageNameSize);
    setFormat(buf, F.backingFormat, "raw");
    buf.write("base", 3000);
    buf.write("img", 200);
    const h = decode(buf);
    expect(h.backingName).toBe("base");
    expect(h.imageName).toBe("img");
  });

  it("accepts a 16-character format field without NUL (revision 18) as that text", () => {
    const buf = withBacking();
    setFormat(buf, F.backingFormat, "add-cow-and-more");
    expectRefused(buf, [/backing format is "add-cow-and-more", not supported/]);
  });

  it("ignores compatible feature bits it does not know", () => {
    const buf = headerBytes();
    buf.writeBigUInt64LE(0xffff_ffff_ffff_fffen, F.compatible);
    expect(decode(buf).compatibleFeatures).toBe(0xffff_ffff_ffff_fffen);
  });

  it("sizes the bitmap one bit per cluster, padded to a whole cluster", () => {
    expect(bitmapBytes(0, 16)).toEqual({ needed: 0, padded: 0 });
    expect(bitmapBytes(1, 16)).toEqual({ needed: 1, padded: 65536 });
    expect(bitmapBytes(8 * 65536, 16)).toEqual({ needed: 65536, padded: 65536 });
    expect(bitmapBytes(8 * 65536 + 1, 16)).toEqual({ needed: 65537, padded: 131072 });
    expect(bitmapBytes(2 ** 28, 16)).toEqual({ needed: 2 ** 25, padded: 2 ** 25 });
    expect(headerSizeFor(12)).toBe(4096);
    expect(headerSizeFor(21)).toBe(2 << 20);
  });

  it("names unknown feature bits by number", () => {
    expect(describeBits(1n)).toBe("bit 0 (0x1)");
    expect(describeBits((1n << 63n) | 4n)).toBe("bits 2, 63 (0x8000000000000004)");
  });

  it("refuses to encode what it could not decode", () => {
    expect(() => encodeHeader(header({ imageName: "" }))).toThrow(AddCowError);
    expect(() => encodeHeader(header({ imageName: "x".repeat(5000), clusterBits: 12 }))).toThrow(
      /too long/,
    );
    expect(() => encodeHeader(header({ imageName: "a\nb.raw" }))).toThrow(/control character/);
  });
});

describe("header validation: one rule each", () => {
  it("magic", () => {
    const buf = headerBytes();
    buf.write("QFI\xfb", 0, "latin1");
    expectRefused(buf, [/magic is 0x514649fb \(a qcow2 image\)/, /expected "ACOW"/]);
    const old = Buffer.alloc(4096);
    old.write("ADD_COW\xff", 0, "latin1");
    expectRefused(old, [/magic is "ADD_COW\\xff": the old big-endian add-cow layout/]);
    // Binary bytes are shown in hex, never as mojibake ("À\u008aø&" before).
    const binary = headerBytes();
    Buffer.from([0xc0, 0x8a, 0xf8, 0x26]).copy(binary, 0);
    const err = expectRefused(binary, [/magic is 0xc08af826, expected "ACOW" \(0x41434f57\)/]);
    expect(err.message).not.toMatch(/[\u0080-\uffff]/);
  });

  it("empty file", () => {
    expect(() => decodeFixedHeader(Buffer.alloc(0), FILE, 0)).toThrow(/empty \(0 bytes\)/);
  });

  it("truncated fixed header", () => {
    const short = headerBytes().subarray(0, 40);
    expect(() => decodeFixedHeader(short, FILE, 40)).toThrow(
      /header is truncated: the file has 40 bytes, the fixed header needs 76/,
    );
    // A short file that is not add-cow at all is called that, not "truncated".
    expect(() => decodeFixedHeader(Buffer.from("hi"), FILE, 2)).toThrow(/magic is "hi"/);
  });

  it("truncated header area (fewer bytes than HEADER_SIZE)", () => {
    expectRefused(headerBytes().subarray(0, 1000), [/header is truncated: 1000 bytes/]);
  });

  it.each([
    [0, /HEADER_SIZE is 0, too small/],
    [2048, /HEADER_SIZE is 2048, too small \(at least 4096\)/],
    [6000, /HEADER_SIZE is 6000, not a multiple of 4096/],
    [0xfffff000, /HEADER_SIZE is 4294963200, larger than the largest valid header \(2097152\)/],
    [4 << 20, /HEADER_SIZE is 4194304, larger than/],
  ])("HEADER_SIZE %d", (size, pattern) => {
    const buf = headerBytes();
    buf.writeUInt32LE(size, F.headerSize);
    expectRefused(buf, [pattern]);
  });

  it("HEADER_SIZE larger than the file", () => {
    const buf = headerBytes({ clusterBits: 12 });
    buf.writeUInt32LE(8192, F.headerSize);
    expectRefused(buf, [/HEADER_SIZE is 8192 but the file has only 4096 bytes/], 4096);
  });

  it.each([0, 11, 22, 64, 0xffffffff])("cluster_bits %d", (bits) => {
    const buf = headerBytes();
    buf.writeUInt32LE(bits, F.clusterBits);
    expectRefused(buf, [new RegExp(`cluster_bits is ${bits}, must be 12\\.\\.21`)]);
  });

  it("unknown incompatible feature bits, named", () => {
    const buf = headerBytes();
    buf.writeBigUInt64LE((1n << 0n) | (1n << 40n), F.incompatible);
    expectRefused(buf, [
      /incompatible features has unknown bits 0, 40 \(0x10000000001\)/,
      /newer addcow/,
    ]);
  });

  it("backing name offset without size, and the reverse", () => {
    const a = headerBytes();
    a.writeUInt32LE(76, F.backingNameOffset);
    expectRefused(a, [/backing name offset is 76 and backing name size 0/]);
    const b = headerBytes();
    b.writeUInt32LE(5, F.backingNameSize);
    expectRefused(b, [/backing name offset is 0 and backing name size 5/]);
  });

  it.each([
    ["backing name", F.backingNameOffset, F.backingNameSize],
    ["image name", F.imageNameOffset, F.imageNameSize],
  ])("%s offset inside the fixed header", (what, off, _size) => {
    const buf = withBacking();
    buf.writeUInt32LE(40, off);
    expectRefused(buf, [new RegExp(`${what} offset is 40, inside the fixed header`)]);
  });

  it.each([
    ["backing name", F.backingNameOffset, F.backingNameSize],
    ["image name", F.imageNameOffset, F.imageNameSize],
  ])("%s running past HEADER_SIZE (offset and size)", (what, off, size) => {
    const a = withBacking();
    a.writeUInt32LE(4090, off);
    expectRefused(
      a,
      [new RegExp(`${what} offset 4090 \\+ size \\d+ = \\d+ runs past HEADER_SIZE 4096`)],
      BIG,
    );
    const b = withBacking();
    b.writeUInt32LE(0xffffffff, size);
    expectRefused(b, [new RegExp(`${what} offset \\d+ \\+ size 4294967295 = \\d+ runs past`)]);
    const c = withBacking();
    c.writeUInt32LE(0xffffffff, off);
    expectRefused(c, [new RegExp(`${what} offset 4294967295 `)]);
  });

  it("names overlapping each other", () => {
    const buf = withBacking();
    buf.writeUInt32LE(78, F.imageNameOffset);
    expectRefused(buf, [
      /backing name \(bytes 76\.\.83\) and image name \(bytes 78\.\.\d+\) overlap/,
    ]);
  });

  it("empty image name", () => {
    const buf = headerBytes();
    buf.writeUInt32LE(0, F.imageNameSize);
    expectRefused(buf, [/image name size is 0: the image name is empty/]);
  });

  it("non-zero bytes in the name area outside the names", () => {
    for (const at of [76 + 8, 2000, 65535]) {
      const buf = headerBytes();
      buf[at] = 7;
      expectRefused(buf, [new RegExp(`name area byte at offset ${at} is 7, outside both names`)]);
    }
    // Between two names placed apart.
    const buf = withBacking();
    buf.writeUInt32LE(200, F.imageNameOffset);
    buf.copy(buf, 200, 84, 91);
    buf.fill(0, 84, 91);
    expect(decode(buf).imageName).toBe("top.raw");
    buf[150] = 1;
    expectRefused(buf, [/offset 150 is 1/]);
  });

  it("control characters and invalid UTF-8 in names", () => {
    const nul = withBacking();
    nul[78] = 0;
    expectRefused(nul, [/backing name has control byte 0x00 at offset 78/]);
    const nl = withBacking();
    nl[86] = 10;
    const err = expectRefused(nl, [/image name has control byte 0x0a at offset 86/]);
    expect(err.message).not.toContain("\n");
    const utf = withBacking();
    utf[77] = 0xc3;
    utf[78] = 0x28;
    expectRefused(utf, [/backing name \(bytes 76\.\.83\) is not valid UTF-8/]);
  });

  it("image and backing names equal", () => {
    const buf = headerBytes({ backingName: "same.raw", imageName: "same.raw" });
    expectRefused(buf, [/image name and backing name are both "same.raw"/]);
  });

  it("backing format: empty, unknown, without NUL, junk after NUL, not text", () => {
    const empty = withBacking();
    setFormat(empty, F.backingFormat, "");
    expectRefused(empty, [/backing format is empty but a backing file is named/]);
    const qcow = withBacking();
    setFormat(qcow, F.backingFormat, "vmdk");
    expectRefused(qcow, [
      /backing format is "vmdk", not supported \(supported: raw, add-cow, qcow2\)/,
    ]);
    const nonul = withBacking();
    setFormat(nonul, F.backingFormat, "rawrawrawrawrawr");
    expectRefused(nonul, [/backing format is "rawrawrawrawrawr", not supported/]);
    const junk = withBacking();
    junk[F.backingFormat + 10] = 9;
    expectRefused(junk, [
      /backing format \(bytes 44\.\.59\) has byte 9 at offset 54, after its terminating NUL/,
    ]);
    const bin = withBacking();
    bin[F.backingFormat + 1] = 0x80;
    expectRefused(bin, [/backing format is 0x728077, not printable text/]);
  });

  it("backing format without a backing name", () => {
    const buf = headerBytes();
    setFormat(buf, F.backingFormat, "raw");
    expectRefused(buf, [/backing format is "raw" but no backing file is named/]);
  });

  it("image format: empty, unknown, junk after NUL", () => {
    const empty = headerBytes();
    setFormat(empty, F.imageFormat, "");
    expectRefused(empty, [/image format is empty \(must be raw\)/]);
    const qcow = headerBytes();
    setFormat(qcow, F.imageFormat, "qcow2");
    expectRefused(qcow, [/image format is "qcow2", not supported \(supported: raw\)/]);
    const junk = headerBytes();
    junk[F.imageFormat + 15] = 1;
    expectRefused(junk, [/image format \(bytes 60\.\.75\) has byte 1 at offset 75/]);
  });
});
