import * as crypto from "node:crypto";
import { AddCowError } from "../util/errors";

/**
 * A manifest: the SHA-256 of every block of a base image, published beside it
 * (`URL.manifest`) so that each block fetched can be checked before it is
 * used or cached, and pinned (its own SHA-256) in every overlay made on it.
 * The block size is the granularity of that check. docs/remote.md describes
 * the file; all integers are little-endian:
 *
 * | offset | size | field |
 * |---|---|---|
 * | 0 | 8 | magic `ACOWMAN1` |
 * | 8 | 8 | size of the base in bytes |
 * | 16 | 4 | block size (a power of two, 4 KiB to 64 MiB) |
 * | 20 | 4 | reserved, 0 |
 * | 24 | 8 | number of blocks, `ceil(size / block size)` |
 * | 32 | 32 x blocks | SHA-256 of each block (the last one: of its bytes, up to the end of the base) |
 * | end - 32 | 32 | SHA-256 of every byte before it |
 *
 * 8 GiB at 64 KiB blocks (the default) is 131072 digests, 4 MiB.
 */
export const MANIFEST_MAGIC = Buffer.from("ACOWMAN1", "latin1");
const HEAD = 32;
const DIGEST = 32;
export const MIN_MANIFEST_BLOCK = 4096;
export const MAX_MANIFEST_BLOCK = 64 << 20;
/**
 * The default block size: the remote device's fetch piece (64 KiB), so that
 * checking blocks widens no read, and blocks shared by two versions of a base
 * are found at a fine grain; larger for bases over 32 GiB, so that the
 * manifest (fetched whole at every open) stays within 16 MiB.
 */
export const DEFAULT_MANIFEST_BLOCK = 64 << 10;
const DEFAULT_MANIFEST_DIGESTS = 512 << 10;

export function defaultManifestBlock(size: number): number {
  let bs = DEFAULT_MANIFEST_BLOCK;
  while (bs < MAX_MANIFEST_BLOCK && Math.ceil(size / bs) > DEFAULT_MANIFEST_DIGESTS) bs *= 2;
  return bs;
}
/** Largest manifest read: 16 TiB at 4 KiB blocks would be 128 GiB; 64 Mi digests is plenty. */
const MAX_BLOCKS = 64 << 20;

/** Where a base's manifest is published by default: its URL (path) with `.manifest` appended. */
export function defaultManifestLocation(baseUrl: string): string {
  if (baseUrl.startsWith("s3://")) return `${baseUrl}.manifest`;
  const url = new URL(baseUrl);
  url.pathname += ".manifest";
  return url.toString();
}

/** A manifest found for a base: where (a URL), the parsed file and its digest. */
export interface FoundManifest {
  location: string;
  manifest: Manifest;
  sha256: string;
}

/** A parsed, verified manifest. */
export class Manifest {
  private constructor(
    /** The manifest file's bytes. */
    readonly bytes: Buffer,
    readonly size: number,
    readonly blockSize: number,
    readonly blocks: number,
  ) {}

  private digest: string | null = null;

  /** SHA-256 (hex) of the whole manifest file: what an overlay pins. */
  get sha256(): string {
    this.digest ??= crypto.createHash("sha256").update(this.bytes).digest("hex");
    return this.digest;
  }

  /** Bytes [start, end) of the base that block n covers. */
  blockRange(n: number): [number, number] {
    this.checkIndex(n);
    const start = n * this.blockSize;
    return [start, Math.min(this.size, start + this.blockSize)];
  }

  /** The SHA-256 of block n (32 bytes; a view into the manifest). */
  digestOf(n: number): Buffer {
    this.checkIndex(n);
    return this.bytes.subarray(HEAD + n * DIGEST, HEAD + (n + 1) * DIGEST);
  }

  /** True when `data` is exactly block n of the base (its length included). */
  verify(n: number, data: Buffer): boolean {
    const [start, end] = this.blockRange(n);
    if (data.length !== end - start) return false;
    return crypto.createHash("sha256").update(data).digest().equals(this.digestOf(n));
  }

  private checkIndex(n: number): void {
    if (!Number.isSafeInteger(n) || n < 0 || n >= this.blocks) {
      throw new RangeError(`block ${n} is outside the manifest (${this.blocks} blocks)`);
    }
  }

