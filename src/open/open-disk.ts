import * as fs from "node:fs";
import * as path from "node:path";
import type { BlockDevice } from "../block/block-device";
import { RawDevice } from "../block/raw-device";
import { AddCowError, describeError, errnoCode } from "../util/errors";
import {
  type AddCowHeader,
  type BackingFormat,
  FEATURE_ALL_ALLOCATED,
  FIXED_HEADER_SIZE,
  bitmapBytes,
  decodeFixedHeader,
  decodeHeader,
} from "../addcow/header";
import { type FileIO, type FileOpener, openPosixFile } from "../block/file-io";
import { log } from "../util/log";
import { AddCowDevice, type CacheMode } from "../addcow/addcow-device";
import { lockFile } from "../os/file-lock";
import { isRemoteName } from "../remote/url";
import type { RemoteSettings } from "../remote/options";
import { openRemoteBacking } from "./open-remote";

/** Longest backing chain we follow; deeper chains are refused as hostile. */
export const MAX_CHAIN_DEPTH = 64;

export interface OpenOptions {
  /** Open the image file (and .add-cow file) for writing. The backing chain is always read-only. */
  writable?: boolean;
  cacheMode?: CacheMode;
  bitmapCacheBytes?: number;
  /** How files are opened; tests wrap it to record, delay or fail I/O. */
  opener?: FileOpener;
  /** Take flock locks (default true). */
  lock?: boolean;
  /** add-cow layers already open above this one (openBacking), counted against MAX_CHAIN_DEPTH. */
  layersAbove?: number;
  /**
   * Open the first backing layer for writing too, with exclusive locks (commit
   * writes into it). Deeper layers stay read-only.
   */
  writableBacking?: boolean;
  /**
   * Use this already open device as the disk's backing instead of opening the
   * named backing file (a live snapshot stacks a new overlay on the open disk).
   * The new device owns it: closing the new device closes it.
   */
  backingDevice?: BlockDevice;
  /** Remote backings: block size, timeouts, cache (default: from the environment). */
  remote?: RemoteSettings;
  /** Reads from the backing chain also fill the image file (add-cow copy-on-read). */
  copyOnRead?: boolean;
}

/** Identity of a file across paths, symlinks and hard links. */
type FileId = string;

interface ChainState {
  /** Every file opened so far, with the role it was opened in. */
  seen: Map<FileId, { role: string; file: string }>;
  depth: number;
  opts: OpenOptions;
  cleanup: Array<() => Promise<void>>;
}

/** Opens an add-cow disk and its backing chain. */
export async function openDisk(file: string, opts: OpenOptions = {}): Promise<AddCowDevice> {
  const state: ChainState = { seen: new Map(), depth: 0, opts, cleanup: [] };
  try {
    return await openAddCow(file, opts.writable ?? false, state);
  } catch (err) {
    // Close whatever was opened before the failure, innermost last.
    for (const undo of state.cleanup.reverse()) await undo().catch(() => undefined);
    throw err;
  }
}

/** Opens a disk of a known format read-only (raw file or add-cow chain), for backing use. */
export async function openBacking(
  file: string,
  format: BackingFormat,
  opts: OpenOptions = {},
): Promise<BlockDevice> {
  const state: ChainState = { seen: new Map(), depth: opts.layersAbove ?? 0, opts, cleanup: [] };
  try {
    return await openLayer(file, format, state, "backing file");
  } catch (err) {
    for (const undo of state.cleanup.reverse()) await undo().catch(() => undefined);
    throw err;
  }
}

function fileId(st: fs.Stats): FileId {
  return `${st.dev}:${st.ino}`;
}

/** What kind of non-regular file a path names, for messages. */
function fileKind(st: fs.Stats): string {
  if (st.isDirectory()) return "a directory";
  if (st.isFIFO()) return "a FIFO";
  if (st.isSocket()) return "a socket";
  if (st.isCharacterDevice()) return "a character device";
  if (st.isBlockDevice()) return "a block device";
  return "not a regular file";
}

