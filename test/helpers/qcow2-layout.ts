/**
 * Reading and patching the layout of a qcow2 file in tests (hostile corpus,
 * fuzzing): where the header fields, the L1 table and a guest cluster's L2
 * entry are. Independent of src/qcow2 on purpose.
 */
import * as fs from "node:fs";

export const HDR = {
  version: 4,
  backingOffset: 8,
  backingSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1Offset: 40,
  refcountOffset: 48,
  refcountClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatible: 72,
  headerLength: 100,
  compressionType: 104,
} as const;

export interface Layout {
  clusterSize: number;
  l1Offset: number;
  refcountOffset: number;
  extendedL2: boolean;
}

export function layoutOf(buf: Buffer): Layout {
  return {
    clusterSize: 2 ** buf.readUInt32BE(HDR.clusterBits),
    l1Offset: Number(buf.readBigUInt64BE(HDR.l1Offset)),
    refcountOffset: Number(buf.readBigUInt64BE(HDR.refcountOffset)),
    extendedL2: buf.readUInt32BE(HDR.version) === 3 && (buf.readBigUInt64BE(72) & 16n) !== 0n,
  };
}

/** File offset of the L2 entry for a guest offset, or null when its L2 table is unallocated. */
export function l2EntryPos(buf: Buffer, guest: number): number | null {
  const l = layoutOf(buf);
  const entryBytes = l.extendedL2 ? 16 : 8;
  const perTable = l.clusterSize / entryBytes;
  const cluster = Math.floor(guest / l.clusterSize);
  const l1e = buf.readBigUInt64BE(l.l1Offset + Math.floor(cluster / perTable) * 8);
  const l2 = Number(l1e & 0x00fffffffffffe00n);
  if (l2 === 0) return null;
  return l2 + (cluster % perTable) * entryBytes;
}

/** Reads, changes and writes back a whole file. */
export function patch(file: string, fn: (buf: Buffer) => void): void {
  const buf = fs.readFileSync(file);
  fn(buf);
  fs.writeFileSync(file, buf);
}

/** Host offset and on-disk length of the compressed cluster holding a guest offset. */
export function compressedAt(buf: Buffer, guest: number): { offset: number; length: number } {
  const l = layoutOf(buf);
  const pos = l2EntryPos(buf, guest);
  if (pos === null) throw new Error(`no L2 table for guest ${guest}`);
  const e = buf.readBigUInt64BE(pos);
  if (!((e >> 62n) & 1n)) throw new Error(`guest ${guest} is not compressed`);
  const bits = Math.log2(l.clusterSize);
  const shift = BigInt(62 - (bits - 8));
  const offset = Number(e & ((1n << shift) - 1n));
  const sectors = Number((e >> shift) & ((1n << BigInt(bits - 8)) - 1n)) + 1;
  return { offset, length: sectors * 512 - (offset % 512) };
}

/** Guest offset of the first compressed cluster at or after `from`, or null. */
export function firstCompressed(buf: Buffer, from = 0): number | null {
  const l = layoutOf(buf);
  const size = Number(buf.readBigUInt64BE(HDR.size));
  for (let g = from; g < size; g += l.clusterSize) {
    const pos = l2EntryPos(buf, g);
    if (pos !== null && (buf.readBigUInt64BE(pos) >> 62n) & 1n) return g;
  }
  return null;
}
