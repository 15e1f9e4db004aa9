/**
 * Hostile and damaged qcow2 files: every refusal is one line naming the field
 * (AddCowError, reason bad-field or chain), nothing is modified; damage that
 * is only found when a cluster is read fails exactly the reads of that
 * cluster with EIO while every other byte still reads right.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { AddCowError } from "../../src/util/errors";
import { MAX_CHAIN_DEPTH, openBacking, openDisk } from "../../src/chain/open-chain";
import { createDisk } from "../../src/ops/create";
import type { BlockDevice } from "../../src/block/block-device";
import { HDR, compressedAt, l2EntryPos, layoutOf, patch } from "../helpers/qcow2-layout";
import {
  convertToRaw,
  qemuImg,
  qemuIo,
  setBackingFormat,
  sha256,
  createQcow2,
} from "../helpers/qcow2-images";
import { run } from "../helpers/mount";

const KiB = 1024;
const MiB = 1 << 20;
let root: string;
let n = 0;

/** Templates: name -> file made by qemu-img; references by name. */
const template: Record<string, string> = {};
const reference: Record<string, Buffer> = {};

beforeAll(async () => {
  root = fs.mkdtempSync("/tmp/addcow-qcow2-hostile-");
  const t = (name: string) => path.join(root, name);
  // Data at 0..1M, a compressed cluster at 2M, zeros elsewhere.
  for (const [name, opts] of [
    ["zlib.qcow2", "cluster_size=64k"],
    ["zstd.qcow2", "cluster_size=64k,compression_type=zstd"],
    ["extl2.qcow2", "cluster_size=64k,extended_l2=on"],
  ] as const) {
    await createQcow2(t(name), { options: opts, size: "4M" });
    await qemuIo(t(name), "qcow2", [
      "write -P 7 0 1M",
      "write -c -P 9 2M 64k",
      "write -c -P 10 3M 64k",
      "write -P 11 1536k 8k",
    ]);
    template[name] = t(name);
  }
  await qemuImg(["create", "-q", "-f", "raw", t("base.raw"), "4M"]);
  await createQcow2(t("over.qcow2"), { backing: "base.raw", backingFormat: "raw" });
  await createQcow2(t("datafile.qcow2"), {
    options: `data_file=${t("datafile.data")}`,
    size: "1M",
  });
  await qemuIo(t("datafile.qcow2"), "qcow2", ["write -P 3 0 128k"]);
  template["datafile.qcow2"] = t("datafile.qcow2");
  template["over.qcow2"] = t("over.qcow2");
  await qemuImg([
    "create",
    "-q",
    "--object",
    "secret,id=s0,data=abc",
    "-f",
    "qcow2",
    "-o",
    "encrypt.format=aes,encrypt.key-secret=s0,compat=0.10",
    t("aes.qcow2"),
    "1M",
  ]);
  template["aes.qcow2"] = t("aes.qcow2");
  for (const name of ["zlib.qcow2", "zstd.qcow2", "extl2.qcow2"]) {
    await convertToRaw(t(name), t(`${name}.raw`));
    reference[name] = fs.readFileSync(t(`${name}.raw`));
  }
}, 60_000);

afterAll(() => {
  if (root) fs.rmSync(root, { recursive: true, force: true });
});

/** A private copy of a template (with base.raw beside it when it has a backing). */
function copyOf(name: string): string {
  const dir = path.join(root, `c${n++}`);
  fs.mkdirSync(dir);
  const file = path.join(dir, name);
  fs.copyFileSync(template[name]!, file);
  if (name === "over.qcow2")
    fs.copyFileSync(path.join(root, "base.raw"), path.join(dir, "base.raw"));
  return file;
}

function setU32(buf: Buffer, at: number, v: number) {
  buf.writeUInt32BE(v >>> 0, at);
}
function setU64(buf: Buffer, at: number, v: bigint) {
  buf.writeBigUInt64BE(v, at);
}

