import { AddCowError } from "../util/errors";

/**
 * qcow2 header (versions 2 and 3) and its extensions, decoded and checked
 * against every rule a read-only reader depends on. Big-endian throughout.
 * What is read and what is refused: docs/qcow2.md.
 */
export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** QEMU's limits: larger tables are refused as hostile (no legitimate image needs them). */
export const MAX_L1_BYTES = 32 << 20;
export const MAX_REFTABLE_BYTES = 8 << 20;
export const MAX_SNAPSHOTS = 65536;
export const MAX_BACKING_NAME = 1023;

export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
const KNOWN_INCOMPAT =
  INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

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

const DAMAGED = "the qcow2 file is damaged or not a qcow2 image";

/** One-line refusal naming the field at fault. */
export function badField(
  file: string,
  field: string,
  offset: number,
  message: string,
  advice = DAMAGED,
): AddCowError {
  return new AddCowError(`${file}: qcow2 ${field} ${message}; ${advice}`, {
    file,
    field,
    offset,
    reason: "bad-field",
    code: "EINVAL",
  });
}

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

/** A text field from the file, quoted so control characters cannot break the message line. */
function quote(text: string): string {
  return JSON.stringify(text).replace(
    /[\u007f-\u009f]/g,
    (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

function decodeName(bytes: Buffer, file: string, field: string, offset: number): string {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    throw badField(file, field, offset, `is not valid UTF-8`);
  }
  if ([...text].some((ch) => ch.charCodeAt(0) < 0x20 || ch === "\x7f")) {
    throw badField(file, field, offset, `${quote(text)} contains a control character`);
  }
  if (text === "") throw badField(file, field, offset, `is empty`);
  return text;
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
  const ext = readExtensions(buf, file, headerLength, clusterSize);

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
    if (len === 0 || len > MAX_BACKING_NAME || backingOffset + len > clusterSize) {
      throw badField(
        file,
        "backing_file_size",
        FIELD.backing_file_size,
        `is ${len}; a backing name is 1..${MAX_BACKING_NAME} bytes inside the first cluster`,
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

interface Extensions {
  backingFormat: string | null;
  dataFileName: string | null;
  dataFileOffset: number;
  featureNames: Map<number, string>;
  /** Where the extension area ends (its end marker included). */
  backingExtEnd: number;
}

function readExtensions(
  buf: Buffer,
  file: string,
  headerLength: number,
  clusterSize: number,
): Extensions {
  const out: Extensions = {
    backingFormat: null,
    dataFileName: null,
    dataFileOffset: 0,
    featureNames: new Map(),
    backingExtEnd: headerLength,
  };
  // The area runs to the backing name when there is one, else to the end of the first cluster.
  const backingOffset = Number(buf.readBigUInt64BE(FIELD.backing_file_offset));
  const end = Math.min(
    buf.length,
    backingOffset > headerLength && backingOffset <= clusterSize ? backingOffset : clusterSize,
  );
  const seen = new Set<number>();
  let pos = headerLength;
  while (pos + 8 <= end) {
    const type = buf.readUInt32BE(pos);
    const len = buf.readUInt32BE(pos + 4);
    if (type === EXT_END) {
      out.backingExtEnd = pos + 8;
      return out;
    }
    const dataAt = pos + 8;
    if (len > end - dataAt) {
      throw badField(
        file,
        `header extension 0x${type.toString(16)}`,
        pos,
        `is ${len} bytes long, past the end of the extension area (${end})`,
      );
    }
    if (seen.has(type) && type !== EXT_END) {
      throw badField(file, `header extension 0x${type.toString(16)}`, pos, `appears twice`);
    }
    seen.add(type);
    const data = buf.subarray(dataAt, dataAt + len);
    switch (type) {
      case EXT_BACKING_FORMAT:
        if (len === 0 || len > 15) {
          throw badField(file, "backing format extension", pos, `is ${len} bytes (1..15)`);
        }
        out.backingFormat = decodeName(data, file, "backing format extension", dataAt);
        break;
      case EXT_DATA_FILE:
        if (len > MAX_BACKING_NAME) {
          throw badField(file, "data file name extension", pos, `is ${len} bytes (at most 1023)`);
        }
        out.dataFileName = decodeName(data, file, "data file name extension", dataAt);
        out.dataFileOffset = dataAt;
        break;
      case EXT_CRYPTO:
        throw badField(
          file,
          "full disk encryption extension",
          pos,
          `is present: encrypted qcow2 images are not supported`,
          "decrypt it first with qemu-img convert",
        );
      case EXT_FEATURE_NAMES:
        for (let i = 0; i + 48 <= len; i += 48) {
          if (data[i] !== 0) continue; // only incompatible-feature names are used in messages
          const raw = data.subarray(i + 2, i + 48);
          const nul = raw.indexOf(0);
          out.featureNames.set(
            data[i + 1]!,
            raw.subarray(0, nul === -1 ? raw.length : nul).toString("latin1"),
          );
        }
        break;
      default:
        break; // unknown extensions are safe to ignore
    }
    pos = dataAt + Math.ceil(len / 8) * 8;
  }
  out.backingExtEnd = pos;
  return out;
}
