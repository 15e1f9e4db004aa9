import * as fs from "node:fs";
import * as path from "node:path";
import type { BlockDevice } from "../block/block-device";
import { RawDevice } from "../block/raw-device";
import { AddCowError, describeError, errnoCode } from "../util/errors";
import type {
  Access,
  BackingFormat,
  ChainOpener,
  LayerFile,
  Namer,
  ResolvedName,
} from "../block/chain-opener";
import type { LayerIdentity } from "../block/layer-identity";
import { type FileIO, type FileOpener, openPosixFile } from "../block/file-io";
import type { AddCowDevice, CacheMode } from "../addcow/addcow-device";
import { type AddCowOpenRequest, openAddCow } from "../addcow/open-addcow";
import type { LockKind } from "../os/file-lock";
import {
  type Controller,
  OpenDirectoryError,
  type PathFd,
  WalkError,
  walkPath,
} from "../os/path-walk";
import {
  AccessPolicy,
  type Confinement,
  type Located,
  type NamedFile,
  isUrlName,
} from "./access-policy";
import type { RemoteSettings } from "../remote/options";
import type { VerifyMode } from "../remote/verify";
import { openRemoteBacking } from "./open-remote";
import { NO_URL_RULES, type UrlRules, judgeUrl } from "./url-policy";

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
  /**
   * The operator's URL rules (chain/url-policy.ts): which origins another
   * user's (or a confined) disk may name, and which get credentials.
   */
  urls?: UrlRules;
  /** Remote backings: whether a manifest is required (-o verify=; default ADDCOW_VERIFY, else auto). */
  verify?: VerifyMode;
  /** Reads from the backing chain also fill the top disk's image file (copy-on-read). */
  copyOnRead?: boolean;
}

/** Identity of a file across paths, symlinks and hard links. */
type FileId = string;

/** Where a layer's relative names resolve: the directory its file was actually opened in. */
interface Place {
  dir: PathFd;
  /** The kernel's path of that directory, for messages and for the judged users' helpers. */
  real: string;
}

/**
 * A name as the chain resolved it: shown as `path`, reached by walking
 * `walk` from the directory descriptor `from` (or from "/"), never through
 * the naming file's path again.
 */
class ChainName implements ResolvedName {
  constructor(
    readonly path: string,
    readonly url: boolean,
    readonly walk: string,
    readonly from: PathFd | null,
    /** What a judged user's helper looks up: the same inode, by a path that user may use. */
    readonly probePath: string,
  ) {}
}

/** A name the user gave (the command line): relative to the working directory. */
function givenName(file: string): ChainName {
  if (isUrlName(file)) return new ChainName(file, true, file, null, file);
  const abs = path.resolve(file);
  return new ChainName(file, false, abs, null, abs);
}

/** A local name stored in a header, resolved against the directory its file was opened in. */
function storedName(place: Place | undefined, namer: Namer, stored: string): ChainName {
  if (path.isAbsolute(stored)) {
    return new ChainName(path.normalize(stored), false, stored, null, stored);
  }
  if (!place) {
    const abs = resolveName(namer, stored);
    return new ChainName(abs, false, abs, null, abs);
  }
  const raw = `${place.real === "/" ? "" : place.real}/${stored}`;
  return new ChainName(path.normalize(raw), false, stored, place.dir, raw);
}

function chainName(name: ResolvedName): ChainName {
  if (!(name instanceof ChainName)) throw new Error("a name must be resolved by the chain");
  return name;
}

/** A walked name: its O_PATH descriptor, what fstat said, who controls the way, its directory. */
interface ChainLocated extends Located {
  fd: PathFd;
  place: Place;
}

interface ChainState {
  /** Every file opened so far, with the role it was opened in. */
  seen: Map<FileId, { role: string; file: string }>;
  depth: number;
  opts: OpenOptions;
  cleanup: Array<() => Promise<void>>;
  /** Judges every file before it is opened, and the descriptor after. */
  policy: AccessPolicy;
  /** Descriptors of walked names, held until the chain is open. */
  held: Array<{ close(): void }>;
  /** The directory each layer's file was opened in. */
  places: WeakMap<Namer, Place>;
}

/** Runs one open of a chain; on failure closes whatever it opened, innermost last. */
async function openChain<T>(
  opts: OpenOptions,
  depth: number,
  open: (state: ChainState) => Promise<T>,
): Promise<T> {
  const policy = AccessPolicy.create(opts.confine);
  const state: ChainState = {
    seen: new Map(),
    depth,
    opts,
    cleanup: [],
    policy,
    held: [],
    places: new WeakMap(),
  };
  try {
    return await open(state);
  } catch (err) {
    for (const undo of state.cleanup.reverse()) await undo().catch(() => undefined);
    throw err;
  } finally {
    for (const h of state.held) h.close();
    policy.close();
  }
}

