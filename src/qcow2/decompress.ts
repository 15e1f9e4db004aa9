import type { CompressionType } from "./header";
import { DecoderError, MAX_ZSTD_WINDOW_LOG, decoder } from "./native-decoder";

/**
 * Compressed clusters. A compressed cluster's bytes are followed on disk by
 * whatever comes next (the sector count rounds up, and the next compressed
 * cluster may start in the same sector), so decompression stops when one
 * cluster of output is produced, as QEMU does. Anything else — a stream that
 * ends early, gives more than a cluster, or is malformed — is an error for
 * the read that asked (EIO), never a guess.
 *
 * Both decoders are Node's own (node:zlib: libz and libzstd), reused and
 * writing into the caller's buffer (native-decoder.ts), on the JS thread.
 * zlib: raw deflate with a 4 KiB window (QEMU's settings). zstd: the decoder
 * would read on past a frame's end into the bytes that follow, so the frames
 * are first delimited here from their headers (RFC 8878 sections 3.1.1 and
 * 3.1.1.2, no entropy decoding) and their window sizes bounded; each frame is
 * then decoded into what is left of the cluster.
 */
export function decompressCluster(type: CompressionType, input: Buffer, out: Buffer): void {
  if (type === "zlib") inflateCluster(input, out);
  else zstdCluster(input, out);
}

export class DecompressError extends Error {}

/** Decodes one stream into `out`; "more than one cluster" when it does not end there. */
function decodeInto(kind: "zlib" | "zstd", input: Buffer, out: Buffer, what: string): number {
  try {
    const r = decoder(kind).decode(input, out);
    if (r.written === out.length && r.more()) {
      throw new DecompressError(`${what} gives more than one cluster`);
    }
    return r.written;
  } catch (err) {
    if (err instanceof DecoderError) {
      throw new DecompressError(`${what} is invalid: ${err.message}`);
    }
    throw err;
  }
}

function inflateCluster(input: Buffer, out: Buffer): void {
  // A stream cut after a full cluster of output still counts (QEMU accepts it).
  const n = decodeInto("zlib", input, out, "deflate stream");
  if (n !== out.length) {
    throw new DecompressError(`deflate stream gives ${n} bytes, not one cluster`);
  }
}

/** Largest zstd window we let the decoder allocate; QEMU's frames use at most the cluster size. */
const MAX_ZSTD_WINDOW = 2 ** MAX_ZSTD_WINDOW_LOG;
const ZSTD_MAGIC = 0xfd2fb528;

interface Frame {
  end: number;
  skippable: boolean;
  /** Declared content size, or -1 when the frame does not say. */
  contentSize: number;
  windowSize: number;
}

/** Finds where the frame at `at` ends, from its header and block headers. */
function zstdFrame(src: Buffer, at: number): Frame {
  const need = (n: number) => {
    if (at + n > src.length) throw new DecompressError(`zstd frame is truncated`);
  };
  need(4);
  const magic = src.readUInt32LE(at);
  if ((magic & 0xfffffff0) === 0x184d2a50) {
    need(8);
    const end = at + 8 + src.readUInt32LE(at + 4);
    if (end > src.length) throw new DecompressError(`zstd skippable frame is truncated`);
    return { end, skippable: true, contentSize: 0, windowSize: 0 };
  }
  if (magic !== ZSTD_MAGIC) throw new DecompressError(`no zstd frame magic`);
  need(5);
  const fhd = src[at + 4]!;
  if (fhd & 0x08) throw new DecompressError(`zstd frame header has its reserved bit set`);
  const singleSegment = (fhd >> 5) & 1;
  const fcsFlag = fhd >> 6;
  const dictBytes = [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = fcsFlag === 0 ? singleSegment : 1 << fcsFlag;
  let pos = at + 5;
  let windowSize = 0;
  if (!singleSegment) {
    need(6);
    const wd = src[pos]!;
    const base = 2 ** (10 + (wd >> 3));
    windowSize = base + (base / 8) * (wd & 7);
    pos++;
  }
  pos += dictBytes;
  if (dictBytes > 0) throw new DecompressError(`zstd frame needs a dictionary`);
  if (pos + fcsBytes > src.length) throw new DecompressError(`zstd frame header is truncated`);
  let contentSize = -1;
  if (fcsBytes === 1) contentSize = src[pos]!;
  else if (fcsBytes === 2) contentSize = src.readUInt16LE(pos) + 256;
  else if (fcsBytes === 4) contentSize = src.readUInt32LE(pos);
  else if (fcsBytes === 8) contentSize = Number(src.readBigUInt64LE(pos));
  pos += fcsBytes;
  if (singleSegment) windowSize = contentSize;
  for (;;) {
    if (pos + 3 > src.length) throw new DecompressError(`zstd block header is truncated`);
    const bh = src[pos]! | (src[pos + 1]! << 8) | (src[pos + 2]! << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw new DecompressError(`zstd block has the reserved type`);
    pos += 3 + (type === 1 ? 1 : size);
    if (pos > src.length) throw new DecompressError(`zstd block is truncated`);
    if (last) break;
  }
  if (fhd & 0x04) pos += 4; // content checksum
  if (pos > src.length) throw new DecompressError(`zstd frame checksum is truncated`);
  return { end: pos, skippable: false, contentSize, windowSize };
}

function zstdCluster(input: Buffer, out: Buffer): void {
  const clusterSize = out.length;
  let produced = 0;
  let at = 0;
  while (produced < clusterSize) {
    if (at >= input.length) {
      throw new DecompressError(`zstd data ends after ${produced} of ${clusterSize} bytes`);
    }
    const frame = zstdFrame(input, at);
    if (!frame.skippable) {
      const room = clusterSize - produced;
      if (frame.contentSize > room) {
        throw new DecompressError(
          `zstd frame holds ${frame.contentSize} bytes, more than a cluster`,
        );
      }
      if (frame.windowSize > MAX_ZSTD_WINDOW) {
        throw new DecompressError(`zstd frame asks for a ${frame.windowSize}-byte window`);
      }
      const n = decodeInto(
        "zstd",
        input.subarray(at, frame.end),
        out.subarray(produced),
        "zstd frame",
      );
      if (frame.contentSize >= 0 && n !== frame.contentSize) {
        throw new DecompressError(
          `zstd frame gives ${n} bytes, its header says ${frame.contentSize}`,
        );
      }
      produced += n;
    }
    at = frame.end;
  }
}
