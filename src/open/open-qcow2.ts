import type { BlockDevice } from "../block/block-device";
import type { FileIO } from "../block/file-io";
import type { BackingFormat } from "../addcow/header";
import { BACKING_FORMATS } from "../addcow/header";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { loadQcow2 } from "../qcow2/load";
import { Qcow2Device } from "../qcow2/qcow2-device";
import { FIELD } from "../qcow2/header";

/** What open-disk lends the qcow2 opener: its chain rules (depth, loops, locks, cleanup). */
export interface ChainOpener {
  /** Counts one more layer against the depth limit; throws past it. */
  enterLayer(file: string, namedIn?: string): void;
  /** Checks a file (regular, not seen before in the chain) and opens it read-only, locked shared. */
  openReadOnly(file: string, role: string, namedIn?: string): Promise<FileIO>;
  /** Opens a read-only backing layer of a known format (and its own chain). */
  openBacking(file: string, format: BackingFormat, namedIn: string): Promise<BlockDevice>;
  /** A name stored in `file`, resolved against its directory. */
  resolve(file: string, stored: string): string;
}

/** A backing name that is not a local path: QEMU's json: pseudo-protocol or a URL. */
function isProtocolName(name: string): boolean {
  return name.startsWith("json:") || /^[a-z][a-z0-9+.-]*:\/\//i.test(name);
}

/**
 * Opens a qcow2 image read-only, with its data file and its backing chain
 * (whose format comes from the backing format header extension: never probed).
 */
export async function openQcow2(
  file: string,
  chain: ChainOpener,
  namedIn?: string,
): Promise<Qcow2Device> {
  chain.enterLayer(file, namedIn);
  const io = await chain.openReadOnly(file, namedIn ? "backing file" : "qcow2 file", namedIn);
  const { header, l1, fileSize } = await loadQcow2(io, file);
  log.open(
    "%s: qcow2 v%d, cluster %d, size %d, compression %s, backing %s (%s), data file %s",
    file,
    header.version,
    header.clusterSize,
    header.size,
    header.compressionType,
    header.backingName,
    header.backingFormat,
    header.dataFileName,
  );

  let dataFile: FileIO | null = null;
  let dataFilePath: string | null = null;
  if (header.dataFileName !== null) {
    if (isProtocolName(header.dataFileName)) {
      throw new AddCowError(
        `${file}: qcow2 data file name ${JSON.stringify(header.dataFileName)} is not a local file; addcow reads only local data files`,
        { file, field: "data file name extension", reason: "bad-field", code: "EINVAL" },
      );
    }
    dataFilePath = chain.resolve(file, header.dataFileName);
    dataFile = await chain.openReadOnly(dataFilePath, "data file", file);
  }

  let backing: BlockDevice | null = null;
  let backingPath: string | null = null;
  if (header.backingName !== null) {
    const name = header.backingName;
    if (isProtocolName(name)) {
      throw new AddCowError(
        `${file}: qcow2 backing file name ${JSON.stringify(name)} is not a local file; addcow follows only local backing files`,
        {
          file,
          field: "backing file name",
          reason: "bad-field",
          code: "EINVAL",
          offset: FIELD.backing_file_offset,
        },
      );
    }
    const format = header.backingFormat;
    if (format === null) {
      throw new AddCowError(
        `${file}: qcow2 image names backing file ${JSON.stringify(name)} but records no backing format (formats are never guessed); set it with qemu-img rebase -u -b ${JSON.stringify(name)} -F raw|qcow2 ${file}`,
        { file, field: "backing format extension", reason: "bad-field", code: "EINVAL" },
      );
    }
    if (!(BACKING_FORMATS as readonly string[]).includes(format)) {
      throw new AddCowError(
        `${file}: qcow2 backing format is ${JSON.stringify(format)}, not supported for a backing file (supported: ${BACKING_FORMATS.join(", ")})`,
        { file, field: "backing format extension", reason: "bad-field", code: "EINVAL" },
      );
    }
    backingPath = chain.resolve(file, name);
    backing = await chain.openBacking(backingPath, format as BackingFormat, file);
  }
  return new Qcow2Device({
    path: file,
    io,
    fileSize,
    header,
    l1,
    dataFile,
    dataFilePath,
    backing,
    backingPath,
  });
}
