import type { FileIO } from "../block/file-io";
import {
  type Qcow2Header,
  HEADER_PROBE_BYTES,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  QCOW2_MAGIC,
  decodeQcow2Header,
} from "./header";
import { checkRefcountTable, loadL1 } from "./tables";

export interface LoadedQcow2 {
  header: Qcow2Header;
  l1: Float64Array;
  fileSize: number;
}

/**
 * Reads and checks everything a reader needs up front: the header cluster
 * (header, extensions, backing name), the active L1 table and the refcount
 * table. Reads at most the header cluster (2 MiB), the L1 entries the
 * virtual size needs and the refcount table (8 MiB at most).
 */
export async function loadQcow2(io: FileIO, file: string): Promise<LoadedQcow2> {
  const fileSize = await io.size();
  const probe = Buffer.alloc(Math.min(fileSize, HEADER_PROBE_BYTES));
  const got = await io.read(probe, 0);
  let first = probe.subarray(0, got);
  if (got >= 24 && probe.readUInt32BE(0) === QCOW2_MAGIC) {
    const bits = probe.readUInt32BE(20);
    if (bits >= MIN_CLUSTER_BITS && bits <= MAX_CLUSTER_BITS) {
      const whole = Buffer.alloc(Math.min(fileSize, 2 ** bits));
      first = whole.subarray(0, await io.read(whole, 0));
    }
  }
  const header = decodeQcow2Header(first, file, fileSize);
  const l1 = await loadL1(io, header, file, fileSize);
  await checkRefcountTable(io, header, file, fileSize);
  return { header, l1, fileSize };
}