/** The bytes of a `qemu-io -c "read -v"` hex dump. */
function hexdumpBytes(text: string): Buffer {
  const bytes: number[] = [];
  for (const line of text.split("\n")) {
    const m = /^[0-9a-f]{8}:((?: [0-9a-f]{2}){1,16})/.exec(line);
    if (m) for (const h of m[1]!.trim().split(" ")) bytes.push(parseInt(h, 16));
  }
  return Buffer.from(bytes);
}

/** Opening must fail with one line naming the field; the file is not modified. */
async function expectRefused(
  file: string,
  message: RegExp,
  fields: { field?: string | RegExp; reason?: string } = {},
): Promise<AddCowError> {
  const before = sha256(file);
  let error: unknown;
  try {
    const dev = await openBacking(file, "qcow2");
    await dev.close();
  } catch (err) {
    error = err;
  }
  expect(error, `${file} opened`).toBeInstanceOf(AddCowError);
  const e = error as AddCowError;
  expect(e.message).toMatch(message);
  expect(e.message).not.toMatch(/[\n\r]/);
  expect(e.reason).toBe(fields.reason ?? "bad-field");
  if (fields.field instanceof RegExp) expect(e.field).toMatch(fields.field);
  else if (fields.field) expect(e.field).toBe(fields.field);
  expect(sha256(file)).toBe(before);
  return e;
}

/** Reads [at, at + len) and expects EIO naming the damaged entry. */
async function expectEio(dev: BlockDevice, at: number, len: number, message: RegExp) {
  const err = await dev.read(Buffer.alloc(len), at).then(
    () => null,
    (e: unknown) => e,
  );
  expect(err, `read at ${at} succeeded`).toBeInstanceOf(AddCowError);
  expect((err as AddCowError).code).toBe("EIO");
  expect((err as AddCowError).message).toMatch(message);
  expect((err as AddCowError).message).not.toMatch(/[\n\r]/);
}

async function expectReads(dev: BlockDevice, ref: Buffer, at: number, len: number) {
  const got = Buffer.alloc(len);
  await dev.read(got, at);
  expect(got.equals(ref.subarray(at, at + len)), `bytes at ${at}`).toBe(true);
}

/** Set by a case that cuts its file short (applied after the patch is written). */
let truncateTo: (b: Buffer, at: number) => void = () => undefined;

