import type { FileIO } from "../block/file-io";
import { badField } from "./fields";
import type { Qcow2Header } from "./header";

/**
 * The tables read once at open: the active L1 table (only the entries the
 * virtual size needs; the rest address VM state) and the refcount table,
 * which a read-only reader never follows but checks, so a damaged image is
 * refused up front instead of failing later.
 */

/** Bits 9..55 of an L1, L2 or refcount table entry: the offset of what it points to. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
}

async function readTable(
  io: FileIO,
  offset: number,
  bytes: number,
  file: string,
  field: string,
): Promise<Buffer> {
  const buf = Buffer.alloc(bytes);
  const n = await io.read(buf, offset);
  if (n < bytes) {
    throw badField(file, field, offset, `is truncated: ${n} of ${bytes} bytes read`);
  }
  return buf;
}

/** Number of guest clusters one L2 table maps. */
export function l2EntriesPerTable(h: Qcow2Header): number {
  return h.clusterSize / (h.extendedL2 ? 16 : 8);
}

/**
 * Loads the active L1 table as L2 table offsets (0: unallocated). Every entry
 * must point at a whole cluster inside the file, after the header cluster.
 */
export async function loadL1(
  io: FileIO,
  h: Qcow2Header,
  file: string,
  fileSize: number,
): Promise<Float64Array> {
  const needed = Math.ceil(h.size / (h.clusterSize * l2EntriesPerTable(h)));
  const l1 = new Float64Array(needed);
  if (needed === 0) return l1;
  const raw = await readTable(io, h.l1TableOffset, needed * 8, file, "L1 table");
  for (let i = 0; i < needed; i++) {
    const at = h.l1TableOffset + i * 8;
    const off = checkedPointer(
      raw,
      i,
      h.clusterSize,
      fileSize,
      file,
      `L1 entry ${i}`,
      at,
      "L2 table",
    );
    l1[i] = off;
  }
  return l1;
}

/** Checks the refcount table's entries (each names a refcount block). */
export async function checkRefcountTable(
  io: FileIO,
  h: Qcow2Header,
  file: string,
  fileSize: number,
): Promise<void> {
  const bytes = h.refcountTableClusters * h.clusterSize;
  if (bytes === 0) return;
  const raw = await readTable(io, h.refcountTableOffset, bytes, file, "refcount table");
  for (let i = 0; i < bytes / 8; i++) {
    const at = h.refcountTableOffset + i * 8;
    checkedPointer(
      raw,
      i,
      h.clusterSize,
      fileSize,
      file,
      `refcount table entry ${i}`,
      at,
      "refcount block",
    );
  }
}

/**
 * Entry i of a table of pointers to whole clusters: 0 or a cluster-aligned
 * offset of a cluster lying wholly inside the file, after the header cluster.
 */
function checkedPointer(
  raw: Buffer,
  i: number,
  clusterSize: number,
  fileSize: number,
  file: string,
  field: string,
  at: number,
  what: string,
): number {
  const hi = raw.readUInt32BE(i * 8);
  const lo = raw.readUInt32BE(i * 8 + 4);
  const off = entryOffset(hi, lo);
  if (off === 0) return 0;
  if (off % clusterSize !== 0) {
    throw badField(
      file,
      field,
      at,
      `points at ${off}, not aligned to the cluster size ${clusterSize}`,
    );
  }
  if (off < clusterSize) {
    throw badField(file, field, at, `points the ${what} into the header cluster`);
  }
  if (off + clusterSize > fileSize) {
    throw badField(
      file,
      field,
      at,
      `points the ${what} at ${off}, past the end of the file (${fileSize} bytes)`,
      "the file is truncated or damaged",
    );
  }
  return off;
}