/** Why a stat or open failed, in words, from its errno code. */
function reason(err: unknown, file: string): string {
  const code = errnoCode(err);
  switch (code) {
    case "ENOENT": {
      try {
        if (fs.lstatSync(file).isSymbolicLink()) {
          return `is a symbolic link to ${JSON.stringify(fs.readlinkSync(file))}, which does not exist`;
        }
      } catch {
        // Not even the link is there: plainly missing.
      }
      return "does not exist";
    }
    case "EACCES":
    case "EPERM":
      return "cannot be accessed: permission denied";
    case "ELOOP":
      return "cannot be opened: too many levels of symbolic links";
    case "ENOTDIR":
      return "cannot be opened: a component of the path is not a directory";
    case "ENAMETOOLONG":
      return "cannot be opened: the name is too long";
    case "EISDIR":
      return "is a directory";
    case "EROFS":
      return "is on a read-only file system";
    default:
      return `cannot be opened: ${describeError(err)}`;
  }
}

/** What to do about a file of the disk that cannot be used. */
function fixAdvice(role: string, file: string, namedIn?: string): string {
  if (!namedIn) return "check the path";
  return `restore ${role === "image file" ? "the image file" : "the backing file"} at ${file}, or fix the name stored in ${namedIn}`;
}

async function statExisting(file: string, role: string, namedIn?: string): Promise<fs.Stats> {
  const where = namedIn ? ` (named in ${namedIn})` : "";
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(file);
  } catch (err) {
    const code = errnoCode(err);
    throw new AddCowError(
      `${role} ${file}${where} ${reason(err, file)}; ${fixAdvice(role, file, namedIn)}`,
      { file, code: code ?? "EIO" },
    );
  }
  if (!st.isFile()) {
    throw new AddCowError(
      `${role} ${file}${where} is ${fileKind(st)}, not a regular file; ${fixAdvice(role, file, namedIn)}`,
      { file, code: "EINVAL" },
    );
  }
  return st;
}

async function openFile(
  file: string,
  mode: "read" | "write",
  role: string,
  state: ChainState,
  namedIn?: string,
): Promise<FileIO> {
  const opener = state.opts.opener ?? openPosixFile;
  let io: FileIO;
  try {
    io = await opener(file, mode);
  } catch (err) {
    const code = errnoCode(err);
    const advice =
      mode === "write" && (code === "EACCES" || code === "EPERM" || code === "EROFS")
        ? "open the disk read-only, or make the file writable"
        : "check the file and its permissions";
    throw new AddCowError(
      `${role} ${file}${namedIn ? ` (named in ${namedIn})` : ""} cannot be opened for ${mode === "write" ? "writing" : "reading"}: ${reason(err, file).replace(/^cannot be (accessed|opened): /, "")}; ${advice}`,
      { file, code: code ?? "EIO", reason: "cannot-open", mode },
    );
  }
  state.cleanup.push(() => io.close());
  if (state.opts.lock !== false) {
    try {
      lockFile(io, mode === "write" ? "exclusive" : "shared", role);
    } catch (err) {
      if (err instanceof AddCowError) throw err;
      throw new AddCowError(`${role} ${file} cannot be locked: ${describeError(err)}`, {
        file,
        code: errnoCode(err) ?? "EIO",
      });
    }
  }
  return io;
}

function remember(
  state: ChainState,
  st: fs.Stats,
  file: string,
  role: string,
  namedIn?: string,
): void {
  const id = fileId(st);
  const earlier = state.seen.get(id);
  if (earlier !== undefined) {
    const where = namedIn ? ` (named in ${namedIn})` : "";
    const fix = namedIn ? `; fix the name stored in ${namedIn}` : "";
    const loops = role === "backing file" && earlier.role !== "image file";
    const before = `${earlier.role} ${earlier.file}`;
    const what = loops
      ? `the backing chain loops: ${role} ${file}${where} is ${before}, opened earlier in the chain`
      : `${role} ${file}${where} is the same file as ${before} (through another path, a symbolic link or a hard link)`;
    throw new AddCowError(
      `${what}; every file of a disk and its backing chain must be distinct${fix}`,
      { file, code: "ELOOP", reason: "chain" },
    );
  }
  state.seen.set(id, { role, file });
}

async function openLayer(
  file: string,
  format: BackingFormat,
  state: ChainState,
  role: string,
  namedIn?: string,
  writable = false,
): Promise<BlockDevice> {
  if (isRemoteName(file)) {
    const dev = await openRemoteBacking(file, format, writable, namedIn, state.opts.remote);
    state.cleanup.push(() => dev.close());
    return dev;
  }
  if (format === "add-cow") return openAddCow(file, writable, state, namedIn);
  const st = await statExisting(file, role, namedIn);
  remember(state, st, file, role, namedIn);
  return RawDevice.open(await openFile(file, writable ? "write" : "read", role, state, namedIn));
}