describe("hostile qcow2 headers and tables are refused at open", () => {
  const cases: Array<[string, string, (b: Buffer) => void, RegExp, string | RegExp]> = [
    [
      "huge l1_size",
      "zlib.qcow2",
      (b) => setU32(b, HDR.l1Size, 0xffffffff),
      /l1_size is 4294967295 entries .* larger than the 33554432-byte limit/,
      "l1_size",
    ],
    [
      "l1_size too small for the virtual size",
      "zlib.qcow2",
      (b) => setU64(b, HDR.size, 1n << 40n),
      /l1_size is 1, too small for the virtual size/,
      "l1_size",
    ],
    [
      "virtual size beyond 2^53",
      "zlib.qcow2",
      (b) => setU64(b, HDR.size, 1n << 60n),
      /size is 1152921504606846976, larger than any file/,
      "size",
    ],
    [
      "L1 table overlapping the header",
      "zlib.qcow2",
      (b) => setU64(b, HDR.l1Offset, 0n),
      /l1_table_offset is 0: the table would overlap the header cluster/,
      "l1_table_offset",
    ],
    [
      "L1 table offset unaligned",
      "zlib.qcow2",
      (b) => setU64(b, HDR.l1Offset, 196608n + 512n),
      /l1_table_offset is 197120, not aligned/,
      "l1_table_offset",
    ],
    [
      "L1 entry pointing past the end of the file",
      "zlib.qcow2",
      (b) => setU64(b, layoutOf(b).l1Offset, (1n << 63n) | (1n << 40n)),
      /L1 entry 0 points the L2 table at 1099511627776, past the end of the file/,
      "L1 entry 0",
    ],
    [
      "L1 entry unaligned",
      "zlib.qcow2",
      (b) => setU64(b, layoutOf(b).l1Offset, b.readBigUInt64BE(layoutOf(b).l1Offset) + 512n),
      /L1 entry 0 points at \d+, not aligned to the cluster size 65536/,
      "L1 entry 0",
    ],
    [
      "refcount table overlapping the header",
      "zlib.qcow2",
      (b) => setU64(b, HDR.refcountOffset, 0n),
      /refcount_table_offset is 0: the table would overlap the header cluster/,
      "refcount_table_offset",
    ],
    [
      "refcount table entry past the end of the file",
      "zlib.qcow2",
      (b) => setU64(b, layoutOf(b).refcountOffset, 1n << 45n),
      /refcount table entry 0 points the refcount block at 35184372088832, past the end/,
      "refcount table entry 0",
    ],
    [
      "refcount table entry in the header cluster",
      "zlib.qcow2",
      (b) => setU64(b, layoutOf(b).refcountOffset + 8, 4096n),
      /refcount table entry 1 points at 4096, not aligned/,
      "refcount table entry 1",
    ],
    [
      "absurd refcount table size",
      "zlib.qcow2",
      (b) => setU32(b, HDR.refcountClusters, 0x7fffffff),
      /refcount_table_clusters is 2147483647, larger than the 8388608-byte limit/,
      "refcount_table_clusters",
    ],
    [
      "truncated L1 table",
      "zlib.qcow2",
      (b) => truncateTo(b, layoutOf(b).l1Offset + 4),
      /l1_table_offset is 196608: the table \(8 bytes\) runs past the end of the file \(196612 bytes\)/,
      "l1_table_offset",
    ],
    [
      "truncated L2 table",
      "zlib.qcow2",
      (b) => truncateTo(b, l2EntryPos(b, 0)! + 100),
      /L1 entry 0 points the L2 table at \d+, past the end of the file/,
      "L1 entry 0",
    ],
    [
      "AES encryption (qemu-img made)",
      "aes.qcow2",
      () => undefined,
      /crypt_method is 1 \(AES encryption\): encrypted qcow2 images are not supported/,
      "crypt_method",
    ],
    [
      "LUKS encryption",
      "zlib.qcow2",
      (b) => setU32(b, HDR.cryptMethod, 2),
      /crypt_method is 2 \(LUKS encryption\)/,
      "crypt_method",
    ],
    [
      "full disk encryption extension",
      "zlib.qcow2",
      (b) => setU32(b, b.readUInt32BE(HDR.headerLength), 0x0537be77),
      /full disk encryption extension is present/,
      "full disk encryption extension",
    ],
    [
      "unknown incompatible bits 5 and 40",
      "zlib.qcow2",
      (b) => setU64(b, HDR.incompatible, (1n << 5n) | (1n << 40n)),
      /incompatible_features has unknown bits 5, 40 set/,
      "incompatible_features",
    ],
    [
      "unknown incompatible bit named by the feature table",
      "zlib.qcow2",
      (b) => {
        const ext = b.readUInt32BE(HDR.headerLength) + 8;
        for (let i = 0; i < 8; i++)
          if (b[ext + i * 48] === 0 && b[ext + i * 48 + 1] === 4) b[ext + i * 48 + 1] = 9;
        setU64(b, HDR.incompatible, 1n << 9n);
      },
      /unknown bit 9 \("extended L2 entries"\) set/,
      "incompatible_features",
    ],
    [
      "version 1",
      "zlib.qcow2",
      (b) => setU32(b, HDR.version, 1),
      /version is 1; addcow reads versions 2 and 3/,
      "version",
    ],
    ["version 4", "zlib.qcow2", (b) => setU32(b, HDR.version, 4), /version is 4/, "version"],
    [
      "cluster_bits 30",
      "zlib.qcow2",
      (b) => setU32(b, HDR.clusterBits, 30),
      /cluster_bits is 30, must be 9..21/,
      "cluster_bits",
    ],
    [
      "header_length not a multiple of 8",
      "zlib.qcow2",
      (b) => setU32(b, HDR.headerLength, 106),
      /header_length is 106/,
      "header_length",
    ],
    [
      "compression_type 2",
      "zlib.qcow2",
      (b) => {
        b[HDR.compressionType] = 2;
      },
      /compression_type is 2; supported: 0 \(zlib\), 1 \(zstd\)/,
      "compression_type",
    ],
    [
      "compression type bit without a type",
      "zlib.qcow2",
      (b) => setU64(b, HDR.incompatible, 8n),
      /compression type bit \(3\) set but compression_type is 0/,
      "incompatible_features",
    ],
    [
      "external data file bit without a name",
      "zlib.qcow2",
      (b) => setU64(b, HDR.incompatible, 4n),
      /external data file bit \(2\) set but no data file name extension/,
      "incompatible_features",
    ],
    [
      "header extension longer than its area",
      "zlib.qcow2",
      (b) => setU32(b, b.readUInt32BE(HDR.headerLength) + 4, 0x7fffffff),
      /header extension 0x6803f857 is 2147483647 bytes long/,
      "header extension 0x6803f857",
    ],
    [
      "too many snapshots",
      "zlib.qcow2",
      (b) => setU32(b, HDR.nbSnapshots, 1_000_000),
      /nb_snapshots is 1000000, more than 65536/,
      "nb_snapshots",
    ],
    [
      "not a qcow2 file",
      "zlib.qcow2",
      (b) => b.write("QFI\x00", 0, "latin1"),
      /magic is missing: not a qcow2 image/,
      "magic",
    ],
    [
      "backing name too long",
      "over.qcow2",
      (b) => setU32(b, HDR.backingSize, 5000),
      /backing_file_size is 5000/,
      "backing_file_size",
    ],
    [
      "backing name a json: pseudo-protocol",
      "over.qcow2",
      (b) => {
        const at = Number(b.readBigUInt64BE(HDR.backingOffset));
        b.write("json:{}\0", at, "latin1");
        setU32(b, HDR.backingSize, 7);
      },
      /backing file name "json:\{\}" is not a local file/,
      "backing file name",
    ],
    [
      "no backing format recorded",
      "over.qcow2",
      (b) => setU32(b, b.readUInt32BE(HDR.headerLength), 0x12345678),
      /names backing file "base.raw" but records no backing format \(formats are never guessed\)/,
      "backing format extension",
    ],
  ];
  for (const [name, tpl, mutate, message, field] of cases) {
    it(name, async () => {
      const file = copyOf(tpl);
      let cut: number | undefined;
      truncateTo = (_b, at) => void (cut = at);
      patch(file, mutate);
      if (cut !== undefined) fs.truncateSync(file, cut);
      await expectRefused(file, message, { field });
    });
  }

  it("a qcow2 chain deeper than MAX_CHAIN_DEPTH is refused; one at the limit opens", async () => {
    const dir = path.join(root, `deep${n++}`);
    fs.mkdirSync(dir);
    const layer = (i: number) => path.join(dir, `l${i}.qcow2`);
    await createQcow2(layer(0), { size: "1M" });
    await qemuIo(layer(0), "qcow2", ["write -P 9 0 4k"]);
    for (let i = 1; i <= MAX_CHAIN_DEPTH; i++) {
      await createQcow2(layer(i), { backing: `l${i - 1}.qcow2`, backingFormat: "qcow2" });
    }
    const atLimit = await openBacking(layer(MAX_CHAIN_DEPTH - 1), "qcow2");
    try {
      const got = Buffer.alloc(4096);
      await atLimit.read(got, 0);
      expect(got.equals(Buffer.alloc(4096, 9))).toBe(true);
    } finally {
      await atLimit.close();
    }
    await expectRefused(
      layer(MAX_CHAIN_DEPTH),
      /the backing chain is deeper than MAX_CHAIN_DEPTH = 64/,
      {
        reason: "chain",
      },
    );
  });

  it("backing format vmdk: not a supported backing format", async () => {
    const file = copyOf("over.qcow2");
    setBackingFormat(file, "vmdk");
    await expectRefused(file, /backing format is "vmdk", not supported for a backing file/);
  });

  it("a backing-name loop (a -> b -> a) and a self loop", async () => {
    const dir = path.join(root, `loop${n++}`);
    fs.mkdirSync(dir);
    const a = path.join(dir, "a.qcow2");
    const b = path.join(dir, "b.qcow2");
    await createQcow2(a, { size: "1M" });
    await createQcow2(b, { backing: "a.qcow2", backingFormat: "qcow2" });
    await qemuImg(["rebase", "-q", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a]);
    await expectRefused(
      b,
      /the backing chain loops: backing file .*a\.qcow2.* is backing file .*b\.qcow2|the backing chain loops/,
      { reason: "chain" },
    );
    const self = path.join(dir, "self.qcow2");
    await createQcow2(self, { size: "1M" });
    await qemuImg(["rebase", "-q", "-u", "-f", "qcow2", "-b", "self.qcow2", "-F", "qcow2", self]);
    await expectRefused(self, /the backing chain loops/, { reason: "chain" });
    // Through an add-cow disk too: create refuses the chain with the same line.
    await expect(
      createDisk({ file: path.join(dir, "vm.add-cow"), backing: b, backingFormat: "qcow2" }),
    ).rejects.toThrow(/the backing chain loops/);
    expect(fs.existsSync(path.join(dir, "vm.add-cow"))).toBe(false);
  });
});

