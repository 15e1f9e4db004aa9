import { BACKING_FORMATS, type BackingFormat, isBackingFormat } from "../block/chain-opener";
import { AddCowError } from "../util/errors";

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
/**
 * Compatible feature bit 1: the backing's identity is pinned in an extension
 * at the end of the file, after the bitmap (pin.ts). Older readers ignore it.
 */
export const FEATURE_BACKING_PIN = 2n;
export const KNOWN_COMPATIBLE = FEATURE_ALL_ALLOCATED | FEATURE_BACKING_PIN;
export const KNOWN_INCOMPATIBLE = 0n;

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

/** What a user can do about a header that breaks a rule. */
export const DAMAGED_ADVICE =
  "the .add-cow file is damaged (or not add-cow revision 19/20): restore it from a backup";

/** Where in the header a problem is: the field's name and the byte (null: no single byte). */
interface At {
  field: string;
  offset: number | null;
}

/** A header error: the fact (`detail`, what addcow check lists), the file, and what to do. */
function bad(
  file: string,
  where: At,
  detail: string,
  advice: string = DAMAGED_ADVICE,
): AddCowError {
  return new AddCowError(`${file}: ${detail}; ${advice}`, {
    file,
    code: "EINVAL",
    reason: "bad-field",
    field: where.field,
    ...(where.offset === null ? {} : { offset: where.offset }),
    detail,
  });
}

const at = (field: string, offset: number | null): At => ({ field, offset });
const WHOLE_HEADER = at("header", null);

