/**
 * Reads a block cache directory by its documented layout (docs/remote.md),
 * independently of src/remote/block-cache.ts and digest-store.ts: every block
 * file's header, and for each chunk marked present whether its bytes match
 * its CRC-32; every file stored by digest (v3/sha256/DD/HEX.blk), whether its
 * header names its digest and its bytes hash to it.
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import * as zlib from "node:zlib";

const CHUNK = 4096;
const PRESENT = 0x4b4e4843; // "CHNK"

export interface CacheState {
  /** Block files with a good header. */
  files: string[];
  /** Chunks marked present whose bytes match their CRC, and those that do not. */
  goodChunks: number;
  badChunks: string[];
  /** Block files whose header is not a block header. */
  badFiles: string[];
  tmp: number;
  /** Bytes of the object held (chunks marked present and good). */
  bytes: number;
  /** Files stored by digest whose bytes hash to their name (hex digests), and those that do not. */
  digests: string[];
  badDigests: string[];
}

export function cacheState(cacheDir: string): CacheState {
  const out: CacheState = {
    files: [],
    goodChunks: 0,
    badChunks: [],
    badFiles: [],
    tmp: 0,
    bytes: 0,
    digests: [],
    badDigests: [],
  };
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".tmp")) out.tmp++;
      else if (e.name.endsWith(".blk") && path.basename(path.dirname(d)) === "sha256") {
        checkDigest(p, out);
      } else if (e.name.endsWith(".blk")) checkBlock(p, out);
    }
  };
  if (fs.existsSync(cacheDir)) walk(cacheDir);
  return out;
}

function checkBlock(file: string, out: CacheState): void {
  const raw = fs.readFileSync(file);
  if (raw.length < 32 || raw.subarray(0, 8).toString() !== "ACOWBLK3") {
    out.badFiles.push(file);
    return;
  }
  const index = raw.readUInt32LE(24);
  const length = raw.readUInt32LE(28);
  const chunks = Math.ceil(length / CHUNK);
  const header = Math.ceil((32 + 8 * chunks) / 4096) * 4096;
  if (raw.length < header || path.basename(file) !== `${index}.blk`) {
    out.badFiles.push(file);
    return;
  }
  out.files.push(file);
  for (let c = 0; c < chunks; c++) {
    if (raw.readUInt32LE(32 + 8 * c + 4) !== PRESENT) continue;
    const len = Math.min(CHUNK, length - c * CHUNK);
    const bytes = Buffer.alloc(len);
    raw.copy(bytes, 0, header + c * CHUNK, header + c * CHUNK + len);
    if (zlib.crc32(bytes) === raw.readUInt32LE(32 + 8 * c)) {
      out.goodChunks++;
      out.bytes += len;
    } else {
      out.badChunks.push(`${file}#${c}`);
    }
  }
}

/**
 * A file stored by digest: magic ACOWDIG1, the SHA-256, the length, a
 * reserved 0, then per 4 KiB chunk CRC-32 and present mark; the bytes after
 * the header page(s).
 */
function checkDigest(file: string, out: CacheState): void {
  const raw = fs.readFileSync(file);
  const name = path.basename(file, ".blk");
  const bad = () => void out.badDigests.push(name);
  if (raw.length < 48 || raw.subarray(0, 8).toString() !== "ACOWDIG1") return bad();
  const digest = raw.subarray(8, 40).toString("hex");
  const length = raw.readUInt32LE(40);
  const chunks = Math.ceil(length / CHUNK);
  const header = Math.ceil((48 + 8 * chunks) / 4096) * 4096;
  if (digest !== name || raw.length !== header + length) return bad();
  const data = raw.subarray(header);
  if (crypto.createHash("sha256").update(data).digest("hex") !== name) return bad();
  for (let c = 0; c < chunks; c++) {
    if (raw.readUInt32LE(48 + 8 * c + 4) !== PRESENT) return bad();
    if (zlib.crc32(data.subarray(c * CHUNK, (c + 1) * CHUNK)) !== raw.readUInt32LE(48 + 8 * c)) {
      return bad();
    }
  }
  out.digests.push(name);
}
