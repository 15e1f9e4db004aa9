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
import { type LockKind, lockFile } from "../os/file-lock";
import { reserveBitmap } from "../addcow/bitmap-space";
import {
  AccessPolicy,
  type Confinement,
  type Judged,
  type NamedFile,
  type Namer,
  isUrlName,
} from "./access-policy";
import type { RemoteSettings } from "../remote/options";
import { openRemoteBacking } from "./open-remote";
import { type ChainOpener, openQcow2 } from "./open-qcow2";

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
  /**
   * Open the disk without its backing file (`addcow rebase -u`, which only
   * rewrites the header: the named backing may be gone). Unallocated clusters
   * then read as zeros; nothing may rely on their content.
   */
  withoutBacking?: boolean;
  /**
   * Confinement for the names in headers (docs/security.md): they must resolve
   * inside the disk's directory or an allowed one. The owner rule always applies.
   */
  confine?: Confinement | null;
  /**
   * openBacking only: the .add-cow file whose header names the file opened,
   * and its owner (`addcow check` opens a disk's backing chain this way).
   */
  namedBy?: Namer;
  /** Remote backings: block size, timeouts, cache (default: from the environment). */
  remote?: RemoteSettings;
  /** Reads from the backing chain also fill the top disk's image file (copy-on-read). */
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
  /** Judges every file a header names before and after it is opened. */
  policy: AccessPolicy;
}

/** Runs one open of a chain; on failure closes whatever it opened, innermost last. */
async function openChain<T>(
  diskFile: string,
  opts: OpenOptions,
  depth: number,
  open: (state: ChainState) => Promise<T>,
): Promise<T> {
  const policy = AccessPolicy.create(diskFile, opts.confine);
  const state: ChainState = { seen: new Map(), depth, opts, cleanup: [], policy };
  try {
    return await open(state);
  } catch (err) {
    for (const undo of state.cleanup.reverse()) await undo().catch(() => undefined);
    throw err;
  } finally {
    policy.close();
  }
}

/** Opens an add-cow disk and its backing chain. */
export function openDisk(file: string, opts: OpenOptions = {}): Promise<AddCowDevice> {
  return openChain(file, opts, 0, (state) => openAddCow(file, opts.writable ?? false, state));
}

/** Opens a disk of a known format read-only (raw file or add-cow chain), for backing use. */
export function openBacking(
  file: string,
  format: BackingFormat,
  opts: OpenOptions = {},
): Promise<BlockDevice> {
  const namer = opts.namedBy;
  return openChain(namer?.file ?? file, opts, opts.layersAbove ?? 0, (state) => {
    if (namer) state.policy.setDiskOwner(namer);
    return openLayer(file, format, state, "backing file", namer);
  });
}

function fileId(st: fs.BigIntStats): FileId {
  return `${st.dev}:${st.ino}`;
}

/** What kind of non-regular file a path names, for messages. */
function fileKind(st: fs.BigIntStats): string {
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
    case "EFTYPE":
      return "cannot be opened: it is not a regular file (it changed while being opened)";
    default:
      return `cannot be opened: ${describeError(err)}`;
  }
}

/** What to do about a file of the disk that cannot be used. */
function fixAdvice(role: string, file: string, namedIn?: string): string {
  if (!namedIn) return "check the path";
  if (role === "image file") {
    return `restore the image file at ${file}, or fix the name stored in ${namedIn}`;
  }
  return `restore the backing file at ${file}, or point ${namedIn} at where it is now (addcow rebase -u -b NEW -F FORMAT ${namedIn})`;
}

async function statExisting(file: string, role: string, namedIn?: string): Promise<Judged> {
  const where = namedIn ? ` (named in ${namedIn})` : "";
  let st: Judged;
  try {
    st = await fs.promises.stat(file, { bigint: true });
  } catch (err) {
    const code = errnoCode(err);
    throw new AddCowError(
      `${role} ${file}${where} ${reason(err, file)}; ${fixAdvice(role, file, namedIn)}`,
      { file, code: code ?? "EIO", reason: "cannot-open" },
    );
  }
  if (!st.isFile()) {
    // Only regular files: a FIFO would block, a device or a directory is not a disk's file.
    throw new AddCowError(
      `${role} ${file}${where} is ${fileKind(st)}, not a regular file; ${fixAdvice(role, file, namedIn)}`,
      { file, code: "EINVAL", reason: namedIn ? "forbidden" : "cannot-open" },
    );
  }
  return st;
}

/**
 * Opens a file; `check` judges the descriptor before the file is locked (a
 * file that fails it is closed again without ever being locked). The lock is
 * shared for reading, exclusive for writing, unless `lock` says otherwise.
 */
async function openFile(
  file: string,
  mode: "read" | "write",
  role: string,
  state: ChainState,
  namedIn?: string,
  opts: { lock?: LockKind | false; check?: (io: FileIO) => Promise<void> } = {},
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
  if (opts.check) await opts.check(io);
  if (opts.lock !== false) lock(io, opts.lock ?? lockFor(mode), role, state);
  return io;
}

