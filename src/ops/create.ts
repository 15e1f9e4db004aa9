import { type BackingFormat, BACKING_FORMATS, type Namer } from "../block/chain-opener";
import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError, describeError, errnoCode, isNoSpace } from "../util/errors";
import {
  DEFAULT_CLUSTER_BITS,
  MAX_CLUSTER_BITS,
  MIN_CLUSTER_BITS,
  bitmapBytes,
  encodeHeader,
  headerSizeFor,
} from "../addcow/header";
import { formatSize } from "../util/size";
import { openBacking, openNamedFile } from "../chain/open-chain";
import { sharedFile } from "../chain/loops";
import { isRemoteName, parseRemoteName } from "../remote/url";
import type { Confinement } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";
import { writeZeros } from "../addcow/bitmap-space";
import { FEATURE_BACKING_PIN } from "../addcow/header";
import { encodePinArea, pinRecord } from "../addcow/pin";
import type { LayerIdentity } from "../block/layer-identity";
import { AUTO_MANIFEST, type ManifestChoice, identityToPin } from "./backing-identity";
import { type FileIO, PosixFile } from "../block/file-io";
import { asideName } from "../block/replace-file";
import { OpenDirectoryError, type PathFd, type WalkedParent, walkParent } from "../os/path-walk";
import { type FileOwner, createIn, linkIn, ownerOfDir, syncDir, unlinkIn } from "../os/dir-ops";

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
  /** The operator's URL rules (chain/url-policy.ts), for a URL backing of another user's disk. */
  urls?: UrlRules;
  /** Store these names relative to FILE's directory even though they are given absolute. */
  relative?: { backing: boolean; image: boolean };
  /** The image file must be new too (a snapshot never reuses a file). */
  freshImage?: boolean;
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
  /** The files made, to take away again (a live snapshot that cannot switch). */
  made: MadeFile[];
}

