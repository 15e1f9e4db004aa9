import { AddCowError } from "../errors";

/**
 * add-cow header, latest layout (proposal revisions 19/20). All integers are
 * little-endian. See docs/specs/add-cow.md for every field and rule.
 */
export const MAGIC = "ACOW";
export const FIXED_HEADER_SIZE = 76;
export const MIN_CLUSTER_BITS = 12;
export const MAX_CLUSTER_BITS = 21;
export const DEFAULT_CLUSTER_BITS = 16;
export const HEADER_ALIGN = 4096;
/** Largest HEADER_SIZE we accept: max(4096, largest cluster). Bigger is hostile. */
export const MAX_HEADER_SIZE = 1 << MAX_CLUSTER_BITS;
export const FORMAT_FIELD_SIZE = 16;

/** Compatible feature bit 0: every cluster is in the image file; bitmap and backing unused. */
export const FEATURE_ALL_ALLOCATED = 1n;
export const KNOWN_COMPATIBLE = FEATURE_ALL_ALLOCATED;
export const KNOWN_INCOMPATIBLE = 0n;

export type BackingFormat = "raw" | "add-cow";
export const BACKING_FORMATS: readonly BackingFormat[] = ["raw", "add-cow"];
export const IMAGE_FORMATS = ["raw"] as const;

const OFF = {
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
} as const;

export interface AddCowHeader {
  clusterBits: number;
  headerSize: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  /** Backing file name as stored (relative names are relative to the .add-cow file). */
  backingName: string | null;
  backingFormat: BackingFormat | null;
  imageName: string;
  imageFormat: "raw";
}

/** The fixed 76-byte part, validated on its own so HEADER_SIZE is known before reading more. */
export interface FixedHeader {
  backingNameOffset: number;
  backingNameSize: number;
  imageNameOffset: number;
  imageNameSize: number;
  clusterBits: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  headerSize: number;
  backingFormat: BackingFormat | null;
  imageFormat: "raw";
}

export function headerSizeFor(clusterBits: number): number {
  return Math.max(HEADER_ALIGN, 2 ** clusterBits);
}

function bad(file: string, message: string): AddCowError {
  return new AddCowError(`${file}: ${message}`, { file, code: "EINVAL" });
}

/**
 * Reads a char[16] format field: NUL-terminated and zero padded; revision 18
 * wrote all 16 characters without a NUL, which we accept. Returns "" for all zeros.
 */
function decodeFormatField(buf: Buffer, offset: number, file: string, field: string): string {
  const raw = buf.subarray(offset, offset + FORMAT_FIELD_SIZE);
  const nul = raw.indexOf(0);
  const end = nul === -1 ? FORMAT_FIELD_SIZE : nul;
  for (let i = end; i < FORMAT_FIELD_SIZE; i++) {
    if (raw[i] !== 0) {
      throw bad(file, `${field} has non-zero bytes after its terminating NUL (byte ${offset + i})`);
    }
  }
  const text = raw.subarray(0, end).toString("latin1");
  if (!/^[\x20-\x7e]*$/.test(text)) {
    throw bad(file, `${field} is not printable text (${JSON.stringify(text)})`);
  }
  return text;
}