  /** Builds the manifest file from the per-block digests. */
  static encode(size: number, blockSize: number, digests: Buffer[]): Buffer {
    checkBlockSize(blockSize, "manifest");
    const blocks = Math.ceil(size / blockSize);
    if (digests.length !== blocks) {
      throw new Error(`${digests.length} digests for ${blocks} blocks`);
    }
    const out = Buffer.alloc(HEAD + blocks * DIGEST + DIGEST);
    MANIFEST_MAGIC.copy(out, 0);
    out.writeBigUInt64LE(BigInt(size), 8);
    out.writeUInt32LE(blockSize, 16);
    out.writeBigUInt64LE(BigInt(blocks), 24);
    digests.forEach((d, i) => d.copy(out, HEAD + i * DIGEST));
    const body = out.subarray(0, out.length - DIGEST);
    crypto.createHash("sha256").update(body).digest().copy(out, body.length);
    return out;
  }

  /**
   * Parses and verifies a manifest file; `where` names it in the one-line
   * error (a URL or a path). Every field is checked, then its checksum.
   */
  static parse(bytes: Buffer, where: string): Manifest {
    const bad = (what: string) =>
      new AddCowError(
        `manifest ${where}: ${what}; rebuild it with addcow manifest and publish it again`,
        { code: "EINVAL", reason: "bad-field", file: where, detail: what },
      );
    if (bytes.length < HEAD + DIGEST || !bytes.subarray(0, 8).equals(MANIFEST_MAGIC)) {
      throw bad(`not an addcow manifest (no ACOWMAN1 magic)`);
    }
    const size = Number(bytes.readBigUInt64LE(8));
    const blockSize = bytes.readUInt32LE(16);
    const blocks = Number(bytes.readBigUInt64LE(24));
    if (!Number.isSafeInteger(size)) throw bad(`its base size is out of range`);
    if (!isBlockSize(blockSize)) {
      throw bad(`its block size ${blockSize} is not a power of two from 4 KiB to 64 MiB`);
    }
    if (bytes.readUInt32LE(20) !== 0) throw bad(`its reserved field is not 0`);
    if (blocks !== Math.ceil(size / blockSize) || blocks > MAX_BLOCKS) {
      throw bad(
        `it says ${blocks} blocks, but ${size} bytes in blocks of ${blockSize} are ${Math.ceil(size / blockSize)}`,
      );
    }
    if (bytes.length !== HEAD + blocks * DIGEST + DIGEST) {
      throw bad(
        `it has ${bytes.length} bytes, ${HEAD + blocks * DIGEST + DIGEST} expected for ${blocks} blocks`,
      );
    }
    const body = bytes.subarray(0, bytes.length - DIGEST);
    const sum = crypto.createHash("sha256").update(body).digest();
    if (!sum.equals(bytes.subarray(body.length))) {
      throw bad(`its checksum does not match its contents (damaged or altered)`);
    }
    return new Manifest(Buffer.from(bytes), size, blockSize, blocks);
  }
}

function isBlockSize(n: number): boolean {
  return n >= MIN_MANIFEST_BLOCK && n <= MAX_MANIFEST_BLOCK && (n & (n - 1)) === 0;
}

export function checkBlockSize(n: number, what: string): void {
  if (!isBlockSize(n)) {
    throw new AddCowError(
      `invalid ${what} block size ${n}: give a power of two from 4K to 64M (e.g. --block-size 1M)`,
      { code: "EINVAL", reason: "invalid" },
    );
  }
}

/**
 * Computes a manifest over a base read in blocks by `read` (fills the buffer
 * with the bytes at the offset). Memory: one block.
 */
export async function buildManifest(
  size: number,
  blockSize: number,
  read: (buf: Buffer, offset: number) => Promise<void>,
  onBlock?: (done: number, total: number) => void,
): Promise<Buffer> {
  checkBlockSize(blockSize, "manifest");
  const blocks = Math.ceil(size / blockSize);
  const buf = Buffer.alloc(Math.min(blockSize, Math.max(1, size)));
  const digests: Buffer[] = [];
  for (let n = 0; n < blocks; n++) {
    const start = n * blockSize;
    const part = buf.subarray(0, Math.min(blockSize, size - start));
    await read(part, start);
    digests.push(crypto.createHash("sha256").update(part).digest());
    onBlock?.(n + 1, blocks);
  }
  return Manifest.encode(size, blockSize, digests);
}
