import * as crypto from "node:crypto";
import * as zlib from "node:zlib";
import { describe, expect, it } from "vitest";
import { ClusterSlots } from "../../src/qcow2/cluster-slots";
import { DecompressError, decompressCluster } from "../../src/qcow2/decompress";
import { type Decoder, decoder, oneShotDecoder } from "../../src/qcow2/native-decoder";

const C = 64 * 1024;

/** Cluster-like content: text, sparse bytes and a pseudo-random stretch, the same for a seed. */
function content(seed: number): Buffer {
  const b = Buffer.alloc(C);
  b.fill(`/usr/lib/libfoo.so.${seed} `, 0, C / 2);
  for (let i = C / 2; i < C; i += 61) b[i] = (seed + i) & 0xff;
  let x = seed + 1;
  for (let i = (3 * C) / 4; i < (3 * C) / 4 + 2048; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

/** What qemu-img writes: raw deflate, 4 KiB window. */
const deflate = (b: Buffer) => zlib.deflateRawSync(b, { windowBits: 12, memLevel: 9 });
const zstd = (b: Buffer, checksum = false) =>
  zlib.zstdCompressSync(b, {
    params: { [zlib.constants.ZSTD_c_checksumFlag]: checksum ? 1 : 0 },
  });

/** decompressCluster's outcome: the bytes, or the error message. */
function outcome(type: "zlib" | "zstd", input: Buffer): Buffer | string {
  const out = Buffer.alloc(C, 0xaa);
  try {
    decompressCluster(type, input, out);
    return out;
  } catch (err) {
    expect(err).toBeInstanceOf(DecompressError);
    return (err as Error).message;
  }
}

describe("compressed clusters through node:zlib", () => {
  const plain = content(1);
  const garbage = crypto.randomBytes(700);

  it("uses the reused native decoders on this Node.js (the one-shot fallback only elsewhere)", () => {
    expect(decoder("zlib").reused).toBe(true);
    expect(decoder("zstd").reused).toBe(true);
  });

  it("zlib: a whole stream, trailing bytes, a stream cut after one cluster read like QEMU; short, long and broken streams fail", () => {
    const z = deflate(plain);
    expect(outcome("zlib", z)).toEqual(plain);
    expect(outcome("zlib", Buffer.concat([z, garbage]))).toEqual(plain);
    // Without the final block's end: the cluster's bytes are all there.
    const cut = zlib.deflateRawSync(plain, {
      windowBits: 12,
      finishFlush: zlib.constants.Z_SYNC_FLUSH,
    });
    expect(outcome("zlib", cut)).toEqual(plain);
    expect(outcome("zlib", deflate(plain.subarray(0, C - 1)))).toBe(
      `deflate stream gives ${C - 1} bytes, not one cluster`,
    );
    expect(outcome("zlib", deflate(Buffer.concat([plain, Buffer.alloc(1)])))).toBe(
      "deflate stream gives more than one cluster",
    );
    const flipped = Buffer.from(z);
    flipped[3]! ^= 0xff;
    expect(outcome("zlib", flipped)).toMatch(/^deflate stream (is invalid: .+|gives .*)$/);
    expect(outcome("zlib", z.subarray(0, z.length >> 1))).toMatch(
      /^deflate stream gives \d+ bytes/,
    );
  });

  it("zstd: one frame, two frames, skippable frames, trailing bytes read; long, short, wrong checksum and broken frames fail", () => {
    expect(outcome("zstd", zstd(plain))).toEqual(plain);
    expect(outcome("zstd", Buffer.concat([zstd(plain, true), garbage]))).toEqual(plain);
    const skip = Buffer.alloc(12);
    skip.writeUInt32LE(0x184d2a50, 0);
    skip.writeUInt32LE(4, 4);
    const halves = [zstd(plain.subarray(0, C / 2)), skip, zstd(plain.subarray(C / 2))];
    expect(outcome("zstd", Buffer.concat(halves))).toEqual(plain);
    expect(outcome("zstd", zstd(Buffer.concat([plain, Buffer.alloc(1)])))).toMatch(
      /more than a cluster/,
    );
    expect(outcome("zstd", zstd(plain.subarray(0, 100)))).toBe(
      `zstd data ends after 100 of ${C} bytes`,
    );
    const sum = zstd(plain, true);
    sum[sum.length - 1]! ^= 0xff;
    expect(outcome("zstd", sum)).toMatch(/^zstd frame is invalid: .*checksum/i);
    const broken = zstd(plain);
    broken.fill(0x55, 20, 60);
    expect(outcome("zstd", broken)).toMatch(/^zstd frame (is invalid|gives)/);
  });

  it("a failure leaves the decoders usable for the next cluster", () => {
    const bad = Buffer.from(deflate(plain));
    bad.fill(0xff, 0, 8);
    expect(typeof outcome("zlib", bad)).toBe("string");
    expect(outcome("zlib", deflate(content(2)))).toEqual(content(2));
    expect(typeof outcome("zstd", Buffer.concat([zstd(plain).subarray(0, 12), garbage]))).toBe(
      "string",
    );
    expect(outcome("zstd", zstd(content(3)))).toEqual(content(3));
  });

  it("the reused and the one-shot decoders agree on every input (written, more, or the failure)", () => {
    const inputs: Array<["zlib" | "zstd", Buffer]> = [];
    for (let i = 0; i < 20; i++) {
      const p = content(i);
      const z = deflate(p);
      const s = zstd(p, i % 2 === 0);
      inputs.push(["zlib", z], ["zstd", s]);
      // Damaged copies: a flipped byte, a cut, bytes appended.
      for (const [kind, good] of [
        ["zlib", z],
        ["zstd", s],
      ] as const) {
        const flipped = Buffer.from(good);
        flipped[(i * 7919) % good.length]! ^= 1 << (i % 8);
        inputs.push([kind, flipped], [kind, good.subarray(0, (good.length * i) / 20)]);
        inputs.push([kind, Buffer.concat([good, garbage])]);
      }
    }
    const run = (d: Decoder, input: Buffer) => {
      const out = Buffer.alloc(C);
      try {
        const r = d.decode(input, out);
        const more = r.written === C && r.more();
        const bytes = more ? null : crypto.createHash("sha256").update(out.subarray(0, r.written));
        return { written: r.written, more, bytes: bytes?.digest("hex") ?? null };
      } catch (err) {
        return { failed: true, name: (err as Error).name };
      }
    };
    for (const [kind, input] of inputs) {
      expect(run(decoder(kind), input)).toEqual(run(oneShotDecoder(kind), input));
    }
  });
});

describe("ClusterSlots", () => {
  it("keeps the most recently used clusters in reused slots, and forgets a dropped one", () => {
    const slots = new ClusterSlots(4, 2);
    slots.claim(0).fill(1);
    slots.claim(4).fill(2);
    expect(slots.get(0)).toEqual(Buffer.alloc(4, 1)); // 0 is now the most recent
    const third = slots.claim(8); // evicts 4, takes its slot
    third.fill(3);
    expect(slots.get(4)).toBeUndefined();
    expect(slots.get(0)).toEqual(Buffer.alloc(4, 1));
    expect(slots.get(8)).toEqual(Buffer.alloc(4, 3));
    slots.drop(8);
    expect(slots.get(8)).toBeUndefined();
    slots.claim(12).fill(4); // the dropped slot, without evicting 0
    expect(slots.get(0)).toEqual(Buffer.alloc(4, 1));
    expect(slots.get(12)).toEqual(Buffer.alloc(4, 4));
    // Claiming a held cluster again gives its own slot.
    slots.claim(12).fill(5);
    expect(slots.get(0)).toEqual(Buffer.alloc(4, 1));
    expect(slots.get(12)).toEqual(Buffer.alloc(4, 5));
  });
});
