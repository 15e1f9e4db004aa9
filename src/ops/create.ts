import { type BackingFormat, BACKING_FORMATS } from "../block/chain-opener";
import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError, errnoCode, isNoSpace } from "../util/errors";
import {
  DEFAULT_CLUSTER_BITS,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  bitmapBytes,
  encodeHeader,
  headerSizeFor,
} from "../addcow/header";
import { formatSize } from "../util/size";
import { openBacking } from "../chain/open-chain";
import { sharedFile } from "../chain/loops";
import { isRemoteName, parseRemoteName } from "../remote/url";
import type { Confinement } from "../chain/access-policy";
import { writeZeros } from "../addcow/bitmap-space";
import { FEATURE_BACKING_PIN } from "../addcow/header";
import { encodePinArea, pinRecord } from "../addcow/pin";
import type { LayerIdentity } from "../block/layer-identity";
import { AUTO_MANIFEST, type ManifestChoice, identityToPin } from "./backing-identity";
import { PosixFile } from "../block/file-io";

/** A new file (O_EXCL) as FileIO. */
function openNewFile(file: string): PosixFile {
  return new PosixFile(file, fs.openSync(file, "wx"), true);
}

export interface CreateOptions {
  /** Path of the new .add-cow file. */
  file: string;
  /** Backing file path as the user gave it (relative to the working directory). */
  backing?: string;
  backingFormat?: string;
  /** Image file path (relative to the working directory); default FILE with .add-cow -> .raw. */
  image?: string;
  clusterSize?: number;
  /** Virtual size in bytes; default the existing image file's size, else the backing file's. */
  size?: number;
  /**
   * Size of the backing disk when the caller has it open already (a live
   * snapshot, whose backing is open for writing in this process): the backing
   * file is then not opened again to validate it.
   */
  backingSize?: number;
  /** The identity of that open backing, pinned in the new disk (with backingSize). */
  backingIdentity?: LayerIdentity | null;
  /** A remote base's manifest to pin (default: the one at URL.manifest, if there is one). */
  manifest?: ManifestChoice;
  /** Confinement for the names in the backing disk's headers (docs/security.md). */
  confine?: Confinement | null;
  /** Store these names relative to FILE's directory even though they are given absolute. */
  relative?: { backing: boolean; image: boolean };
}

export interface CreateResult {
  file: string;
  imagePath: string;
  imageCreated: boolean;
  size: number;
  clusterSize: number;
  backingPath: string | null;
  /** What was pinned of the backing (null: no backing, or it cannot tell). */
  pinned: LayerIdentity | null;
}

export function defaultImageName(file: string): string {
  return file.endsWith(".add-cow") ? file.slice(0, -".add-cow".length) + ".raw" : file + ".raw";
}

/**
 * The name to store: relative to the .add-cow file's directory when the user
 * gave it relative (or `relative` says the user did: a live snapshot gets
 * absolute paths over the control socket), else as given; a URL as it is
 * (checked to carry no credentials).
 */
export function storedName(addcowFile: string, given: string, relative = false): string {
  if (isRemoteName(given)) return parseRemoteName(given).name;
  if (path.isAbsolute(given) && !relative) return given;
  return path.relative(path.dirname(path.resolve(addcowFile)), path.resolve(given)) || ".";
}

function statOrNull(file: string): fs.Stats | null {
  try {
    return fs.statSync(file);
  } catch (err) {
    if (errnoCode(err) === "ENOENT") return null;
    throw new AddCowError(`cannot stat ${file}: ${(err as Error).message}`, { file });
  }
}

function clusterBitsOf(size: number): number {
  const bits = Math.log2(size);
  if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
    throw new AddCowError(
      `invalid cluster size ${size}: must be a power of two from 4K to 2M (e.g. -c 64K)`,
    );
  }
  return bits;
}

/**
 * Creates an add-cow disk. Never overwrites an .add-cow file and never shrinks
 * an image file; a missing image file is created sparse. The .add-cow file
 * appears atomically (written aside, synced, then linked into place).
 */