/** Reads and validates the header of an open .add-cow file. */
export async function readHeader(meta: FileIO, file: string): Promise<AddCowHeader> {
  const fileSize = await meta.size();
  const fixed = Buffer.alloc(FIXED_HEADER_SIZE);
  const n = await meta.read(fixed, 0);
  const f = decodeFixedHeader(fixed.subarray(0, n), file, fileSize);
  const full = Buffer.alloc(f.headerSize);
  await meta.read(full, 0);
  return decodeHeader(full, file, fileSize);
}

/** Resolves a name stored in an .add-cow file: relative names are relative to its directory. */
export function resolveStoredName(addcowFile: string, stored: string): string {
  return path.resolve(path.dirname(path.resolve(addcowFile)), stored);
}

/** A stored backing name: an absolute URL stays a URL, anything else is a path. */
export function resolveBackingName(addcowFile: string, stored: string): string {
  return isRemoteName(stored) ? stored : resolveStoredName(addcowFile, stored);
}

async function openAddCow(
  file: string,
  writable: boolean,
  state: ChainState,
  namedIn?: string,
): Promise<AddCowDevice> {
  state.depth++;
  if (state.depth > MAX_CHAIN_DEPTH) {
    throw new AddCowError(
      `${file}${namedIn ? ` (named in ${namedIn})` : ""}: the backing chain is deeper than MAX_CHAIN_DEPTH = ${MAX_CHAIN_DEPTH} layers; shorten the chain (stream or commit layers) or check that it does not loop`,
      { file, code: "ELOOP" },
    );
  }
  const role = namedIn ? "backing file" : "add-cow file";
  const isTop = state.depth === 1 && namedIn === undefined;
  const st = await statExisting(file, role, namedIn);
  remember(state, st, file, role, namedIn);
  const mode = writable ? "write" : "read";
  const meta = await openFile(file, mode, role, state, namedIn);
  const header = await readHeader(meta, file);
  log.open(
    "%s: cluster_bits %d, image %s, backing %s",
    file,
    header.clusterBits,
    header.imageName,
    header.backingName,
  );

  const imagePath = resolveStoredName(file, header.imageName);
  const imageStat = await statExisting(imagePath, "image file", file);
  remember(state, imageStat, imagePath, "image file", file);
  const image = await openFile(imagePath, mode, "image file", state, file);
  const imageSize = await image.size();

  const allAllocated = (header.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n;
  if (!allAllocated) checkBitmapLength(file, header, await meta.size(), imagePath, imageSize);

  let backing: BlockDevice | null = null;
  let backingPath: string | null = null;
  if (header.backingName !== null) {
    backingPath = resolveBackingName(file, header.backingName);
    const top = state.depth === 1;
    if (top && state.opts.backingDevice) {
      backing = state.opts.backingDevice;
    } else if (!allAllocated) {
      // With every cluster allocated the backing file is never read: it may be gone.
      const writableBacking = top && writable && state.opts.writableBacking === true;
      backing = await openLayer(
        backingPath,
        header.backingFormat!,
        state,
        "backing file",
        file,
        writableBacking,
      );
    }
  }
  return new AddCowDevice({
    path: file,
    header,
    meta,
    image,
    imageSize,
    backing,
    imagePath,
    backingPath,
    cacheMode: state.opts.cacheMode,
    bitmapCacheBytes: state.opts.bitmapCacheBytes,
    copyOnRead: isTop && writable && state.opts.copyOnRead === true,
  });
}

/**
 * The bitmap must cover every cluster of the disk (the image file's length). A
 * longer bitmap is accepted: the disk is as long as the image file, and bits
 * past its last cluster are ignored like padding (`addcow check` reports an
 * image file shorter than its bitmap, and set bits past the end).
 */
function checkBitmapLength(
  file: string,
  header: AddCowHeader,
  metaSize: number,
  imagePath: string,
  imageSize: number,
): void {
  const numClusters = Math.ceil(imageSize / 2 ** header.clusterBits);
  const { needed } = bitmapBytes(numClusters, header.clusterBits);
  const have = metaSize - header.headerSize;
  if (have < needed) {
    throw new AddCowError(
      `${file}: bitmap is ${have} bytes, shorter than the ${needed} bytes the disk needs for image file ${imagePath} (${imageSize} bytes, ${numClusters} clusters); the .add-cow file is truncated or the image file was grown: restore the original files`,
      { file, code: "EINVAL" },
    );
  }
}