function lock(io: FileIO, kind: LockKind, role: string, state: ChainState): void {
  if (state.opts.lock === false) return;
  try {
    lockFile(io, kind, role);
  } catch (err) {
    if (err instanceof AddCowError) throw err;
    throw new AddCowError(`${role} ${io.path} cannot be locked: ${describeError(err)}`, {
      file: io.path,
      code: errnoCode(err) ?? "EIO",
    });
  }
}

/**
 * An .add-cow file is read first and opened for writing last (nothing is opened
 * for writing before the whole chain has passed). The read-only descriptor
 * holds the exclusive lock meanwhile, so a disk in use says so at once; the
 * lock moves to the writing descriptor once that is the same file.
 */
async function reopenForWriting(
  readOnly: FileIO,
  role: string,
  state: ChainState,
  openUnlocked: () => Promise<FileIO>,
): Promise<FileIO> {
  const io = await openUnlocked();
  await readOnly.close();
  lock(io, "exclusive", role, state);
  return io;
}

function remember(
  state: ChainState,
  st: Judged,
  file: string,
  role: string,
  namedIn?: string,
): void {
  const id = fileId(st);
  const earlier = state.seen.get(id);
  if (earlier !== undefined) {
    const where = namedIn ? ` (named in ${namedIn})` : "";
    const fix = namedIn ? `; fix the name stored in ${namedIn}` : "";
    const loops =
      role === "backing file" && earlier.role !== "image file" && earlier.role !== "data file";
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

/** Everything decided about a named file before it is opened: it exists, is new to the chain, is allowed. */
async function judgeNamed(n: NamedFile, state: ChainState): Promise<Judged> {
  const st = await statExisting(n.file, n.role, n.namer.file);
  remember(state, st, n.file, n.role, n.namer.file);
  await state.policy.judge(n, st);
  return st;
}

/** Opens a judged file; its descriptor must be the file judged. */
function openJudged(
  n: NamedFile,
  judged: Judged,
  state: ChainState,
  lockAs?: LockKind | false,
): Promise<FileIO> {
  return openFile(n.file, n.access, n.role, state, n.namer.file, {
    lock: lockAs,
    check: (io) => state.policy.verify(n, judged, io),
  });
}

/** Opens a file the user named (not a header): exists, new to the chain. */
async function openGiven(
  file: string,
  mode: "read" | "write",
  role: string,
  state: ChainState,
  lockAs?: LockKind,
): Promise<{ io: FileIO; st: Judged }> {
  const st = await statExisting(file, role);
  remember(state, st, file, role);
  const io = await openFile(file, mode, role, state, undefined, { lock: lockAs });
  // The descriptor's own identity: the owner of what was opened, not of what a path names now.
  return { io, st: io.fd === undefined ? st : fs.fstatSync(io.fd, { bigint: true }) };
}

/** Opens a file the user named again, for writing (unlocked): it must still be the file read. */
function reopenGiven(file: string, st: Judged, role: string, state: ChainState): Promise<FileIO> {
  return openFile(file, "write", role, state, undefined, {
    lock: false,
    check: async (io) => {
      if (io.fd === undefined) return;
      const now = fs.fstatSync(io.fd, { bigint: true });
      if (now.dev !== st.dev || now.ino !== st.ino) {
        throw new AddCowError(`${role} ${file} was replaced while it was being opened; try again`, {
          file,
          code: "EBUSY",
          reason: "cannot-open",
        });
      }
    },
  });
}

async function openLayer(
  file: string,
  format: BackingFormat,
  state: ChainState,
  role: string,
  namer?: Namer,
  writable = false,
): Promise<BlockDevice> {
  if (isUrlName(file)) {
    const dev = await openRemoteBacking(file, format, writable, namer?.file, state.opts.remote);
    state.cleanup.push(() => dev.close());
    return dev;
  }
  if (format === "add-cow") return openAddCow(file, writable, state, namer);
  if (format === "qcow2") {
    if (writable) {
      throw new AddCowError(
        `backing file ${file} is a qcow2 image, which addcow opens read-only: it cannot be written (commit into it is not supported)`,
        { file, code: "EROFS", reason: "invalid" },
      );
    }
    return openQcow2(file, chainOpener(state), namer);
  }
  const mode = writable ? "write" : "read";
  if (!namer) return RawDevice.open((await openGiven(file, mode, role, state)).io);
  const n: NamedFile = { file, role, access: mode, namer };
  return RawDevice.open(await openJudged(n, await judgeNamed(n, state), state));
}

function lockFor(mode: "read" | "write"): LockKind {
  return mode === "write" ? "exclusive" : "shared";
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
  return isUrlName(stored) ? stored : resolveStoredName(addcowFile, stored);
}

/** Counts one more layer of the chain; a chain deeper than MAX_CHAIN_DEPTH is refused. */
function enterLayer(state: ChainState, file: string, namedIn?: string): void {
  state.depth++;
  if (state.depth > MAX_CHAIN_DEPTH) {
    throw new AddCowError(
      `${file}${namedIn ? ` (named in ${namedIn})` : ""}: the backing chain is deeper than MAX_CHAIN_DEPTH = ${MAX_CHAIN_DEPTH} layers; shorten the chain (stream or commit layers) or check that it does not loop`,
      { file, code: "ELOOP", reason: "chain" },
    );
  }
}

/** The chain rules (depth, loops, names judged, locks, cleanup) lent to the qcow2 opener. */
function chainOpener(state: ChainState): ChainOpener {
  return {
    enterLayer: (file, namedIn) => enterLayer(state, file, namedIn),
    openLayerFile: async (file, namer) => {
      const role = namer ? "backing file" : "qcow2 file";
      let io: FileIO;
      let st: Judged;
      if (namer) {
        const n: NamedFile = { file, role, access: "read", namer };
        st = await judgeNamed(n, state);
        io = await openJudged(n, st, state);
      } else {
        ({ io, st } = await openGiven(file, "read", role, state));
        state.policy.setDiskOwner(st);
      }
      return { io, owner: { file, uid: Number(st.uid), gid: Number(st.gid) } };
    },
    openNamedFile: async (file, role, namer) => {
      const n: NamedFile = { file, role, access: "read", namer };
      return openJudged(n, await judgeNamed(n, state), state);
    },
    openBacking: (file, format, namer) => openLayer(file, format, state, "backing file", namer),
    resolve: resolveStoredName,
  };
}

/**
 * Opens one add-cow layer and everything below it. Files named in headers are
 * judged (access-policy.ts) before they are opened, and nothing is opened for
 * writing before every file below it has passed: the .add-cow file is read
 * first and reopened for writing last, the image file is opened after the
 * backing chain.
 */
async function openAddCow(
  file: string,
  writable: boolean,
  state: ChainState,
  namer?: Namer,
): Promise<AddCowDevice> {
  enterLayer(state, file, namer?.file);
  const role = namer ? "backing file" : "add-cow file";
  const isTop = state.depth === 1 && !namer;
  const mode = writable ? "write" : "read";
  let meta: FileIO;
  let metaStat: Judged;
  let self: NamedFile | null = null;
  if (namer) {
    self = { file, role, access: mode, namer };
    metaStat = await judgeNamed(self, state);
    // Read first; reopened for writing at the end, once the layers below have passed.
    meta = await openJudged({ ...self, access: "read" }, metaStat, state, lockFor(mode));
  } else {
    ({ io: meta, st: metaStat } = await openGiven(file, "read", role, state, lockFor(mode)));
    state.policy.setDiskOwner(metaStat);
  }
  // Names in this header are this file's owner's words: judged for that user too.
  const layer: Namer = { file, uid: Number(metaStat.uid), gid: Number(metaStat.gid) };
  const header = await readHeader(meta, file);
  log.open(
    "%s: cluster_bits %d, image %s, backing %s",
    file,
    header.clusterBits,
    header.imageName,
    header.backingName,
  );

  const imagePath = resolveStoredName(file, header.imageName);
  const imageFile: NamedFile = { file: imagePath, role: "image file", access: mode, namer: layer };
  const imageStat = await judgeNamed(imageFile, state);

  const allAllocated = (header.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n;
  let backing: BlockDevice | null = null;
  let backingPath: string | null = null;
  if (header.backingName !== null) {
    if (isUrlName(header.backingName)) {
      state.policy.checkUrl(header.backingName, "backing file", file);
    }
    backingPath = resolveBackingName(file, header.backingName);
    const top = state.depth === 1;
    if (top && state.opts.backingDevice) {
      backing = state.opts.backingDevice;
    } else if (top && state.opts.withoutBacking) {
      backing = null;
    } else if (!allAllocated) {
      // With every cluster allocated the backing file is never read: it may be gone.
      const writableBacking = top && writable && state.opts.writableBacking === true;
      backing = await openLayer(
        backingPath,
        header.backingFormat!,
        state,
        "backing file",
        layer,
        writableBacking,
      );
    }
  }

  const image = await openJudged(imageFile, imageStat, state);
  if (writable) {
    const n = self;
    meta = await reopenForWriting(meta, role, state, () =>
      n ? openJudged(n, metaStat, state, false) : reopenGiven(file, metaStat, role, state),
    );
  }
  const imageSize = await image.size();
  if (!allAllocated) {
    const metaSize = await meta.size();
    checkBitmapLength(file, header, metaSize, imagePath, imageSize);
    // Setting bits must never need new blocks: fill holes in the bitmap before any use.
    if (writable) await reserveBitmap(meta, file, header.headerSize, metaSize);
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

/**
 * For `addcow check`, which reads a disk's files without opening it as a
 * device: judges a file named in the header of `namer` as openDisk would,
 * and throws the same refusal.
 */
export async function judgeNamedFile(n: NamedFile, confine?: Confinement | null): Promise<void> {
  const policy = AccessPolicy.create(n.namer.file, confine);
  try {
    policy.setDiskOwner(n.namer);
    await policy.judge(n, await statExisting(n.file, n.role, n.namer.file));
  } finally {
    policy.close();
  }
}