export async function createDisk(opts: CreateOptions): Promise<CreateResult> {
  const file = opts.file;
  const clusterBits =
    opts.clusterSize === undefined ? DEFAULT_CLUSTER_BITS : clusterBitsOf(opts.clusterSize);
  if (opts.backing !== undefined && opts.backingFormat === undefined) {
    throw new AddCowError(
      `backing file ${opts.backing} needs its format: add -F raw, -F qcow2 or -F add-cow (formats are never guessed)`,
    );
  }
  if (opts.backing === undefined && opts.backingFormat !== undefined) {
    throw new AddCowError(`-F ${opts.backingFormat} given without a backing file (-b)`);
  }
  if (
    opts.backingFormat !== undefined &&
    !BACKING_FORMATS.includes(opts.backingFormat as BackingFormat)
  ) {
    throw new AddCowError(
      `unsupported backing format ${JSON.stringify(opts.backingFormat)}: use -F raw, -F qcow2 or -F add-cow`,
    );
  }
  if (opts.size !== undefined && opts.size <= 0) {
    throw new AddCowError(`invalid size ${opts.size}: the disk size must be greater than 0`);
  }
  if (statOrNull(file)) {
    throw new AddCowError(`${file} already exists; remove it first or choose another name`, {
      file,
      code: "EEXIST",
    });
  }
  const dir = path.dirname(path.resolve(file));
  if (!statOrNull(dir)?.isDirectory()) {
    throw new AddCowError(`directory ${dir} for ${file} does not exist`, { file: dir });
  }

  const imageGiven = opts.image ?? defaultImageName(file);
  const imageStat = statOrNull(imageGiven);
  if (imageStat && !imageStat.isFile()) {
    throw new AddCowError(`image file ${imageGiven} exists and is not a regular file`, {
      file: imageGiven,
    });
  }

  if (path.resolve(imageGiven) === path.resolve(file)) {
    throw new AddCowError(
      `image file ${imageGiven} is the .add-cow file itself; choose another image file with -i`,
    );
  }

  let backingSize: number | null = null;
  let pinned: LayerIdentity | null = opts.backingIdentity ?? null;
  const manifest = opts.manifest ?? AUTO_MANIFEST;
  if (opts.backing !== undefined && isRemoteName(opts.backing)) {
    // A URL is never a path: nothing local to compare; opening it checks it answers.
    parseRemoteName(opts.backing);
    const backing = await openBacking(opts.backing, opts.backingFormat as BackingFormat);
    try {
      backingSize = backing.size;
      pinned = await identityToPin(backing, opts.backing, manifest);
    } finally {
      await backing.close();
    }
  } else if (opts.backing !== undefined) {
    const bst = statOrNull(opts.backing);
    if (!bst)
      throw new AddCowError(`backing file ${opts.backing} does not exist`, { file: opts.backing });
    if (imageStat && bst.dev === imageStat.dev && bst.ino === imageStat.ino) {
      throw new AddCowError(
        `image file ${imageGiven} and backing file ${opts.backing} are the same file; choose another image file with -i`,
      );
    }
    if (path.resolve(opts.backing) === path.resolve(file)) {
      throw new AddCowError(`backing file ${opts.backing} is the new .add-cow file itself`);
    }
    if (opts.backingSize !== undefined) {
      // The caller has the backing open (a live snapshot) and vouches for it.
      backingSize = opts.backingSize;
    } else {
      // Opening validates the backing disk (and its whole chain) and gives its size.
      const backing = await openBacking(opts.backing, opts.backingFormat as BackingFormat, {
        confine: opts.confine,
      });
      try {
        backingSize = backing.size;
        pinned = await identityToPin(backing, opts.backing, manifest);
        // Writing the new disk must never modify a file its backing chain reads.
        const same = imageStat ? sharedFile(backing, [imageGiven]) : null;
        if (same) {
          throw new AddCowError(
            `image file ${imageGiven} is ${same.used}, a file of the backing chain of ${opts.backing}; choose another image file with -i`,
          );
        }
      } finally {
        await backing.close();
      }
    }
  }

  let size: number;
  if (imageStat) {
    size = imageStat.size;
    if (opts.size !== undefined && opts.size < imageStat.size) {
      throw new AddCowError(
        `image file ${imageGiven} has ${imageStat.size} bytes, more than the size ${opts.size} asked for; an image file is never shrunk: omit SIZE or give at least ${imageStat.size}`,
      );
    }
    if (opts.size !== undefined) size = opts.size;
  } else if (opts.size !== undefined) {
    size = opts.size;
  } else if (backingSize !== null) {
    size = backingSize;
  } else {
    throw new AddCowError(`no size given and no backing file: give a SIZE such as 8G`);
  }
  if (size === 0) {
    throw new AddCowError(
      `the disk would be empty (0 bytes): give a SIZE, or a non-empty image or backing file`,
    );
  }

  const headerSize = headerSizeFor(clusterBits);
  const backingName =
    opts.backing === undefined ? null : storedName(file, opts.backing, opts.relative?.backing);
  const backingFormat = (opts.backingFormat as BackingFormat | undefined) ?? null;
  if (backingName === null) pinned = null;
  const header = encodeHeader({
    clusterBits,
    headerSize,
    incompatibleFeatures: 0n,
    // The backing's identity, pinned after the bitmap: no other base is ever taken silently.
    compatibleFeatures: pinned ? FEATURE_BACKING_PIN : 0n,
    backingName,
    backingFormat,
    imageName: storedName(file, imageGiven, opts.relative?.image),
    imageFormat: "raw",
  });
  const numClusters = Math.ceil(size / 2 ** clusterBits);
  const bitmapEnd = headerSize + bitmapBytes(numClusters, clusterBits).padded;
  const pinArea = pinned
    ? encodePinArea(pinRecord({ backingName, backingFormat }, pinned), 1n)
    : null;
  const metaSize = bitmapEnd + (pinArea?.length ?? 0);

  // 1. The image file: created sparse, or grown (never shrunk) to the size asked for.
  let imageCreated = false;
  try {
    const imageFd = fs.openSync(imageGiven, imageStat ? "r+" : "wx");
    imageCreated = !imageStat;
    try {
      if (!imageStat || size > imageStat.size) fs.ftruncateSync(imageFd, size);
      fs.fsyncSync(imageFd);
    } finally {
      fs.closeSync(imageFd);
    }
  } catch (err) {
    // Leave nothing behind: a half-made image file would block the next attempt.
    if (imageCreated) fs.rmSync(imageGiven, { force: true });
    else if (imageStat && size > imageStat.size) fs.truncateSync(imageGiven, imageStat.size);
    const code = errnoCode(err);
    const why =
      code === "EFBIG"
        ? `${size} bytes is more than this filesystem allows in one file`
        : (err as Error).message;
    throw new AddCowError(
      `cannot ${imageStat ? "grow" : "create"} image file ${imageGiven}: ${why}`,
      {
        file: imageGiven,
        code,
      },
    );
  }

  // 2. The .add-cow file: written aside, synced, then linked into place without replacing anything.
  // The bitmap is written as zeros, not left a hole, so that setting bits later never needs
  // new blocks (a full file system must not turn acknowledged writes into lost ones).
  const tmp = path.join(dir, `.${path.basename(file)}.${process.pid}.tmp`);
  try {
    const io = openNewFile(tmp);
    try {
      await io.write(header, 0);
      await writeZeros(io, header.length, bitmapEnd);
      if (pinArea) await io.write(pinArea, bitmapEnd);
      await io.sync();
    } finally {
      await io.close();
    }
    fs.linkSync(tmp, file);
  } catch (err) {
    if (imageCreated) fs.rmSync(imageGiven, { force: true });
    if (errnoCode(err) === "EEXIST") {
      throw new AddCowError(`${file} already exists; remove it first or choose another name`);
    }
    if (isNoSpace(err)) {
      throw new AddCowError(
        `cannot create ${file}: it needs ${formatSize(metaSize)} (${metaSize} bytes) for its header and bitmap, more than the file system holding it has free; free some space and try again`,
        { file, code: errnoCode(err), reason: "no-space", cause: err },
      );
    }
    throw err;
  } finally {
    fs.rmSync(tmp, { force: true });
  }
  const dirFd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(dirFd);
  } finally {
    fs.closeSync(dirFd);
  }
  return {
    file,
    imagePath: imageGiven,
    imageCreated,
    size,
    clusterSize: 2 ** clusterBits,
    backingPath: opts.backing ?? null,
    pinned,
  };
}

export function describeCreate(r: CreateResult): string {
  const backing = r.backingPath ? `, backing ${r.backingPath}` : "";
  const made = r.imageCreated ? "created" : "kept existing";
  return `Formatting '${r.file}', size ${formatSize(r.size)} (${r.size} bytes), cluster size ${formatSize(r.clusterSize)}, image file ${r.imagePath} (${made})${backing}`;
}