/** A string from the file, quoted so control characters never break the one-line message. */
function quote(text: string): string {
  return JSON.stringify(text).replace(
    /[\u007f-\u009f]/g,
    (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, "0")}`,
  );
}

/**
 * Bytes from the file for a message: quoted text when every byte is printable
 * ASCII, else hex (`0xc08af826`), so a binary value never turns into mojibake.
 */
export function showBytes(bytes: Buffer): string {
  if (bytes.every((b) => b >= 0x20 && b <= 0x7e)) return JSON.stringify(bytes.toString("latin1"));
  return `0x${bytes.toString("hex")}`;
}

/** What a file with this magic is, when it is a well-known image format. */
function knownMagic(magic: Buffer): string {
  return magic.equals(Buffer.from("QFI\xfb", "latin1")) ? " (a qcow2 image)" : "";
}

/** "bits 0 and 5 (0x21)": the unknown feature bits, by number. */
export function describeBits(bits: bigint): string {
  const set: number[] = [];
  for (let i = 0; i < 64; i++) if ((bits >> BigInt(i)) & 1n) set.push(i);
  const list = set.length === 1 ? `bit ${set[0]}` : `bits ${set.join(", ")}`;
  return `${list} (0x${bits.toString(16)})`;
}

/**
 * Reads a char[16] format field: NUL-terminated and zero padded; revision 18
 * wrote all 16 characters without a NUL, which we accept. Returns "" for all zeros.
 */
function decodeFormatField(buf: Buffer, offset: number, file: string, field: string): string {
  const here = at(field, offset);
  const raw = buf.subarray(offset, offset + FORMAT_FIELD_SIZE);
  const nul = raw.indexOf(0);
  const end = nul === -1 ? FORMAT_FIELD_SIZE : nul;
  for (let i = end; i < FORMAT_FIELD_SIZE; i++) {
    if (raw[i] !== 0) {
      throw bad(
        file,
        at(field, offset + i),
        `${field} (bytes ${offset}..${offset + FORMAT_FIELD_SIZE - 1}) has byte ${raw[i]} at offset ${offset + i}, after its terminating NUL (must be 0)`,
      );
    }
  }
  const text = raw.subarray(0, end).toString("latin1");
  if (!/^[\x20-\x7e]*$/.test(text)) {
    throw bad(file, here, `${field} is ${showBytes(raw.subarray(0, end))}, not printable text`);
  }
  return text;
}

export function decodeFixedHeader(buf: Buffer, file: string, fileSize: number): FixedHeader {
  if (fileSize === 0 || buf.length === 0) {
    throw bad(
      file,
      WHOLE_HEADER,
      `the file is empty (0 bytes), not an add-cow file`,
      "check the file name",
    );
  }
  // Magic first, on whatever is there: a short file of another kind is "not add-cow", not "truncated".
  if (buf.subarray(0, 8).equals(Buffer.from("ADD_COW\xff", "latin1"))) {
    throw bad(
      file,
      at("magic", OFF.magic),
      `magic is "ADD_COW\\xff": the old big-endian add-cow layout (2011-2012), which addcow does not read`,
      "only the revision 19/20 layout (magic ACOW) is supported",
    );
  }
  const magic = buf.subarray(0, Math.min(4, buf.length));
  if (!magic.equals(Buffer.from(MAGIC, "latin1").subarray(0, magic.length))) {
    throw bad(
      file,
      at("magic", OFF.magic),
      `magic is ${showBytes(magic)}${knownMagic(magic)}, expected "ACOW" (0x41434f57): not an add-cow file (revision 19/20)`,
      "check the file name",
    );
  }
  if (buf.length < FIXED_HEADER_SIZE) {
    throw bad(
      file,
      WHOLE_HEADER,
      `header is truncated: the file has ${buf.length} bytes, the fixed header needs ${FIXED_HEADER_SIZE}`,
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
      at("cluster_bits", OFF.clusterBits),
      `cluster_bits is ${h.clusterBits}, must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS} (4 KiB to 2 MiB clusters)`,
    );
  }
  const unknownIncompat = h.incompatibleFeatures & ~KNOWN_INCOMPATIBLE;
  if (unknownIncompat !== 0n) {
    throw bad(
      file,
      at("incompatible features", OFF.incompatible),
      `incompatible features has unknown ${describeBits(unknownIncompat)} set`,
      "this disk needs a newer addcow, or the header is damaged; it is not opened",
    );
  }
  if (h.headerSize < HEADER_ALIGN) {
    throw bad(
      file,
      at("HEADER_SIZE", OFF.headerSize),
      `HEADER_SIZE is ${h.headerSize}, too small (at least ${HEADER_ALIGN})`,
    );
  }
  if (h.headerSize % HEADER_ALIGN !== 0) {
    throw bad(
      file,
      at("HEADER_SIZE", OFF.headerSize),
      `HEADER_SIZE is ${h.headerSize}, not a multiple of ${HEADER_ALIGN}`,
    );
  }
  if (h.headerSize > MAX_HEADER_SIZE) {
    throw bad(
      file,
      at("HEADER_SIZE", OFF.headerSize),
      `HEADER_SIZE is ${h.headerSize}, larger than the largest valid header (${MAX_HEADER_SIZE})`,
    );
  }
  if (h.headerSize > fileSize) {
    throw bad(
      file,
      at("HEADER_SIZE", OFF.headerSize),
      `HEADER_SIZE is ${h.headerSize} but the file has only ${fileSize} bytes (truncated?)`,
    );
  }

  const hasBackingName = h.backingNameOffset !== 0 || h.backingNameSize !== 0;
  if (hasBackingName) {
    if (h.backingNameOffset === 0 || h.backingNameSize === 0) {
      throw bad(
        file,
        at("backing name offset", OFF.backingNameOffset),
        `backing name offset is ${h.backingNameOffset} and backing name size ${h.backingNameSize}: both must be 0 (no backing file) or both non-zero`,
      );
    }
    checkNameField(file, "backing name", h.backingNameOffset, h.backingNameSize, h.headerSize);
  }
  if (h.imageNameSize === 0) {
    throw bad(
      file,
      at("image name size", OFF.imageNameSize),
      `image name size is 0: the image name is empty (it is required)`,
    );
  }
  checkNameField(file, "image name", h.imageNameOffset, h.imageNameSize, h.headerSize);
  if (hasBackingName) {
    const a = [h.backingNameOffset, h.backingNameOffset + h.backingNameSize];
    const b = [h.imageNameOffset, h.imageNameOffset + h.imageNameSize];
    if (a[0]! < b[1]! && b[0]! < a[1]!) {
      throw bad(
        file,
        at("backing name", a[0]!),
        `backing name (bytes ${a[0]}..${a[1]! - 1}) and image name (bytes ${b[0]}..${b[1]! - 1}) overlap`,
      );
    }
  }

  const backingFormat = decodeFormatField(buf, OFF.backingFormat, file, "backing format");
  const imageFormat = decodeFormatField(buf, OFF.imageFormat, file, "image format");
  if (hasBackingName) {
    if (backingFormat === "") {
      throw bad(
        file,
        at("backing format", OFF.backingFormat),
        `backing format is empty but a backing file is named (must be ${BACKING_FORMATS.join(", ")})`,
      );
    }
    if (!isBackingFormat(backingFormat)) {
      throw bad(
        file,
        at("backing format", OFF.backingFormat),
        `backing format is ${quote(backingFormat)}, not supported (supported: ${BACKING_FORMATS.join(", ")})`,
      );
    }
    h.backingFormat = backingFormat;
  } else if (backingFormat !== "") {
    throw bad(
      file,
      at("backing format", OFF.backingFormat),
      `backing format is ${quote(backingFormat)} but no backing file is named (backing name size is 0)`,
    );
  }
  if (imageFormat === "") {
    throw bad(file, at("image format", OFF.imageFormat), `image format is empty (must be raw)`);
  }
  if (imageFormat !== "raw") {
    throw bad(
      file,
      at("image format", OFF.imageFormat),
      `image format is ${quote(imageFormat)}, not supported (supported: raw)`,
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
  const here = at(
    `${what} offset`,
    what === "image name" ? OFF.imageNameOffset : OFF.backingNameOffset,
  );
  if (offset < FIXED_HEADER_SIZE) {
    throw bad(
      file,
      here,
      `${what} offset is ${offset}, inside the fixed header (must be at least ${FIXED_HEADER_SIZE})`,
    );
  }
  if (offset + size > headerSize) {
    throw bad(
      file,
      here,
      `${what} offset ${offset} + size ${size} = ${offset + size} runs past HEADER_SIZE ${headerSize}`,
    );
  }
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/** A stored file name: UTF-8, no NUL, no control characters (they would break messages and paths). */
function decodeName(buf: Buffer, offset: number, size: number, what: string, file: string): string {
  const bytes = buf.subarray(offset, offset + size);
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i]!;
    if (b < 0x20 || b === 0x7f) {
      throw bad(
        file,
        at(what, offset + i),
        `${what} has control byte 0x${b.toString(16).padStart(2, "0")} at offset ${offset + i} (names are plain UTF-8 text)`,
      );
    }
  }
  try {
    return utf8.decode(bytes);
  } catch {
    throw bad(
      file,
      at(what, offset),
      `${what} (bytes ${offset}..${offset + size - 1}) is not valid UTF-8`,
    );
  }
}

/** Decodes and validates the whole header area (HEADER_SIZE bytes). */
export function decodeHeader(buf: Buffer, file: string, fileSize: number): AddCowHeader {
  const f = decodeFixedHeader(buf, file, fileSize);
  if (buf.length < f.headerSize) {
    throw bad(
      file,
      WHOLE_HEADER,
      `header is truncated: ${buf.length} bytes read, HEADER_SIZE is ${f.headerSize}`,
    );
  }
  // Every byte of the name area outside the two names must be 0.
  const names: Array<[number, number]> = [[f.imageNameOffset, f.imageNameOffset + f.imageNameSize]];
  if (f.backingNameSize) {
    names.push([f.backingNameOffset, f.backingNameOffset + f.backingNameSize]);
  }
  names.sort((x, y) => x[0] - y[0]);
  let from = FIXED_HEADER_SIZE;
  for (const [start, stop] of [...names, [f.headerSize, f.headerSize] as [number, number]]) {
    for (let i = from; i < start; i++) {
      if (buf[i] !== 0) {
        throw bad(
          file,
          at("name area", i),
          `name area byte at offset ${i} is ${buf[i]}, outside both names (must be 0)`,
        );
      }
    }
    from = Math.max(from, stop);
  }
  const imageName = decodeName(buf, f.imageNameOffset, f.imageNameSize, "image name", file);
  const backingName = f.backingNameSize
    ? decodeName(buf, f.backingNameOffset, f.backingNameSize, "backing name", file)
    : null;
  if (backingName !== null && backingName === imageName) {
    throw bad(
      file,
      at("image name", OFF.imageNameOffset),
      `image name and backing name are both ${quote(imageName)} (they must name different files)`,
    );
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
  for (const [what, name] of [
    ["image", h.imageName],
    ["backing", h.backingName ?? ""],
  ] as const) {
    if ([...name].some((ch) => ch.charCodeAt(0) < 0x20 || ch === "\x7f")) {
      throw new AddCowError(
        `${what} file name ${quote(name)} contains a control character; rename the file`,
      );
    }
  }
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