describe("damage found at read time fails only the reads it affects (EIO)", () => {
  async function withDamaged(
    tpl: string,
    mutate: (b: Buffer) => void,
    check: (dev: BlockDevice, ref: Buffer) => Promise<void>,
  ) {
    const file = copyOf(tpl);
    patch(file, mutate);
    const before = sha256(file);
    const dev = await openBacking(file, "qcow2");
    try {
      await check(dev, reference[tpl]!);
    } finally {
      await dev.close();
    }
    expect(sha256(file)).toBe(before);
  }

  it("L2 entry past the end of the file", async () => {
    await withDamaged(
      "zlib.qcow2",
      (b) => setU64(b, l2EntryPos(b, 64 * KiB)!, (1n << 63n) | (1n << 40n)),
      async (dev, ref) => {
        await expectEio(
          dev,
          64 * KiB + 100,
          10,
          /L2 entry for guest offset 65536 points at 1099511627776, past the end of the file/,
        );
        await expectEio(dev, 0, 256 * KiB, /past the end of the file/);
        await expectReads(dev, ref, 0, 64 * KiB);
        await expectReads(dev, ref, 128 * KiB, 4 * MiB - 128 * KiB);
        // blockStatus refuses the range too, rather than call it data.
        await expect(dev.blockStatus(0, dev.size)).rejects.toMatchObject({ code: "EIO" });
      },
    );
  });

  it("external data file: an L2 entry beyond 2^53 bytes", async () => {
    const file = copyOf("datafile.qcow2");
    patch(file, (b) => setU64(b, l2EntryPos(b, 64 * KiB)!, (1n << 63n) | (1n << 54n)));
    const dev = await openBacking(file, "qcow2");
    try {
      await expectEio(
        dev,
        64 * KiB,
        4096,
        /points at 18014398509481984, beyond any file addcow can read/,
      );
      const got = Buffer.alloc(4096);
      await dev.read(got, 0);
      expect(got.equals(Buffer.alloc(4096, 3))).toBe(true);
      expect(dev.describe().files).toHaveLength(2);
    } finally {
      await dev.close();
    }
  });

  it("L2 entry unaligned", async () => {
    await withDamaged(
      "zlib.qcow2",
      (b) => {
        const p = l2EntryPos(b, 0)!;
        setU64(b, p, b.readBigUInt64BE(p) + 512n);
      },
      async (dev, ref) => {
        await expectEio(
          dev,
          0,
          4096,
          /L2 entry for guest offset 0 points at \d+, not aligned to the cluster size 65536/,
        );
        await expectReads(dev, ref, 64 * KiB, 4 * MiB - 64 * KiB);
      },
    );
  });

  for (const tpl of ["zlib.qcow2", "zstd.qcow2", "extl2.qcow2"]) {
    it(`${tpl}: corrupt compressed data`, async () => {
      await withDamaged(
        tpl,
        (b) => {
          const c = compressedAt(b, 2 * MiB);
          // The first bytes only: the next compressed cluster starts in the same sector.
          for (let i = 0; i < 8; i++) b[c.offset + i] = (i * 37) & 0xff;
        },
        async (dev, ref) => {
          await expectEio(
            dev,
            2 * MiB + 5,
            4096,
            /compressed cluster for guest offset 2097152 .* cannot be decompressed/,
          );
          await expectReads(dev, ref, 3 * MiB, 64 * KiB);
          await expectReads(dev, ref, 0, 2 * MiB);
        },
      );
    });

    it(`${tpl}: compressed stream cut short by the end of the file, a flipped bit`, async () => {
      const file = copyOf(tpl);
      let cut = 0;
      patch(file, (b) => {
        cut = compressedAt(b, 3 * MiB).offset + 10; // the last cluster in the file
        b[compressedAt(b, 2 * MiB).offset + 6]! ^= 0x10;
      });
      fs.truncateSync(file, cut);
      const dev = await openBacking(file, "qcow2");
      try {
        await expectEio(dev, 3 * MiB, 64 * KiB, /cannot be decompressed/);
        // The data cluster written last (for 1536K) lies past the cut: that range fails too.
        await expectEio(dev, 1536 * KiB, 4096, /past the end of the file/);
        await expectReads(dev, reference[tpl]!, 0, 1536 * KiB);
        const got = Buffer.alloc(64 * KiB);
        const ok = await dev.read(got, 2 * MiB).then(
          () => true,
          (e: AddCowError) => {
            expect(e.code).toBe("EIO");
            return false;
          },
        );
        // Bytes read are the bytes QEMU reads from the same damaged cluster (deflate has no checksum).
        if (ok) {
          const q = await run("qemu-io", ["-f", "qcow2", "-r", "-c", "read -v 2M 64k", file]);
          expect(q.stdout).not.toMatch(/failed/);
          expect(hexdumpBytes(q.stdout).equals(got)).toBe(true);
        }
      } finally {
        await dev.close();
      }
    });
  }

  it("compressed data pointing into the header cluster or past the end", async () => {
    await withDamaged(
      "zlib.qcow2",
      (b) => {
        const keep = (p: number, off: bigint) => {
          const e = b.readBigUInt64BE(p);
          const shift = BigInt(62 - 8);
          setU64(b, p, (e & ~((1n << shift) - 1n)) | off);
        };
        keep(l2EntryPos(b, 2 * MiB)!, 100n);
        keep(l2EntryPos(b, 3 * MiB)!, 1n << 40n);
      },
      async (dev, ref) => {
        await expectEio(dev, 2 * MiB, 512, /points compressed data into the header cluster/);
        await expectEio(dev, 3 * MiB, 512, /points compressed data at 1099511627776, past the end/);
        await expectReads(dev, ref, 0, 2 * MiB);
      },
    );
  });

  it("extended L2: a subcluster both allocated and zero", async () => {
    await withDamaged(
      "extl2.qcow2",
      (b) => {
        const p = l2EntryPos(b, 0)!;
        b.writeUInt32BE(1, p + 8); // zero bit of subcluster 0, which is allocated
      },
      async (dev, ref) => {
        await expectEio(dev, 0, 512, /marks subclusters both allocated and zero/);
        await expectReads(dev, ref, 64 * KiB, 2 * MiB - 64 * KiB);
      },
    );
  });

  it("dirty and corrupt flags: opened read-only, read right, reported by describe()", async () => {
    await withDamaged(
      "zlib.qcow2",
      (b) => setU64(b, HDR.incompatible, 3n),
      async (dev, ref) => {
        await expectReads(dev, ref, 0, 4 * MiB);
        expect(dev.describe().details).toMatchObject({
          dirty: true,
          corrupt: true,
          readOnly: true,
        });
        await expect(dev.write(Buffer.alloc(512), 0)).rejects.toMatchObject({ code: "EROFS" });
      },
    );
  });

  it("an add-cow disk over a damaged qcow2 fails the same reads, and writes over them work", async () => {
    const file = copyOf("zstd.qcow2");
    patch(file, (b) => {
      const c = compressedAt(b, 2 * MiB);
      b.fill(0xee, c.offset, Math.min(b.length, c.offset + c.length));
    });
    const addcow = path.join(path.dirname(file), "vm.add-cow");
    await createDisk({
      file: addcow,
      backing: file,
      backingFormat: "qcow2",
      clusterSize: 64 * KiB,
    });
    const disk = await openDisk(addcow, { writable: true });
    try {
      await expectEio(disk, 2 * MiB, 4096, /cannot be decompressed/);
      // A partial write needs the rest of the cluster from the backing: it fails the same way.
      await expect(disk.write(Buffer.alloc(512, 1), 2 * MiB + 512)).rejects.toMatchObject({
        code: "EIO",
      });
      // A whole-cluster write needs no copy from the backing: afterwards the range reads.
      await disk.write(Buffer.alloc(64 * KiB, 0x42), 2 * MiB);
      const got = Buffer.alloc(4096);
      await disk.read(got, 2 * MiB);
      expect(got.equals(Buffer.alloc(4096, 0x42))).toBe(true);
    } finally {
      await disk.close();
    }
  });
});

