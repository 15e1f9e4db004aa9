import { MAX_NAME_BYTES, badField, decodeName } from "./fields";

/** Header extensions: backing format, data file name, feature names; encryption is refused. */
const EXT_END = 0x00000000;
const EXT_BACKING_FORMAT = 0xe2792aca;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_CRYPTO = 0x0537be77;
const EXT_DATA_FILE = 0x44415441;

export interface Extensions {
  backingFormat: string | null;
  dataFileName: string | null;
  dataFileOffset: number;
  featureNames: Map<number, string>;
  /** Where the extension area ends (its end marker included). */
  backingExtEnd: number;
}

export function readExtensions(
  buf: Buffer,
  file: string,
  headerLength: number,
  clusterSize: number,
  /** The header's backing_file_offset: the backing name ends the extension area. */
  backingOffset: number,
): Extensions {
  const out: Extensions = {
    backingFormat: null,
    dataFileName: null,
    dataFileOffset: 0,
    featureNames: new Map(),
    backingExtEnd: headerLength,
  };
  // The area runs to the backing name when there is one, else to the end of the first cluster.
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
        if (len > MAX_NAME_BYTES) {
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
