import * as crypto from "node:crypto";
import type { FileIO } from "./file-io";

/**
 * A cheap fingerprint of a local file, taken at every open of a pinned
 * backing (docs/specs/add-cow.md, "The backing pin"): SHA-256 over the file's
 * length and these samples, 256 KiB at most:
 *
 * - bytes [0, 64 KiB): partition table, boot code, a whole-disk file system's
 *   superblock, a qcow2 header;
 * - [1 MiB, 1 MiB + 64 KiB): where the first partition of a partitioned image
 *   usually starts, with its file system's superblock (whose mount and write
 *   times change whenever it is mounted writable);
 * - the last 64 KiB: a GPT's backup header, the last data written;
 * - 16 blocks of 4 KiB spread evenly over the file.
 *
 * It catches a file replaced by other bytes (another build of an image, even
 * of the same size) and any change of length; it cannot see a change confined
 * to bytes it does not sample (a few blocks rewritten in place). A manifest
 * (remote/manifest.ts) covers every byte.
 */
const EDGE = 64 * 1024;
const PARTITION_START = 1024 * 1024;
const SPREAD_BLOCKS = 16;
const SPREAD_SIZE = 4096;

/** The [offset, length) pairs sampled from a file of `size` bytes, clipped to it. */
export function fingerprintSamples(size: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  const add = (at: number, length: number) => {
    const start = Math.max(0, Math.min(at, size));
    const end = Math.max(start, Math.min(at + length, size));
    if (end > start) out.push([start, end - start]);
  };
  add(0, EDGE);
  add(PARTITION_START, EDGE);
  add(size - EDGE, EDGE);
  for (let i = 1; i <= SPREAD_BLOCKS; i++) {
    const at = Math.floor((size * i) / (SPREAD_BLOCKS + 1) / SPREAD_SIZE) * SPREAD_SIZE;
    add(at, SPREAD_SIZE);
  }
  return out;
}

/** The fingerprint (hex) of a file's samples; `extra` is hashed after them (a qcow2 L1 table). */
export async function fingerprintFile(
  io: FileIO,
  size: number,
  extra: Buffer[] = [],
): Promise<string> {
  const hash = crypto.createHash("sha256");
  const head = Buffer.alloc(16);
  head.write("addcow-fp-v1\0\0\0\0", 0, "latin1");
  hash.update(head);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(size));
  hash.update(len);
  for (const [at, length] of fingerprintSamples(size)) {
    const buf = Buffer.alloc(length);
    const n = await io.read(buf, at);
    // A file that shrank under us hashes as zeros there: its length differs anyway.
    if (n < length) buf.fill(0, n);
    const where = Buffer.alloc(12);
    where.writeBigUInt64LE(BigInt(at));
    where.writeUInt32LE(length, 8);
    hash.update(where).update(buf);
  }
  for (const b of extra) hash.update(b);
  return hash.digest("hex");
}
