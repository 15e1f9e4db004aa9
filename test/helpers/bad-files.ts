/**
 * Builders for valid and deliberately broken add-cow files, and a way to prove
 * that opening them changed nothing on disk. Field offsets are written out here
 * from the format description, independently of src/addcow/header.ts.
 */
import type { BackingFormat } from "../../src/block/chain-opener";
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import {
  type AddCowHeader,
  bitmapBytes,
  encodeHeader,
  headerSizeFor,
} from "../../src/addcow/header";

/** Byte offsets of the header fields (revision 19/20 layout, little-endian). */
export const F = {
  magic: 0,
  backingNameOffset: 4,
  backingNameSize: 8,
  imageNameOffset: 12,
  imageNameSize: 16,
  clusterBits: 20,
  incompatible: 24,
  compatible: 32,
  headerSize: 40,
  backingFormat: 44,
  imageFormat: 60,
  nameArea: 76,
} as const;

export function tempDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `addcow-${tag}-`));
}

export interface HeaderSpec {
  clusterBits?: number;
  headerSize?: number;
  backingName?: string | null;
  backingFormat?: BackingFormat | null;
  imageName?: string;
  compatibleFeatures?: bigint;
  incompatibleFeatures?: bigint;
}

export function header(spec: HeaderSpec = {}): AddCowHeader {
  const clusterBits = spec.clusterBits ?? 16;
  const backingName = spec.backingName ?? null;
  return {
    clusterBits,
    headerSize: spec.headerSize ?? headerSizeFor(clusterBits),
    incompatibleFeatures: spec.incompatibleFeatures ?? 0n,
    compatibleFeatures: spec.compatibleFeatures ?? 0n,
    backingName,
    backingFormat: spec.backingFormat ?? (backingName === null ? null : "raw"),
    imageName: spec.imageName ?? "disk.raw",
    imageFormat: "raw",
  };
}

export function headerBytes(spec: HeaderSpec = {}): Buffer {
  return encodeHeader(header(spec));
}

/** Writes a fixed-size, NUL-padded char[16] field (no NUL when text has 16 characters). */
export function setFormat(buf: Buffer, offset: number, text: string): void {
  buf.fill(0, offset, offset + 16);
  buf.write(text, offset, "latin1");
}

export interface DiskSpec extends HeaderSpec {
  /** Virtual size = image file length. */
  size: number;
  /** Image file content pattern (byte value), or sparse when omitted. */
  fill?: number;
  /** Bitmap bytes written after the header (default: all zero, padded). */
  bitmap?: Buffer;
  /** Set every cluster's bit (the image holds all data). */
  allSet?: boolean;
  /** Do not create the image file. */
  noImage?: boolean;
}

export interface DiskFiles {
  addcow: string;
  image: string;
}

/** Writes NAME.add-cow and its image file (default NAME.raw) in dir. */
export function writeDisk(dir: string, name: string, spec: DiskSpec): DiskFiles {
  const imageName = spec.imageName ?? `${name}.raw`;
  const h = header({ ...spec, imageName });
  const addcow = path.join(dir, `${name}.add-cow`);
  const image = path.resolve(dir, imageName);
  const numClusters = Math.ceil(spec.size / 2 ** h.clusterBits);
  const { padded } = bitmapBytes(numClusters, h.clusterBits);
  let bitmap = spec.bitmap;
  if (!bitmap) {
    bitmap = Buffer.alloc(padded);
    if (spec.allSet) {
      bitmap.fill(0xff, 0, numClusters >> 3);
      for (let c = numClusters & ~7; c < numClusters; c++) bitmap[c >> 3]! |= 1 << (c & 7);
    }
  }
  fs.writeFileSync(addcow, Buffer.concat([encodeHeader(h), bitmap]));
  if (!spec.noImage) {
    if (spec.fill === undefined) {
      fs.writeFileSync(image, "");
      fs.truncateSync(image, spec.size);
    } else {
      fs.writeFileSync(image, Buffer.alloc(spec.size, spec.fill));
    }
  }
  return { addcow, image };
}

export function writeRaw(file: string, size: number, fill = 0x5a): string {
  fs.writeFileSync(file, Buffer.alloc(size, fill));
  return file;
}

/** Applies fn to the bytes of a file in place. */
export function patchFile(file: string, fn: (buf: Buffer) => Buffer | void): void {
  const buf = fs.readFileSync(file);
  fs.writeFileSync(file, fn(buf) ?? buf);
}

/** A description of every entry under dir: kind, mode, size, content hash or link target. */
export type TreeSnapshot = Map<string, string>;

export function snapshotTree(dir: string): TreeSnapshot {
  const out: TreeSnapshot = new Map();
  const walk = (d: string) => {
    for (const name of fs.readdirSync(d).sort()) {
      const p = path.join(d, name);
      const st = fs.lstatSync(p);
      const rel = path.relative(dir, p);
      const base = `mode=${st.mode.toString(8)} size=${st.size} mtime=${st.mtimeMs}`;
      if (st.isSymbolicLink()) {
        out.set(rel, `link -> ${fs.readlinkSync(p)}`);
      } else if (st.isDirectory()) {
        out.set(rel, `dir ${base}`);
        walk(p);
      } else if (st.isFile()) {
        const hash = createHash("sha256").update(fs.readFileSync(p)).digest("hex");
        out.set(rel, `file ${base} sha256=${hash}`);
      } else {
        // FIFOs, sockets, devices: never read them (a FIFO would block).
        out.set(rel, `special ${base}`);
      }
    }
  };
  walk(dir);
  return out;
}

/** Human-readable differences between two snapshots ([] when identical). */
export function diffTrees(before: TreeSnapshot, after: TreeSnapshot): string[] {
  const diffs: string[] = [];
  for (const [k, v] of before) {
    const w = after.get(k);
    if (w === undefined) diffs.push(`removed ${k}`);
    else if (w !== v) diffs.push(`changed ${k}: ${v} -> ${w}`);
  }
  for (const k of after.keys()) if (!before.has(k)) diffs.push(`created ${k}`);
  return diffs;
}