/** Opens an add-cow disk and its backing chain. */
export function openDisk(file: string, opts: OpenOptions = {}): Promise<AddCowDevice> {
  return openChain(opts, 0, (state) =>
    openAddCowLayer(givenName(file), opts.writable ?? false, state),
  );
}

/** Opens a disk of a known format read-only (raw file or add-cow chain), for backing use. */
export function openBacking(
  file: string,
  format: BackingFormat,
  opts: OpenOptions = {},
): Promise<BlockDevice> {
  const namer = opts.namedBy;
  return openChain(opts, opts.layersAbove ?? 0, (state) => {
    if (namer) state.policy.setDisk(namer);
    return openLayer(
      givenName(file),
      format,
      state,
      "backing file",
      namer,
      false,
      opts.pinned ?? null,
    );
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

/**
 * Why a lookup or open failed, in words, from its errno code. A dangling
 * symbolic link's target is shown only when `showLinks` (no other user is
 * judged: nobody learns where a link they could not read points).
 */
function reason(err: unknown, file: string, showLinks = true): string {
  const code = errnoCode(err);
  switch (code) {
    case "ENOENT": {
      try {
        if (showLinks && fs.lstatSync(file).isSymbolicLink()) {
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
    case "EAGAIN":
      return "cannot be opened: a symbolic link on its path changed while it was being followed; try again";
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

/**
 * Looks a name up through descriptors (os/path-walk.ts): the file found, who
 * controls the way to it, and the directory it is in. When it cannot be
 * found, a user it is judged for who could not look it up either is the
 * refusal, so the answer does not tell whether something exists there.
 */
async function locate(name: ChainName, n: NamedFile, state: ChainState): Promise<ChainLocated> {
  let walked;
  try {
    walked = walkPath(name.walk, name.from);
  } catch (err) {
    const where = n.namer ? ` (named in ${n.namer.file})` : "";
    if (err instanceof OpenDirectoryError) {
      throw new AddCowError(`${n.role} ${n.file}${where} is refused: ${err.message}`, {
        reason: "forbidden",
        file: n.file,
        code: "EACCES",
        mode: n.access,
      });
    }
    const controllers: readonly Controller[] = err instanceof WalkError ? err.controllers : [];
    await state.policy.refuseUnseen(n, controllers);
    const code = errnoCode(err);
    const why = reason(err, n.file, !state.policy.judges(n, controllers));
    throw new AddCowError(
      `${n.role} ${n.file}${where} ${why}; ${fixAdvice(n.role, n.file, n.namer?.file)}`,
      { file: n.file, code: code ?? "EIO", reason: "cannot-open" },
    );
  }
  state.held.push(walked);
  const file = walked.file;
  return {
    fd: file,
    st: file.st,
    controllers: walked.controllers,
    place: { dir: walked.dir, real: walked.dir.realPath() },
    realPath: () => file.realPath(),
  };
}

/**
 * Everything decided about a file before it is opened, in this order: every
 * user it is judged for could open it (before anything is said about it),
 * it is a regular file, it is where confinement allows, it is new to the chain.
 */
async function judgeLocated(n: NamedFile, at: ChainLocated, state: ChainState): Promise<void> {
  await state.policy.judgeAccess(n, at);
  if (!at.st.isFile()) {
    // Only regular files: a FIFO would block, a device or a directory is not a disk's file.
    const where = n.namer ? ` (named in ${n.namer.file})` : "";
    throw new AddCowError(
      `${n.role} ${n.file}${where} is ${fileKind(at.st)}, not a regular file; ${fixAdvice(n.role, n.file, n.namer?.file)}`,
      { file: n.file, code: "EINVAL", reason: n.namer ? "forbidden" : "cannot-open" },
    );
  }
  state.policy.judgePlace(n, at);
  remember(state, at.st, n.file, n.role, n.namer?.file);
}

/**
 * Opens a file for I/O through its judged O_PATH descriptor (the very inode
 * judged: the name is not looked up again). `check` judges the descriptor
 * before the file is locked (a file that fails it is closed again without
 * ever being locked). The lock is shared for reading, exclusive for writing,
 * unless `lock` says otherwise.
 */
async function openFile(
  file: string,
  mode: "read" | "write",
  role: string,
  state: ChainState,
  namedIn?: string,
  opts: { lock?: LockKind | false; check?: (io: FileIO) => void; at?: string } = {},
): Promise<FileIO> {
  const opener = state.opts.opener ?? openPosixFile;
  let io: FileIO;
  try {
    io = await opener(file, mode, opts.at);
  } catch (err) {
    const code = errnoCode(err);
    const advice =
      mode === "write" && (code === "EACCES" || code === "EPERM" || code === "EROFS")
        ? "open the disk read-only, or make the file writable"
        : "check the file and its permissions";
    throw new AddCowError(
      `${role} ${file}${namedIn ? ` (named in ${namedIn})` : ""} cannot be opened for ${mode === "write" ? "writing" : "reading"}: ${reason(err, file, false).replace(/^cannot be (accessed|opened): /, "")}; ${advice}`,
      { file, code: code ?? "EIO", reason: "cannot-open", mode },
    );
  }
  state.cleanup.push(() => io.close());
  if (opts.check) opts.check(io);
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
  st: fs.BigIntStats,
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

/** Looks a name up and judges it: ready to be opened by openLocated. */
async function locateJudged(
  name: ChainName,
  n: NamedFile,
  state: ChainState,
): Promise<ChainLocated> {
  const at = await locate(name, n, state);
  await judgeLocated(n, at, state);
  return at;
}

/** Opens a judged file through its descriptor; the file opened must be the one judged. */
function openLocated(
  n: NamedFile,
  at: ChainLocated,
  mode: Access,
  state: ChainState,
  lockAs?: LockKind | false,
): Promise<FileIO> {
  return openFile(n.file, mode, n.role, state, n.namer?.file, {
    lock: lockAs,
    at: at.fd.proc,
    check: (io) => state.policy.verify(n, at.st, io),
  });
}

function namedFile(name: ChainName, role: string, access: Access, namer?: Namer): NamedFile {
  return {
    file: name.path,
    role,
    access,
    ...(namer ? { namer, probePath: name.probePath } : {}),
  };
}

async function openLayer(
  name: ChainName,
  format: BackingFormat,
  state: ChainState,
  role: string,
  namer?: Namer,
  writable = false,
  pinned: LayerIdentity | null = null,
): Promise<BlockDevice> {
  if (name.url) {
    const decision = await judgeUrl(state.opts.urls ?? NO_URL_RULES, name.path, {
      writers: state.policy.writersOf(namer),
      confined: state.opts.confine != null,
      role,
      ...(namer ? { namedIn: namer.file } : {}),
    });
    const manifest = pinned?.kind === "remote" ? pinned.manifest : null;
    const dev = await openRemoteBacking(
      name.path,
      format,
      writable,
      namer?.file,
      state.opts.remote,
      decision,
      { manifest, ...(state.opts.verify ? { verify: state.opts.verify } : {}) },
    );
    state.cleanup.push(() => dev.close());
    return dev;
  }
  if (format === "add-cow") return openAddCowLayer(name, writable, state, namer);
  if (format === "qcow2") {
    if (writable) {
      throw new AddCowError(
        `backing file ${name.path} is a qcow2 image, which addcow opens read-only: it cannot be written (commit into it is not supported)`,
        { file: name.path, code: "EROFS", reason: "invalid" },
      );
    }
    // Loaded only for a qcow2 layer (with its zlib and zstd decoders): most disks have none.
    const { openQcow2 } = await import("../qcow2/open-qcow2");
    return openQcow2(chainOpener(state), name, namer);
  }
  const mode = writable ? "write" : "read";
  const n = namedFile(name, role, mode, namer);
  const at = await locateJudged(name, n, state);
  return RawDevice.open(await openLocated(n, at, mode, state));
}

function lockFor(mode: "read" | "write"): LockKind {
  return mode === "write" ? "exclusive" : "shared";
}

/**
 * Resolves a name stored in an .add-cow file by path: relative names are
 * relative to its directory. Only for showing and comparing names; the chain
 * itself resolves them against the directory the file was opened in.
 */
export function resolveStoredName(addcowFile: string, stored: string): string {
  return path.resolve(path.dirname(path.resolve(addcowFile)), stored);
}

/**
 * A name stored in namer's file, as a path: against the real directory the
 * chain opened that file in (its descriptor's path), else against its name's
 * directory; a URL as it is.
 */
export function resolveName(namer: Namer, stored: string): string {
  if (isUrlName(stored)) return stored;
  return namer.dir ? path.resolve(namer.dir, stored) : resolveStoredName(namer.file, stored);
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
 * A layer's own file: named by the user (the disk) or by a header. Looked up
 * once, judged (for whoever controls the way to it too), opened read-only
 * and locked for `access` through its descriptor; reopenForWriting opens
 * that same descriptor's inode again, never the name.
 */
async function openLayerFile(
  name: ChainName,
  kind: string,
  access: Access,
  state: ChainState,
  namer?: Namer,
): Promise<LayerFile> {
  const role = namer ? "backing file" : kind;
  const n = namedFile(name, role, access, namer);
  const at = await locateJudged(name, n, state);
  const owner: Namer = {
    file: name.path,
    uid: Number(at.st.uid),
    gid: Number(at.st.gid),
    via: at.controllers,
    dir: at.place.real,
  };
  state.places.set(owner, at.place);
  if (!namer) state.policy.setDisk(owner);
  let io = await openLocated({ ...n, access: "read" }, at, "read", state, lockFor(access));
  return {
    io,
    owner,
    reopenForWriting: async () =>
      (io = await reopenForWriting(io, role, state, () =>
        openLocated(n, at, "write", state, false),
      )),
  };
}

/**
 * One add-cow layer, with what the open options say about the top one: its
 * backing given, left out or writable, copy-on-read. Layers below always
 * open read-only with their backing opened by the chain.
 */
function openAddCowLayer(
  name: ChainName,
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
    name,
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
    openLayerFile: (name, kind, access, namer) =>
      openLayerFile(chainName(name), kind, access, state, namer),
    judgeNamedFile: async (resolved, role, access, namer) => {
      const name = chainName(resolved);
      const n = namedFile(name, role, access, namer);
      const at = await locateJudged(name, n, state);
      return { file: name.path, open: (lockAs) => openLocated(n, at, access, state, lockAs) };
    },
    resolve: (namer, stored) => storedName(state.places.get(namer), namer, stored),
    backingName: (namer, stored) => {
      // A URL is judged when it is opened (chain/url-policy.ts).
      if (isUrlName(stored)) return new ChainName(stored, true, stored, null, stored);
      return storedName(state.places.get(namer), namer, stored);
    },
    openBacking: (name, format, namer, writable, pinned) =>
      openLayer(chainName(name), format, state, "backing file", namer, writable, pinned),
  };
}

/**
 * For `addcow check`, which reads a disk's files without opening it as a
 * device: its .add-cow file opened read-only as openDisk opens it (looked up
 * once, judged for whoever controls the way to it), locked shared unless
 * `lock` is false, and the namer its header's names are judged for.
 */
export async function openDiskFile(
  file: string,
  opts: { lock?: boolean; opener?: FileOpener } = {},
): Promise<{ io: FileIO; namer: Namer }> {
  let io!: FileIO;
  let namer!: Namer;
  const how: OpenOptions = {
    lock: opts.lock ?? true,
    ...(opts.opener ? { opener: opts.opener } : {}),
  };
  await openChain(how, 0, async (state) => {
    const layer = await openLayerFile(givenName(file), "add-cow file", "read", state);
    io = layer.io;
    namer = layer.owner;
  });
  return { io, namer };
}

/**
 * A file a new disk's header is about to name (create's existing image
 * file), judged as openDisk will judge it and opened for `n.access` through
 * its descriptor, unlocked.
 */
export async function openNamedFile(n: NamedFile, confine?: Confinement | null): Promise<FileIO> {
  let io!: FileIO;
  await openChain({ confine, lock: false }, 0, async (state) => {
    if (n.namer) state.policy.setDisk(n.namer);
    const at = await locateJudged(givenName(n.file), n, state);
    io = await openLocated(n, at, n.access, state, false);
  });
  return io;
}

/**
 * For `addcow check`: judges a file named in the header of `namer` as
 * openDisk would, and throws the same refusal (a judged user who cannot see
 * it is the refusal; a missing file that they could see is "cannot-open").
 * Returns what it is; a file that is not regular is the caller's to report.
 */
export async function judgeNamedFile(
  n: NamedFile,
  confine?: Confinement | null,
): Promise<fs.BigIntStats> {
  return openChain({ confine }, 0, async (state) => {
    if (n.namer) state.policy.setDisk(n.namer);
    const at = await locate(givenName(n.file), n, state);
    await state.policy.judgeAccess(n, at);
    if (at.st.isFile()) state.policy.judgePlace(n, at);
    return at.st;
  });
}