/** A file createDisk made: its directory and name, and the inode it got. */
export interface MadeFile {
  dir: string;
  dirId: string;
  base: string;
  id: string;
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
export function storedName(
  addcowFile: string,
  given: string,
  relative = false,
  fromDir = path.dirname(path.resolve(addcowFile)),
): string {
  if (isRemoteName(given)) return parseRemoteName(given).name;
  if (path.isAbsolute(given) && !relative) return given;
  return path.relative(fromDir, path.resolve(given)) || ".";
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

/** The directory a new file goes in, walked (os/path-walk.ts); one line when it cannot be used. */
function placeFor(file: string, what: string): WalkedParent {
  try {
    return walkParent(path.resolve(file));
  } catch (err) {
    if (err instanceof OpenDirectoryError) {
      throw new AddCowError(`cannot create ${what} ${file}: ${err.message}`, {
        file,
        code: err.code,
        reason: "forbidden",
      });
    }
    const dir = path.dirname(path.resolve(file));
    const code = errnoCode(err);
    const why = code === "ENOENT" || code === "ENOTDIR" ? "does not exist" : describeError(err);
    throw new AddCowError(`directory ${dir} for ${file} ${why}`, { file: dir, code });
  }
}

function entryOf(dir: PathFd, base: string): fs.BigIntStats | null {
  try {
    return fs.lstatSync(`${dir.proc}/${base}`, { bigint: true });
  } catch (err) {
    if (errnoCode(err) === "ENOENT") return null;
    throw err;
  }
}

function idOf(st: { dev: bigint | number; ino: bigint | number }): string {
  return `${st.dev}:${st.ino}`;
}

function alreadyExists(file: string): AddCowError {
  return new AddCowError(`${file} already exists; remove it first or choose another name`, {
    file,
    code: "EEXIST",
  });
}

/**
 * Creates an add-cow disk. Never overwrites an .add-cow file and never shrinks
 * an image file; a missing image file is created sparse. The .add-cow file
 * appears atomically (written aside, synced, then linked into place).
 *
 * Everything happens in the directory FILE's name leads to, through its
 * descriptor: new files are created there with O_EXCL|O_NOFOLLOW (a link
 * planted under the name is never followed) and belong to that directory's
 * owner (root making a disk in a tenant's directory makes the tenant's
 * disk: docs/security.md). The disk is then that owner's, so an existing
 * image file and the backing chain are judged for them, and for whoever
 * controls the way to the directory, exactly as opening the disk later will.
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
  const imageGiven = opts.image ?? defaultImageName(file);
  if (path.resolve(imageGiven) === path.resolve(file)) {
    throw new AddCowError(
      `image file ${imageGiven} is the .add-cow file itself; choose another image file with -i`,
    );
  }
  const held: Array<{ close(): void }> = [];
  try {
    const place = placeFor(file, "disk");
    held.push(place);
    if (entryOf(place.dir, place.base)) throw alreadyExists(file);
    const owner = ownerOfDir(place.dir);
    const realDir = place.dir.realPath();
    // The new disk's words are its owner's, as when it is opened later.
    const namer: Namer = {
      file: path.resolve(file),
      uid: owner.uid,
      gid: owner.gid,
      via: place.controllers,
      dir: realDir,
    };
    const imagePlace = placeFor(imageGiven, "image file");
    held.push(imagePlace);
    let image: FileIO | null = null;
    if (entryOf(imagePlace.dir, imagePlace.base)) {
      if (opts.freshImage) throw alreadyExists(imageGiven);
      image = await openNamedFile(
        { file: path.resolve(imageGiven), role: "image file", access: "write", namer },
        opts.confine,
      );
      held.push({ close: () => void image!.close() });
    }
    return await writeNewDisk(opts, {
      file,
      clusterBits,
      imageGiven,
      place,
      imagePlace,
      realDir,
      owner,
      namer,
      image,
    });
  } finally {
    for (const h of held.reverse()) h.close();
  }
}

interface Making {
  file: string;
  clusterBits: number;
  imageGiven: string;
  place: WalkedParent;
  imagePlace: WalkedParent;
  realDir: string;
  owner: FileOwner;
  namer: Namer;
  /** The existing image file, judged and open for writing; null when it is to be made. */
  image: FileIO | null;
}

async function writeNewDisk(opts: CreateOptions, m: Making): Promise<CreateResult> {
  const { file, imageGiven, clusterBits } = m;
  const imageStat = m.image ? m.image.stat() : null;
  let backingSize: number | null = null;
  let pinned: LayerIdentity | null = opts.backingIdentity ?? null;
  const manifest = opts.manifest ?? AUTO_MANIFEST;
  if (opts.backing !== undefined && isRemoteName(opts.backing)) {
    // A URL is never a path: nothing local to compare; opening it checks it answers.
    parseRemoteName(opts.backing);
    const backing = await openBacking(opts.backing, opts.backingFormat as BackingFormat, {
      namedBy: m.namer,
      confine: opts.confine,
      ...(opts.urls ? { urls: opts.urls } : {}),
    });
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
    if (imageStat && idOf(bst) === idOf(imageStat)) {
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
      // Opening validates the backing disk (and its whole chain, judged as the new
      // disk's header will name it) and gives its size.
      const backing = await openBacking(opts.backing, opts.backingFormat as BackingFormat, {
        confine: opts.confine,
        namedBy: m.namer,
      });
      try {
        backingSize = backing.size;
        pinned = await identityToPin(backing, opts.backing, manifest);
        // Writing the new disk must never modify a file its backing chain reads.
        const same = m.image ? sharedFile(backing, [m.image.path]) : null;
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
  const imageSize = imageStat ? Number(imageStat.size) : null;
  if (imageSize !== null) {
    size = imageSize;
    if (opts.size !== undefined && opts.size < imageSize) {
      throw new AddCowError(
        `image file ${imageGiven} has ${imageSize} bytes, more than the size ${opts.size} asked for; an image file is never shrunk: omit SIZE or give at least ${imageSize}`,
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
    opts.backing === undefined
      ? null
      : storedName(file, opts.backing, opts.relative?.backing, m.realDir);
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
    imageName: storedName(file, imageGiven, opts.relative?.image, m.realDir),
    imageFormat: "raw",
  });
  const numClusters = Math.ceil(size / 2 ** clusterBits);
  const bitmapEnd = headerSize + bitmapBytes(numClusters, clusterBits).padded;
  const pinArea = pinned
    ? encodePinArea(pinRecord({ backingName, backingFormat }, pinned), 1n)
    : null;
  const metaSize = bitmapEnd + (pinArea?.length ?? 0);
  const made: MadeFile[] = [];

  // 1. The image file: created sparse (the disk owner's), or grown (never shrunk) to the size asked for.
  let image = m.image;
  const imageCreated = image === null;
  try {
    if (!image) {
      const fd = createIn(m.imagePlace.dir, m.imagePlace.base, m.owner);
      image = new PosixFile(imageGiven, fd, true);
      made.push(madeFile(m.imagePlace, image.stat()));
    }
    if (imageSize === null || size > imageSize) await image.truncate(size);
    await image.sync();
  } catch (err) {
    // Leave nothing behind: a half-made image file would block the next attempt.
    removeMade(made);
    if (!imageCreated && imageSize !== null && size > imageSize) {
      await image!.truncate(imageSize).catch(() => undefined);
    }
    const code = errnoCode(err);
    const why =
      code === "EFBIG"
        ? `${size} bytes is more than this filesystem allows in one file`
        : code === "EEXIST"
          ? "it appeared meanwhile"
          : (err as Error).message;
    throw new AddCowError(
      `cannot ${imageCreated ? "create" : "grow"} image file ${imageGiven}: ${why}`,
      { file: imageGiven, code },
    );
  } finally {
    if (imageCreated && image) await image.close().catch(() => undefined);
  }

  // 2. The .add-cow file: written aside, synced, then linked into place without replacing anything.
  // The bitmap is written as zeros, not left a hole, so that setting bits later never needs
  // new blocks (a full file system must not turn acknowledged writes into lost ones).
  const tmpBase = path.basename(asideName(path.resolve(file)));
  try {
    const fd = createIn(m.place.dir, tmpBase, m.owner);
    const io = new PosixFile(path.join(path.dirname(file), tmpBase), fd, true);
    try {
      await io.write(header, 0);
      await writeZeros(io, header.length, bitmapEnd);
      if (pinArea) await io.write(pinArea, bitmapEnd);
      await io.sync();
    } finally {
      await io.close();
    }
    linkIn(m.place.dir, tmpBase, m.place.base);
    made.push(madeFile(m.place, entryOf(m.place.dir, m.place.base)!));
  } catch (err) {
    removeMade(made);
    if (errnoCode(err) === "EEXIST") throw alreadyExists(file);
    if (isNoSpace(err)) {
      throw new AddCowError(
        `cannot create ${file}: it needs ${formatSize(metaSize)} (${metaSize} bytes) for its header and bitmap, more than the file system holding it has free; free some space and try again`,
        { file, code: errnoCode(err), reason: "no-space", cause: err },
      );
    }
    throw err;
  } finally {
    unlinkIn(m.place.dir, tmpBase);
  }
  syncDir(m.place.dir);
  return {
    file,
    imagePath: imageGiven,
    imageCreated,
    size,
    clusterSize: 2 ** clusterBits,
    backingPath: opts.backing ?? null,
    pinned,
    made,
  };
}

function madeFile(place: WalkedParent, st: fs.BigIntStats): MadeFile {
  return { dir: place.dir.realPath(), dirId: idOf(place.dir.st), base: place.base, id: idOf(st) };
}

/**
 * Takes away files createDisk made, through their directory (walked again and
 * checked to be the same directory), and only while the name is still the
 * file made: nothing else is ever removed.
 */
export function removeMade(made: MadeFile[]): void {
  for (const f of made) {
    let place: WalkedParent | null = null;
    try {
      place = walkParent(path.join(f.dir, f.base));
      if (idOf(place.dir.st) !== f.dirId) continue;
      const st = entryOf(place.dir, f.base);
      if (st && idOf(st) === f.id) unlinkIn(place.dir, f.base);
    } catch {
      // Gone already, or its directory moved: leave it.
    } finally {
      place?.close();
    }
  }
}

export function describeCreate(r: CreateResult): string {
  const backing = r.backingPath ? `, backing ${r.backingPath}` : "";
  const made = r.imageCreated ? "created" : "kept existing";
  return `Formatting '${r.file}', size ${formatSize(r.size)} (${r.size} bytes), cluster size ${formatSize(r.clusterSize)}, image file ${r.imagePath} (${made})${backing}`;
}
