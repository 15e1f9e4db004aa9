import type { BlockDevice } from "../block/block-device";
import type { FileIO } from "../block/file-io";
import type { BackingFormat } from "../addcow/header";
import { BACKING_FORMATS } from "../addcow/header";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { loadQcow2 } from "../qcow2/load";
import { Qcow2Device } from "../qcow2/qcow2-device";
import { FIELD } from "../qcow2/header";
import type { Namer } from "./access-policy";

/**
 * What open-disk lends the qcow2 opener: its chain rules (depth, loops, names
 * judged for their owners and confinement, locks, cleanup on failure).
 */
export interface ChainOpener {
  /** Counts one more layer against the depth limit; throws past it. */
  enterLayer(file: string, namedIn?: string): void;
  /**
   * Opens the qcow2 file itself read-only (judged when a header names it);
   * returns it with its owner, who is the namer of the names in its header.
   */
  openLayerFile(file: string, namer?: Namer): Promise<{ io: FileIO; owner: Namer }>;
  /** Opens a file named in a qcow2 header (its data file) read-only, judged first. */
  openNamedFile(file: string, role: string, namer: Namer): Promise<FileIO>;
  /** Opens a read-only backing layer of a known format (and its own chain). */
  openBacking(file: string, format: BackingFormat, namer: Namer): Promise<BlockDevice>;
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
  namer?: Namer,
): Promise<Qcow2Device> {
  chain.enterLayer(file, namer?.file);
  // Names in this header are this file's owner's words: judged for that user.
  const { io, owner } = await chain.openLayerFile(file, namer);
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
    dataFile = await chain.openNamedFile(dataFilePath, "data file", owner);
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
    backing = await chain.openBacking(backingPath, format as BackingFormat, owner);
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