describe("names in qcow2 headers are judged like names in add-cow headers", () => {
  const confine = { allowDirs: [], allowUrls: false };

  it("under confinement, a qcow2's backing file or data file outside the disk's directory is refused", async () => {
    const outside = path.join(root, `outside${n++}`);
    const disk = path.join(root, `confined${n++}`);
    fs.mkdirSync(outside);
    fs.mkdirSync(disk);
    fs.writeFileSync(path.join(outside, "base.raw"), Buffer.alloc(1 << 20, 7));
    await createQcow2(path.join(disk, "img.qcow2"), {
      backing: path.join(outside, "base.raw"),
      backingFormat: "raw",
    });
    await createQcow2(path.join(disk, "df.qcow2"), {
      options: `data_file=${path.join(outside, "df.data")}`,
      size: "1M",
    });
    for (const [name, role] of [
      ["img", "backing file"],
      ["df", "data file"],
    ]) {
      const addcow = path.join(disk, `${name}.add-cow`);
      await createDisk({
        file: addcow,
        backing: path.join(disk, `${name}.qcow2`),
        backingFormat: "qcow2",
      });
      // Unconfined it opens (same owner); confined, the name leads outside the disk's directory.
      await (await openDisk(addcow)).close();
      const err = await openDisk(addcow, { confine }).then(
        (d) => d.close().then(() => null),
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(AddCowError);
      expect((err as AddCowError).reason).toBe("forbidden");
      expect((err as AddCowError).message).toMatch(
        new RegExp(`^${role} .*outside.* \\(named in .*${name}\\.qcow2\\) is refused`),
      );
      expect((err as AddCowError).message).not.toMatch(/[\n\r]/);
    }
  });
});

describe("the owner rule through a qcow2 layer", () => {
  const NOBODY = 65534;

  it("a user's qcow2 naming a file its owner cannot read is refused when root opens the disk", async () => {
    const dir = fs.mkdtempSync("/tmp/addcow-qcow2-owner-");
    try {
      fs.chmodSync(dir, 0o755);
      const secret = path.join(dir, "secret.raw");
      fs.writeFileSync(secret, Buffer.alloc(1 << 20, 0x5e), { mode: 0o600 });
      const img = path.join(dir, "img.qcow2");
      await createQcow2(img, { backing: "secret.raw", backingFormat: "raw" });
      const addcow = path.join(dir, "vm.add-cow");
      await createDisk({ file: addcow, backing: img, backingFormat: "qcow2" });
      // Everything but the secret is the user's; the qcow2's header names the secret.
      for (const f of [img, addcow, path.join(dir, "vm.raw")]) {
        fs.chownSync(f, NOBODY, NOBODY);
        fs.chmodSync(f, 0o644);
      }
      const err = await openDisk(addcow).then(
        (d) => d.close().then(() => null),
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(AddCowError);
      expect((err as AddCowError).reason).toBe("forbidden");
      expect((err as AddCowError).message).toMatch(
        /^backing file .*secret\.raw \(named in .*img\.qcow2\) is refused/,
      );
      // Once the user may read it, the same chain opens.
      fs.chmodSync(secret, 0o644);
      await (await openDisk(addcow)).close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
