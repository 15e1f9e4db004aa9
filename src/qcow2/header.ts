/**
 * qcow2 header (versions 2 and 3), decoded and checked against every rule a
 * read-only reader depends on (extensions: extensions.ts). Big-endian
 * throughout. What is read and what is refused: docs/qcow2.md.
 */
import { MAX_NAME_BYTES, badField, decodeName, quote } from "./fields";
import { readExtensions } from "./extensions";

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits: larger tables are refused as hostile (no legitimate image needs them). */
export const MAX_L1_BYTES = 32 << 20;
export const MAX_REFTABLE_BYTES = 8 << 20;
export const MAX_SNAPSHOTS = 65536;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
const KNOWN_INCOMPAT =
  INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

export type CompressionType = "zlib" | "zstd";

export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  /** Virtual disk size in bytes (the size field rounded down to 512 bytes, as QEMU reads it). */
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: CompressionType;
  dirty: boolean;
  corrupt: boolean;
  extendedL2: boolean;
  /** The data_file incompatible bit: guest clusters live in an external raw file. */
  hasDataFile: boolean;
  /** Name of the external data file as stored, null when not named. */
  dataFileName: string | null;
  /** Backing file name as stored (relative names are relative to the qcow2 file). */
  backingName: string | null;
  /** From the backing format header extension; null when none is recorded. */
  backingFormat: string | null;
}

/** Byte offsets of the header fields, for error reports. */
export const FIELD = {
  magic: 0,
  version: 4,
  backing_file_offset: 8,
  backing_file_size: 16,
  cluster_bits: 20,
  size: 24,
  crypt_method: 32,
  l1_size: 36,
  l1_table_offset: 40,
  refcount_table_offset: 48,
  refcount_table_clusters: 56,
  nb_snapshots: 60,
  snapshots_offset: 64,
  incompatible_features: 72,
  compatible_features: 80,
  autoclear_features: 88,
  refcount_order: 96,
  header_length: 100,
  compression_type: 104,
} as const;

/** A u64 that must fit a JS number (every offset and size we use). */
function u64(buf: Buffer, off: number, file: string, field: keyof typeof FIELD): number {
  const v = buf.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw badField(file, field, off, `is ${v}, larger than any file addcow can read (2^53)`);
  }
  return Number(v);
}

function bitList(bits: bigint): number[] {
  const out: number[] = [];
  for (let i = 0; i < 64; i++) if ((bits >> BigInt(i)) & 1n) out.push(i);
  return out;
}

function clusterAligned(
  file: string,
  field: keyof typeof FIELD,
  value: number,
  clusterSize: number,
): void {
  if (value % clusterSize !== 0) {
    throw badField(
      file,
      field,
      FIELD[field],
      `is ${value}, not aligned to the cluster size ${clusterSize}`,
    );
  }
}

/** The smallest number of bytes from which {@link decodeQcow2Header} can learn the cluster size. */
export const HEADER_PROBE_BYTES = 104;

/**
 * Decodes the header in `buf` (the first cluster of the file, or all of a
 * shorter file). `fileSize` is the qcow2 file's length, for bounds checks of
 * the tables it names.
 */