export function decodeFixedHeader(buf: Buffer, file: string, fileSize: number): FixedHeader {
  if (buf.length < FIXED_HEADER_SIZE) {
    throw bad(
      file,
      `truncated header: ${buf.length} bytes, an add-cow header needs at least ${FIXED_HEADER_SIZE}`,
    );
  }
  const magic = buf.subarray(0, 4);
  if (!magic.equals(Buffer.from(MAGIC, "latin1"))) {
    throw bad(
      file,
      `not an add-cow file: magic is ${JSON.stringify(magic.toString("latin1"))}, expected "ACOW"`,
    );
  }
  const h: FixedHeader = {
    backingNameOffset: buf.readUInt32LE(OFF.backingNameOffset),
    backingNameSize: buf.readUInt32LE(OFF.backingNameSize),
    imageNameOffset: buf.readUInt32LE(OFF.imageNameOffset),
    imageNameSize: buf.readUInt32LE(OFF.imageNameSize),
    clusterBits: buf.readUInt32LE(OFF.clusterBits),
    incompatibleFeatures: buf.readBigUInt64LE(OFF.incompatible),
    compatibleFeatures: buf.readBigUInt64LE(OFF.compatible),
    headerSize: buf.readUInt32LE(OFF.headerSize),
    backingFormat: null,
    imageFormat: "raw",
  };

  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
    throw bad(
      file,
      `cluster_bits is ${h.clusterBits}, must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (4 KiB to 2 MiB clusters)`,
    );
  }
  const unknownIncompat = h.incompatibleFeatures & ~KNOWN_INCOMPATIBLE;
  if (unknownIncompat !== 0n) {
    throw bad(
      file,
      `unknown incompatible feature bits 0x${unknownIncompat.toString(16)}: this disk needs a newer addcow`,
    );
  }
  if (h.headerSize < HEADER_ALIGN || h.headerSize % HEADER_ALIGN !== 0) {
    throw bad(file, `HEADER_SIZE is ${h.headerSize}, must be a multiple of 4096 and at least 4096`);
  }
  if (h.headerSize > MAX_HEADER_SIZE) {
    throw bad(file, `HEADER_SIZE is ${h.headerSize}, larger than the maximum ${MAX_HEADER_SIZE}`);
  }
  if (h.headerSize > fileSize) {
    throw bad(
      file,
      `HEADER_SIZE is ${h.headerSize} but the file has only ${fileSize} bytes (truncated?)`,
    );
  }

  const hasBackingName = h.backingNameOffset !== 0 || h.backingNameSize !== 0;
  if (hasBackingName) {
    if (h.backingNameOffset === 0 || h.backingNameSize === 0) {
      throw bad(
        file,
        `backing name offset is ${h.backingNameOffset} and size ${h.backingNameSize}: both must be 0 or both non-zero`,
      );
    }
    checkNameField(file, "backing name", h.backingNameOffset, h.backingNameSize, h.headerSize);
  }
  if (h.imageNameSize === 0) throw bad(file, `image name is empty (image name size is 0)`);
  checkNameField(file, "image name", h.imageNameOffset, h.imageNameSize, h.headerSize);
  if (hasBackingName) {
    const a = [h.backingNameOffset, h.backingNameOffset + h.backingNameSize];
    const b = [h.imageNameOffset, h.imageNameOffset + h.imageNameSize];
    if (a[0]! < b[1]! && b[0]! < a[1]!) {
      throw bad(
        file,
        `backing name [${a[0]}, ${a[1]}) and image name [${b[0]}, ${b[1]}) overlap in the header`,
      );
    }
  }

  const backingFormat = decodeFormatField(buf, OFF.backingFormat, file, "backing format");
  const imageFormat = decodeFormatField(buf, OFF.imageFormat, file, "image format");
  if (hasBackingName) {
    if (backingFormat === "") {
      throw bad(file, `a backing file is named but the backing format is empty`);
    }
    if (!(BACKING_FORMATS as readonly string[]).includes(backingFormat)) {
      throw bad(
        file,
        `backing format ${JSON.stringify(backingFormat)} is not supported (supported: raw, add-cow)`,
      );
    }
    h.backingFormat = backingFormat as BackingFormat;
  } else if (backingFormat !== "") {
    throw bad(
      file,
      `backing format is ${JSON.stringify(backingFormat)} but no backing file is named`,
    );
  }
  if (imageFormat === "") throw bad(file, `image format is empty`);
  if (imageFormat !== "raw") {
    throw bad(
      file,
      `image format ${JSON.stringify(imageFormat)} is not supported (supported: raw)`,
    );
  }
  return h;
}

function checkNameField(
  file: string,
  what: string,
  offset: number,
  size: number,
  headerSize: number,
): void {
  if (offset < FIXED_HEADER_SIZE) {
    throw bad(
      file,
      `${what} offset is ${offset}, inside the fixed header (must be >= ${FIXED_HEADER_SIZE})`,
    );
  }
  if (offset + size > headerSize) {
    throw bad(file, `${what} [${offset}, +${size}) runs past HEADER_SIZE ${headerSize}`);
  }
}

