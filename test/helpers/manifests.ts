/**
 * Manifests for tests, written by their documented layout (docs/remote.md,
 * "Manifests"), independently of src/remote/manifest.ts; and versions of a
 * base that share most of their blocks.
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { pattern } from "./pattern";

export const sha256 = (b: Buffer) => crypto.createHash("sha256").update(b).digest();

/**
 * The manifest of `data` in blocks of `blockSize`; the digests of the blocks
 * in `flip` have a bit flipped (the file's own checksum still matches: a
 * manifest that parses but is wrong about those blocks).
 */
export function manifestBytes(data: Buffer, blockSize: number, flip: number[] = []): Buffer {
  const blocks = Math.ceil(data.length / blockSize);
  const out = Buffer.alloc(32 + 32 * blocks + 32);
  out.write("ACOWMAN1", 0, "latin1");
  out.writeBigUInt64LE(BigInt(data.length), 8);
  out.writeUInt32LE(blockSize, 16);
  out.writeBigUInt64LE(BigInt(blocks), 24);
  for (let n = 0; n < blocks; n++) {
    const d = sha256(data.subarray(n * blockSize, (n + 1) * blockSize));
    if (flip.includes(n)) d[0] = d[0]! ^ 0x80;
    d.copy(out, 32 + 32 * n);
  }
  sha256(out.subarray(0, out.length - 32)).copy(out, out.length - 32);
  return out;
}

/** The SHA-256 of a manifest file, as a disk pins it. */
export function manifestDigest(bytes: Buffer): string {
  return sha256(bytes).toString("hex");
}

/**
 * v2 of a base `v1`: the blocks (of blockSize) whose indexes are in
 * `changed` hold other bytes, the rest are v1's.
 */
export function nextVersion(
  v1: Buffer,
  blockSize: number,
  changed: number[],
  seed: number,
): Buffer {
  const v2 = Buffer.from(v1);
  for (const n of changed) {
    pattern(blockSize, seed + n).copy(
      v2,
      n * blockSize,
      0,
      Math.min(blockSize, v1.length - n * blockSize),
    );
  }
  return v2;
}

/** `count` distinct block indexes out of `blocks`, spread by a seeded generator. */
export function someBlocks(blocks: number, count: number, seed: number): number[] {
  const out = new Set<number>();
  let x = seed;
  while (out.size < count) {
    x = (x * 1103515245 + 12345) & 0x7fffffff;
    out.add((x >>> 8) % blocks);
  }
  return [...out].sort((a, b) => a - b);
}

/**
 * DIR/www/v1.raw (`size` bytes of pattern `seed`) and v2.raw, which differs
 * from it in 5% of its blocks of `blockSize`, spread at random.
 */
export function twoVersions(dir: string, size: number, blockSize: number, seed: number) {
  const www = path.join(dir, "www");
  fs.mkdirSync(www, { recursive: true });
  const blocks = Math.ceil(size / blockSize);
  const v1 = pattern(size, seed);
  const changed = someBlocks(blocks, Math.round(blocks * 0.05), seed + 1);
  const v2 = nextVersion(v1, blockSize, changed, seed * 1000);
  fs.writeFileSync(path.join(www, "v1.raw"), v1);
  fs.writeFileSync(path.join(www, "v2.raw"), v2);
  return { www, blocks, changed, v1, v2 };
}
