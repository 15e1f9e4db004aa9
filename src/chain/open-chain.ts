import * as fs from "node:fs";
import * as path from "node:path";
import type { BlockDevice } from "../block/block-device";
import { RawDevice } from "../block/raw-device";
import { AddCowError, describeError, errnoCode } from "../util/errors";
import type { Access, BackingFormat, ChainOpener, LayerFile, Namer } from "../block/chain-opener";
import type { LayerIdentity } from "../block/layer-identity";
import { type FileIO, type FileOpener, openPosixFile } from "../block/file-io";
import type { AddCowDevice, CacheMode } from "../addcow/addcow-device";
import { type AddCowOpenRequest, openAddCow } from "../addcow/open-addcow";
import type { LockKind } from "../os/file-lock";
import {
  AccessPolicy,
  type Confinement,
  type Judged,
  type NamedFile,
  isUrlName,
} from "./access-policy";
import type { RemoteSettings } from "../remote/options";
import type { VerifyMode } from "../remote/verify";
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
  /**
   * openBacking only: what the pin of the disk naming it says it is (a remote
   * base then fetches the manifest it was pinned with); the caller compares.
   */
  pinned?: LayerIdentity | null;
  /** Remote backings: block size, timeouts, cache (default: from the environment). */
  remote?: RemoteSettings;
  /** Remote backings: whether a manifest is required (-o verify=; default ADDCOW_VERIFY, else auto). */
  verify?: VerifyMode;
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
  return openChain(file, opts, 0, (state) => openAddCowLayer(file, opts.writable ?? false, state));
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
    return openLayer(file, format, state, "backing file", namer, false, opts.pinned ?? null);
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
    io.lock(kind, role);
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
  return { io, st: io.stat() };
}

/** Opens a file the user named again, for writing (unlocked): it must still be the file read. */
function reopenGiven(file: string, st: Judged, role: string, state: ChainState): Promise<FileIO> {
  return openFile(file, "write", role, state, undefined, {
    lock: false,
    check: async (io) => {
      const now = io.stat();
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
  pinned: LayerIdentity | null = null,
): Promise<BlockDevice> {
  if (isUrlName(file)) {
    const manifest = pinned?.kind === "remote" ? pinned.manifest : null;
    const dev = await openRemoteBacking(file, format, writable, namer?.file, state.opts.remote, {
      manifest,
      ...(state.opts.verify ? { verify: state.opts.verify } : {}),
    });
    state.cleanup.push(() => dev.close());
    return dev;
  }
  if (format === "add-cow") return openAddCowLayer(file, writable, state, namer);
  if (format === "qcow2") {
    if (writable) {
      throw new AddCowError(
        `backing file ${file} is a qcow2 image, which addcow opens read-only: it cannot be written (commit into it is not supported)`,
        { file, code: "EROFS", reason: "invalid" },
      );
    }
    // Loaded only for a qcow2 layer (with its zlib and zstd decoders): most disks have none.
    const { openQcow2 } = await import("../qcow2/open-qcow2");
    return openQcow2(chainOpener(state), file, namer);
  }
  const mode = writable ? "write" : "read";
  if (!namer) return RawDevice.open((await openGiven(file, mode, role, state)).io);
  const n: NamedFile = { file, role, access: mode, namer };
  return RawDevice.open(await openJudged(n, await judgeNamed(n, state), state));
}

function lockFor(mode: "read" | "write"): LockKind {
  return mode === "write" ? "exclusive" : "shared";
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

/**
 * A layer's own file: named by the user (the disk) or by a header (judged
 * first). Read-only and locked for `access` until reopenForWriting.
 */
async function openLayerFile(
  file: string,
  kind: string,
  access: Access,
  state: ChainState,
  namer?: Namer,
): Promise<LayerFile> {
  const lockAs = lockFor(access);
  if (namer) {
    const role = "backing file";
    const self: NamedFile = { file, role, access, namer };
    const st = await judgeNamed(self, state);
    let io = await openJudged({ ...self, access: "read" }, st, state, lockAs);
    return {
      io,
      owner: ownerOf(file, st),
      reopenForWriting: async () =>
        (io = await reopenForWriting(io, role, state, () => openJudged(self, st, state, false))),
    };
  }
  const role = kind;
  const given = await openGiven(file, "read", role, state, lockAs);
  state.policy.setDiskOwner(given.st);
  let io = given.io;
  return {
    io,
    owner: ownerOf(file, given.st),
    reopenForWriting: async () =>
      (io = await reopenForWriting(io, role, state, () =>
        reopenGiven(file, given.st, role, state),
      )),
  };
}

function ownerOf(file: string, st: Judged): Namer {
  return { file, uid: Number(st.uid), gid: Number(st.gid) };
}

/**
 * One add-cow layer, with what the open options say about the top one: its
 * backing given, left out or writable, copy-on-read. Layers below always
 * open read-only with their backing opened by the chain.
 */
function openAddCowLayer(
  file: string,
  writable: boolean,
  state: ChainState,
  namer?: Namer,
): Promise<AddCowDevice> {
  const o = state.opts;
  const top = state.depth === 0;
  let backing: AddCowOpenRequest["backing"] = "open";
  if (top && o.backingDevice) backing = { device: o.backingDevice };
  else if (top && o.withoutBacking) backing = "none";
  else if (top && o.writableBacking) backing = "open-writable";
  return openAddCow(chainOpener(state), {
    file,
    writable,
    ...(namer ? { namer } : {}),
    backing,
    cacheMode: o.cacheMode,
    bitmapCacheBytes: o.bitmapCacheBytes,
    copyOnRead: top && !namer && o.copyOnRead === true,
  });
}

/** The chain rules lent to each format's opener (block/chain-opener.ts). */
function chainOpener(state: ChainState): ChainOpener {
  return {
    enterLayer: (file, namedIn) => enterLayer(state, file, namedIn),
    openLayerFile: (file, kind, access, namer) => openLayerFile(file, kind, access, state, namer),
    judgeNamedFile: async (file, role, access, namer) => {
      const n: NamedFile = { file, role, access, namer };
      const st = await judgeNamed(n, state);
      return { file, open: (lockAs) => openJudged(n, st, state, lockAs) };
    },
    resolve: resolveStoredName,
    backingName: (file, stored) => {
      if (isUrlName(stored)) state.policy.checkUrl(stored, "backing file", file);
      return resolveBackingName(file, stored);
    },
    openBacking: (name, format, namer, writable, pinned) =>
      openLayer(name, format, state, "backing file", namer, writable, pinned),
  };
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