/** Decodes and validates the whole header area (HEADER_SIZE bytes). */
export function decodeHeader(buf: Buffer, file: string, fileSize: number): AddCowHeader {
  const f = decodeFixedHeader(buf, file, fileSize);
  if (buf.length < f.headerSize) {
    throw bad(file, `truncated header: ${buf.length} bytes, HEADER_SIZE is ${f.headerSize}`);
  }
  const names: Array<[number, number]> = [[f.imageNameOffset, f.imageNameSize]];
  if (f.backingNameSize) names.push([f.backingNameOffset, f.backingNameSize]);
  for (let i = FIXED_HEADER_SIZE; i < f.headerSize; i++) {
    if (buf[i] === 0) continue;
    if (names.some(([o, s]) => i >= o && i < o + s)) continue;
    throw bad(file, `byte ${i} of the name area is ${buf[i]}, outside both names (must be 0)`);
  }
  const name = (o: number, s: number, what: string): string => {
    const bytes = buf.subarray(o, o + s);
    if (bytes.includes(0)) throw bad(file, `${what} contains a NUL byte`);
    return bytes.toString("utf8");
  };
  const imageName = name(f.imageNameOffset, f.imageNameSize, "image name");
  const backingName = f.backingNameSize
    ? name(f.backingNameOffset, f.backingNameSize, "backing name")
    : null;
  if (backingName !== null && backingName === imageName) {
    throw bad(file, `image name and backing name are the same (${JSON.stringify(imageName)})`);
  }
  return {
    clusterBits: f.clusterBits,
    headerSize: f.headerSize,
    incompatibleFeatures: f.incompatibleFeatures,
    compatibleFeatures: f.compatibleFeatures,
    backingName,
    backingFormat: f.backingFormat,
    imageName,
    imageFormat: f.imageFormat,
  };
}

/** Encodes a header into a fresh HEADER_SIZE buffer: backing name at 76, image name after it. */
export function encodeHeader(h: AddCowHeader): Buffer {
  const buf = Buffer.alloc(h.headerSize);
  const backing = h.backingName === null ? null : Buffer.from(h.backingName, "utf8");
  const image = Buffer.from(h.imageName, "utf8");
  const imageOffset = FIXED_HEADER_SIZE + (backing ? backing.length : 0);
  if (imageOffset + image.length > h.headerSize) {
    throw new AddCowError(
      `file names too long for the header: ${imageOffset + image.length - FIXED_HEADER_SIZE} bytes, at most ${h.headerSize - FIXED_HEADER_SIZE} fit`,
    );
  }
  if (image.length === 0) throw new AddCowError("image name is empty");
  buf.write(MAGIC, OFF.magic, "latin1");
  buf.writeUInt32LE(backing ? FIXED_HEADER_SIZE : 0, OFF.backingNameOffset);
  buf.writeUInt32LE(backing ? backing.length : 0, OFF.backingNameSize);
  buf.writeUInt32LE(imageOffset, OFF.imageNameOffset);
  buf.writeUInt32LE(image.length, OFF.imageNameSize);
  buf.writeUInt32LE(h.clusterBits, OFF.clusterBits);
  buf.writeBigUInt64LE(h.incompatibleFeatures, OFF.incompatible);
  buf.writeBigUInt64LE(h.compatibleFeatures, OFF.compatible);
  buf.writeUInt32LE(h.headerSize, OFF.headerSize);
  if (h.backingFormat) buf.write(h.backingFormat, OFF.backingFormat, "latin1");
  buf.write(h.imageFormat, OFF.imageFormat, "latin1");
  if (backing) backing.copy(buf, FIXED_HEADER_SIZE);
  image.copy(buf, imageOffset);
  return buf;
}

/** Byte offset of the compatible-features field, for flipping "all allocated" in place. */
export const COMPATIBLE_FEATURES_OFFSET = OFF.compatible;

/** Bytes of bitmap the disk needs (one bit per cluster), and the padded length on disk. */
export function bitmapBytes(
  numClusters: number,
  clusterBits: number,
): {
  needed: number;
  padded: number;
} {
  const needed = Math.ceil(numClusters / 8);
  const cs = 2 ** clusterBits;
  return { needed, padded: Math.ceil(needed / cs) * cs };
}
