import * as fs from "node:fs";

/** Deterministic pseudo-random bytes (xorshift32, seeded). */
export function pattern(len: number, seed: number): Buffer {
  const out = Buffer.alloc(Math.ceil(len / 4) * 4);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let off = 0; off < out.length; off += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    out.writeUInt32LE(x, off);
  }
  return out.subarray(0, len);
}

/** Indexes of the blocks of `file` (blockSize each) that do not hold expected(i). */
export function blocksDiffering(
  file: string,
  indexes: readonly number[],
  blockSize: number,
  expected: (i: number) => Buffer,
): number[] {
  const fd = fs.openSync(file, "r");
  try {
    const got = Buffer.alloc(blockSize);
    return indexes.filter((i) => {
      fs.readSync(fd, got, 0, blockSize, i * blockSize);
      return !got.equals(expected(i));
    });
  } finally {
    fs.closeSync(fd);
  }
}