export function decodeQcow2Header(buf: Buffer, file: string, fileSize: number): Qcow2Header {
  if (buf.length < 4 || buf.readUInt32BE(0) !== QCOW2_MAGIC) {
    throw badField(file, "magic", 0, `is missing: not a qcow2 image`, "check the file and -F");
  }
  if (buf.length < 72) {
    throw badField(file, "header", 0, `is truncated: the file has ${buf.length} bytes`);
  }
  const version = buf.readUInt32BE(FIELD.version);
  if (version !== 2 && version !== 3) {
    throw badField(
      file,
      "version",
      FIELD.version,
      `is ${version}; addcow reads versions 2 and 3`,
      "convert it with qemu-img convert -O qcow2",
    );
  }
  const clusterBits = buf.readUInt32BE(FIELD.cluster_bits);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw badField(
      file,
      "cluster_bits",
      FIELD.cluster_bits,
      `is ${clusterBits}, must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (512 bytes to 2 MiB)`,
    );
  }
  const clusterSize = 2 ** clusterBits;

  const cryptMethod = buf.readUInt32BE(FIELD.crypt_method);
  if (cryptMethod !== 0) {
    const kind = cryptMethod === 1 ? "AES" : cryptMethod === 2 ? "LUKS" : `method ${cryptMethod}`;
    throw badField(
      file,
      "crypt_method",
      FIELD.crypt_method,
      `is ${cryptMethod} (${kind} encryption): encrypted qcow2 images are not supported`,
      "decrypt it first with qemu-img convert",
    );
  }

  let headerLength = 72;
  let incompatibleFeatures = 0n;
  let compatibleFeatures = 0n;
  let autoclearFeatures = 0n;
  let refcountOrder = 4;
  if (version === 3) {
    if (buf.length < 104) {
      throw badField(file, "header", 0, `is truncated: version 3 needs 104 bytes`);
    }
    headerLength = buf.readUInt32BE(FIELD.header_length);
    if (headerLength < 104 || headerLength % 8 !== 0) {
      throw badField(
        file,
        "header_length",
        FIELD.header_length,
        `is ${headerLength}; version 3 needs at least 104, a multiple of 8`,
      );
    }
    if (headerLength > clusterSize) {
      throw badField(
        file,
        "header_length",
        FIELD.header_length,
        `is ${headerLength}, larger than the cluster size ${clusterSize}`,
      );
    }
    incompatibleFeatures = buf.readBigUInt64BE(FIELD.incompatible_features);
    compatibleFeatures = buf.readBigUInt64BE(FIELD.compatible_features);
    autoclearFeatures = buf.readBigUInt64BE(FIELD.autoclear_features);
    refcountOrder = buf.readUInt32BE(FIELD.refcount_order);
    if (refcountOrder > 6) {
      throw badField(
        file,
        "refcount_order",
        FIELD.refcount_order,
        `is ${refcountOrder}, at most 6 (64-bit refcounts)`,
      );
    }
  }
  if (buf.length < headerLength) {
    throw badField(file, "header", 0, `is truncated: header_length is ${headerLength}`);
  }

  // Extensions, read before the feature checks so unknown bits can be named.
  const ext = readExtensions(
    buf,
    file,
    headerLength,
    clusterSize,
    Number(buf.readBigUInt64BE(FIELD.backing_file_offset)),
  );

  const unknown = incompatibleFeatures & ~KNOWN_INCOMPAT;
  if (unknown !== 0n) {
    const names = bitList(unknown).map((b) => {
      const name = ext.featureNames.get(b);
      return name ? `${b} (${quote(name)})` : `${b}`;
    });
    throw badField(
      file,
      "incompatible_features",
      FIELD.incompatible_features,
      `has unknown bit${names.length > 1 ? "s" : ""} ${names.join(", ")} set`,
      "addcow cannot read this image; convert it with qemu-img convert -O qcow2",
    );
  }
  const extendedL2 = (incompatibleFeatures & INCOMPAT_EXTL2) !== 0n;
  if (extendedL2 && clusterBits < 14) {
    throw badField(
      file,
      "cluster_bits",
      FIELD.cluster_bits,
      `is ${clusterBits}; extended L2 entries need at least 14 (16 KiB clusters)`,
    );
  }

  let compressionType: CompressionType = "zlib";
  const compressionBit = (incompatibleFeatures & INCOMPAT_COMPRESSION) !== 0n;
  const typeByte = headerLength > FIELD.compression_type ? buf[FIELD.compression_type]! : 0;
  if (typeByte > 1) {
    throw badField(
      file,
      "compression_type",
      FIELD.compression_type,
      `is ${typeByte}; supported: 0 (zlib), 1 (zstd)`,
    );
  }
  if (typeByte !== 0 && !compressionBit) {
    throw badField(
      file,
      "compression_type",
      FIELD.compression_type,
      `is ${typeByte} but the compression type incompatible bit (3) is not set`,
    );
  }
  if (typeByte === 0 && compressionBit) {
    throw badField(
      file,
      "incompatible_features",
      FIELD.incompatible_features,
      `has the compression type bit (3) set but compression_type is 0 (zlib)`,
    );
  }
  if (typeByte === 1) compressionType = "zstd";

  // QEMU counts the disk in 512-byte sectors: a size that is not a multiple reads as rounded down.
  const sizeField = u64(buf, FIELD.size, file, "size");
  const size = sizeField - (sizeField % 512);
  const l1Size = buf.readUInt32BE(FIELD.l1_size);
  if (l1Size * 8 > MAX_L1_BYTES) {
    throw badField(
      file,
      "l1_size",
      FIELD.l1_size,
      `is ${l1Size} entries (${l1Size * 8} bytes), larger than the ${MAX_L1_BYTES}-byte limit`,
    );
  }
  const l1TableOffset = u64(buf, FIELD.l1_table_offset, file, "l1_table_offset");
  const l2Entries = clusterSize / (extendedL2 ? 16 : 8);
  const l1Needed = Math.ceil(size / (clusterSize * l2Entries));
  if (l1Size < l1Needed) {
    throw badField(
      file,
      "l1_size",
      FIELD.l1_size,
      `is ${l1Size}, too small for the virtual size ${size} (needs ${l1Needed} entries)`,
    );
  }
  if (l1Size > 0) {
    clusterAligned(file, "l1_table_offset", l1TableOffset, clusterSize);
    tableInFile(file, "l1_table_offset", l1TableOffset, l1Needed * 8, clusterSize, fileSize);
  }

  const refcountTableOffset = u64(buf, FIELD.refcount_table_offset, file, "refcount_table_offset");
  const refcountTableClusters = buf.readUInt32BE(FIELD.refcount_table_clusters);
  if (refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw badField(
      file,
      "refcount_table_clusters",
      FIELD.refcount_table_clusters,
      `is ${refcountTableClusters}, larger than the ${MAX_REFTABLE_BYTES}-byte limit`,
    );
  }
  clusterAligned(file, "refcount_table_offset", refcountTableOffset, clusterSize);
  if (refcountTableClusters > 0) {
    tableInFile(
      file,
      "refcount_table_offset",
      refcountTableOffset,
      refcountTableClusters * clusterSize,
      clusterSize,
      fileSize,
    );
  }

  const nbSnapshots = buf.readUInt32BE(FIELD.nb_snapshots);
  if (nbSnapshots > MAX_SNAPSHOTS) {
    throw badField(
      file,
      "nb_snapshots",
      FIELD.nb_snapshots,
      `is ${nbSnapshots}, more than ${MAX_SNAPSHOTS}`,
    );
  }
  const snapshotsOffset = u64(buf, FIELD.snapshots_offset, file, "snapshots_offset");
  if (nbSnapshots > 0) {
    clusterAligned(file, "snapshots_offset", snapshotsOffset, clusterSize);
    // Each entry is at least 40 bytes; we never read the table (only the active L1 matters).
    tableInFile(file, "snapshots_offset", snapshotsOffset, 40, clusterSize, fileSize);
  }

  // Backing file name: inside the first cluster, at most 1023 bytes.
  const backingOffset = u64(buf, FIELD.backing_file_offset, file, "backing_file_offset");
  let backingName: string | null = null;
  if (backingOffset !== 0) {
    const len = buf.readUInt32BE(FIELD.backing_file_size);
    if (backingOffset < headerLength || backingOffset > clusterSize) {
      throw badField(
        file,
        "backing_file_offset",
        FIELD.backing_file_offset,
        `is ${backingOffset}, outside the header cluster after the header (${headerLength}..${clusterSize})`,
      );
    }
    if (len === 0 || len > MAX_NAME_BYTES || backingOffset + len > clusterSize) {
      throw badField(
        file,
        "backing_file_size",
        FIELD.backing_file_size,
        `is ${len}; a backing name is 1..${MAX_NAME_BYTES} bytes inside the first cluster`,
      );
    }
    if (backingOffset + len > buf.length) {
      throw badField(
        file,
        "backing_file_offset",
        FIELD.backing_file_offset,
        `lies past the end of the file`,
      );
    }
    backingName = decodeName(
      buf.subarray(backingOffset, backingOffset + len),
      file,
      "backing file name",
      backingOffset,
    );
    if (ext.backingExtEnd > backingOffset) {
      throw badField(
        file,
        "backing_file_offset",
        FIELD.backing_file_offset,
        `is ${backingOffset}, inside the header extensions (they end at ${ext.backingExtEnd})`,
      );
    }
  }

  const hasDataFile = (incompatibleFeatures & INCOMPAT_DATA_FILE) !== 0n;
  if (!hasDataFile && ext.dataFileName !== null) {
    throw badField(
      file,
      "data file name extension",
      ext.dataFileOffset,
      `names ${quote(ext.dataFileName)} but the external data file bit (2) is not set`,
    );
  }
  if (hasDataFile && ext.dataFileName === null) {
    throw badField(
      file,
      "incompatible_features",
      FIELD.incompatible_features,
      `has the external data file bit (2) set but no data file name extension`,
      "addcow needs the data file named in the image: qemu-img amend -o data_file=NAME",
    );
  }
  if ((autoclearFeatures & AUTOCLEAR_DATA_FILE_RAW) !== 0n && !hasDataFile) {
    throw badField(
      file,
      "autoclear_features",
      FIELD.autoclear_features,
      `has data_file_raw (bit 1) without an external data file`,
    );
  }

  return {
    version,
    clusterBits,
    clusterSize,
    size,
    l1Size,
    l1TableOffset,
    refcountTableOffset,
    refcountTableClusters,
    nbSnapshots,
    snapshotsOffset,
    incompatibleFeatures,
    compatibleFeatures,
    autoclearFeatures,
    refcountOrder,
    headerLength,
    compressionType,
    dirty: (incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
    corrupt: (incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
    extendedL2,
    hasDataFile,
    dataFileName: ext.dataFileName,
    backingName,
    backingFormat: ext.backingFormat,
  };
}

/** A table must start after the header cluster and end inside the file. */
function tableInFile(
  file: string,
  field: keyof typeof FIELD,
  offset: number,
  bytes: number,
  clusterSize: number,
  fileSize: number,
): void {
  if (offset < clusterSize) {
    throw badField(
      file,
      field,
      FIELD[field],
      `is ${offset}: the table would overlap the header cluster`,
    );
  }
  if (offset + bytes > fileSize) {
    throw badField(
      file,
      field,
      FIELD[field],
      `is ${offset}: the table (${bytes} bytes) runs past the end of the file (${fileSize} bytes)`,
      "the file is truncated or damaged",
    );
  }
}
