import * as fs from "node:fs";
import * as path from "node:path";
import type { BlockDevice } from "../block/block-device";
import { RawDevice } from "../block/raw-device";
import { AddCowError, errnoCode } from "../errors";
import {
  type AddCowHeader,
  type BackingFormat,
  FEATURE_ALL_ALLOCATED,
  FIXED_HEADER_SIZE,
  bitmapBytes,
  decodeFixedHeader,
  decodeHeader,
} from "../format/header";
import { type FileIO, type FileOpener, openPosixFile } from "../io/file-io";
import { log } from "../log";
import { AddCowDevice, type CacheMode } from "./addcow-device";
import { lockFile } from "./file-lock";

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
}

/** Identity of a file across paths, symlinks and hard links. */
type FileId = string;

interface ChainState {
  seen: Map<FileId, string>;
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
  const state: ChainState = { seen: new Map(), depth: 0, opts, cleanup: [] };
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

async function statExisting(file: string, role: string, namedIn?: string): Promise<fs.Stats> {
  const where = namedIn ? ` (named in ${namedIn})` : "";
  let st: fs.Stats;
  try {
    st = await fs.promises.stat(file);
  } catch (err) {
    const code = errnoCode(err);
    if (code === "ENOENT") {
      throw new AddCowError(`${role} ${file}${where} does not exist`, { file, code: "ENOENT" });
    }
    if (code === "EACCES") {
      throw new AddCowError(`${role} ${file}${where}: permission denied`, { file, code });
    }
    throw new AddCowError(`${role} ${file}${where}: ${(err as Error).message}`, { file, code });
  }
  if (!st.isFile()) {
    throw new AddCowError(`${role} ${file}${where} is not a regular file`, {
      file,
      code: "EINVAL",
    });
  }
  return st;
}

async function openFile(
  file: string,
  mode: "read" | "write",
  role: string,
  state: ChainState,
): Promise<FileIO> {
  const opener = state.opts.opener ?? openPosixFile;
  let io: FileIO;
  try {
    io = await opener(file, mode);
  } catch (err) {
    const code = errnoCode(err);
    const why = code === "EACCES" ? "permission denied" : (err as Error).message;
    throw new AddCowError(
      `cannot open ${role} ${file} for ${mode === "write" ? "writing" : "reading"}: ${why}`,
      { file, code },
    );
  }
  state.cleanup.push(() => io.close());
  if (state.opts.lock !== false) lockFile(io, mode === "write" ? "exclusive" : "shared", role);
  return io;
}

function remember(state: ChainState, st: fs.Stats, file: string, role: string): void {
  const id = fileId(st);
  const earlier = state.seen.get(id);
  if (earlier !== undefined) {
    throw new AddCowError(
      `${role} ${file} is the same file as ${earlier}: every file of a disk and its backing chain must be distinct (does the chain loop back on itself?)`,
      { file, code: "ELOOP" },
    );
  }
  state.seen.set(id, `${role} ${file}`);
}

async function openLayer(
  file: string,
  format: BackingFormat,
  state: ChainState,
  role: string,
  namedIn?: string,
  writable = false,
): Promise<BlockDevice> {
  if (format === "add-cow") return openAddCow(file, writable, state, namedIn);
  const st = await statExisting(file, role, namedIn);
  remember(state, st, file, role);
  return RawDevice.open(await openFile(file, writable ? "write" : "read", role, state));
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

async function openAddCow(
  file: string,
  writable: boolean,
  state: ChainState,
  namedIn?: string,
): Promise<AddCowDevice> {
  state.depth++;
  if (state.depth > MAX_CHAIN_DEPTH) {
    throw new AddCowError(
      `${file}: backing chain is deeper than ${MAX_CHAIN_DEPTH} layers (limit MAX_CHAIN_DEPTH); stream or commit it first`,
      { file, code: "ELOOP" },
    );
  }
  const role = namedIn ? "backing file" : "add-cow file";
  const st = await statExisting(file, role, namedIn);
  remember(state, st, file, role);
  const mode = writable ? "write" : "read";
  const meta = await openFile(file, mode, "add-cow file", state);
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
  remember(state, imageStat, imagePath, "image file");
  const image = await openFile(imagePath, mode, "image file", state);
  const imageSize = await image.size();

  const numClusters = Math.ceil(imageSize / 2 ** header.clusterBits);
  const allAllocated = (header.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n;
  if (!allAllocated) {
    const need = header.headerSize + bitmapBytes(numClusters, header.clusterBits).needed;
    const metaSize = await meta.size();
    if (metaSize < need) {
      throw new AddCowError(
        `${file}: bitmap is shorter than the disk needs: the file has ${metaSize} bytes, ${need} are needed for ${numClusters} clusters of image file ${imagePath} (${imageSize} bytes)`,
        { file, code: "EINVAL" },
      );
    }
  }

  let backing: BlockDevice | null = null;
  let backingPath: string | null = null;
  if (header.backingName !== null) {
    backingPath = resolveStoredName(file, header.backingName);
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
  });
}
