import type { BlockDevice } from "../block/block-device";
import {
  type ChainOpener,
  type Namer,
  type ResolvedName,
  isBackingFormat,
} from "../block/chain-opener";
import type { FileIO } from "../block/file-io";
import { BACKING_FORMATS } from "../block/chain-opener";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { loadQcow2 } from "./load";
import { Qcow2Device } from "./qcow2-device";
import { FIELD } from "./header";

/** A backing name that is not a local path: QEMU's json: pseudo-protocol or a URL. */
function isProtocolName(name: string): boolean {
  return name.startsWith("json:") || /^[a-z][a-z0-9+.-]*:\/\//i.test(name);
}

/**
 * Opens a qcow2 image read-only, with its data file and its backing chain
 * (whose format comes from the backing format header extension: never probed).
 */
export async function openQcow2(
  chain: ChainOpener,
  name: ResolvedName,
  namer?: Namer,
): Promise<Qcow2Device> {
  const file = name.path;
  chain.enterLayer(file, namer?.file);
  // Names in this header are this file's owner's words: judged for that user.
  const { io, owner } = await chain.openLayerFile(name, "qcow2 file", "read", namer);
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
    const name = chain.resolve(owner, header.dataFileName);
    dataFilePath = name.path;
    dataFile = await (await chain.judgeNamedFile(name, "data file", "read", owner)).open();
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
    if (!isBackingFormat(format)) {
      throw new AddCowError(
        `${file}: qcow2 backing format is ${JSON.stringify(format)}, not supported for a backing file (supported: ${BACKING_FORMATS.join(", ")})`,
        { file, field: "backing format extension", reason: "bad-field", code: "EINVAL" },
      );
    }
    const resolved = chain.resolve(owner, name);
    backingPath = resolved.path;
    backing = await chain.openBacking(resolved, format, owner);
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
