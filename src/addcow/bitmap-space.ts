import type { FileIO } from "../block/file-io";
import { AddCowError, errnoCode, isNoSpace } from "../util/errors";
import { formatSize } from "../util/size";
import { log } from "../util/log";

const ZERO_CHUNK = 1 << 20;

/**
 * Writes zeros over [from, to) of a file in chunks (Node has no fallocate).
 * Written zeros, unlike a hole, have their blocks: later writes into the range
 * need no new ones.
 */
export async function writeZeros(io: FileIO, from: number, to: number): Promise<void> {
  const zeros = Buffer.alloc(Math.min(ZERO_CHUNK, Math.max(0, to - from)));
  for (let at = from; at < to; at += zeros.length) {
    await io.write(zeros.subarray(0, Math.min(zeros.length, to - at)), at);
  }
}

/**
 * Gives every byte of the bitmap [from, to) of an .add-cow file its blocks on
 * disk, so that setting bits never needs new ones: on a full file system a
 * bitmap write-back must not fail and turn acknowledged writes into lost ones.
 * Only holes are written (with zeros, which is what a hole reads as), never a
 * byte that holds bits. Files made by `addcow create` have no holes; older ones,
 * or copies made with `cp --sparse`, get them filled here, before any use.
 * Returns the number of bytes allocated.
 */
export async function reserveBitmap(
  meta: FileIO,
  file: string,
  from: number,
  to: number,
): Promise<number> {
  const holes = meta.holes(from, to);
  if (holes.length === 0) return 0;
  const bytes = holes.reduce((n, [a, b]) => n + b - a, 0);
  log.open("%s: allocating %d bytes of bitmap in %d hole(s)", file, bytes, holes.length);
  try {
    for (const [a, b] of holes) await writeZeros(meta, a, b);
    await meta.sync();
  } catch (err) {
    if (isNoSpace(err)) {
      throw new AddCowError(
        `cannot open ${file} for writing: its bitmap needs ${formatSize(bytes)} (${bytes} bytes) of disk space that the file system holding it does not have; free some space and try again`,
        { file, code: errnoCode(err), reason: "no-space", cause: err },
      );
    }
    throw err;
  }
  return bytes;
}
