/**
 * Reads a block cache directory by its documented layout (docs/remote.md),
 * independently of src/remote/block-cache.ts: every block file's header, and
 * for each chunk marked present whether its bytes match its CRC-32.
 */
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
}

export function cacheState(cacheDir: string): CacheState {
  const out: CacheState = {
    files: [],
    goodChunks: 0,
    badChunks: [],
    badFiles: [],
    tmp: 0,
    bytes: 0,
  };
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith(".tmp")) out.tmp++;
      else if (e.name.endsWith(".blk")) checkBlock(p, out);
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
