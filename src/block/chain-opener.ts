import type { BlockDevice } from "./block-device";
import type { FileIO } from "./file-io";
import type { LayerIdentity } from "./layer-identity";
import type { LockKind } from "../os/file-lock";
import type { Controller } from "../os/path-walk";

/** The formats a backing name can be opened as; a format is recorded, never guessed. */
export type BackingFormat = "raw" | "add-cow" | "qcow2";
export const BACKING_FORMATS: readonly BackingFormat[] = ["raw", "add-cow", "qcow2"];

export function isBackingFormat(name: string): name is BackingFormat {
  return (BACKING_FORMATS as readonly string[]).includes(name);
}

/** The file whose header holds a name, and its owner: names are judged for that user. */
export interface Namer {
  file: string;
  uid: number;
  gid: number;
  /**
   * Other users who control the way to `file` (a directory of theirs it was
   * looked up in, a symbolic link of theirs followed): its names are theirs too.
   */
  via?: readonly Controller[];
  /** The real directory `file` was opened in: its relative names resolve there. */
  dir?: string;
}

/**
 * A name stored in a header, as the chain resolved it: a URL as it is, a
 * path against the directory the naming file was actually opened in (its
 * descriptor, not its name). `path` is for messages and descriptions; only
 * the chain opens it.
 */
export interface ResolvedName {
  readonly path: string;
  readonly url: boolean;
}

export type Access = "read" | "write";

/** A layer's own file, opened read-only and locked, with the owner its header speaks for. */
export interface LayerFile {
  io: FileIO;
  owner: Namer;
  /**
   * The same file opened for writing, once everything below the layer has
   * passed; the lock moves to it and the read-only descriptor is closed.
   */
  reopenForWriting(): Promise<FileIO>;
}

/** A file named in a header, judged (exists, allowed, new to the chain) and not opened yet. */
export interface JudgedFile {
  readonly file: string;
  /** Opens exactly the file judged (locked unless `lock` is false), or refuses. */
  open(lock?: LockKind | false): Promise<FileIO>;
}

/**
 * What the chain (src/chain) lends each format's opener, so a format opens
 * its own header while the chain keeps its rules in one place: depth, loops,
 * names judged for their owners and confinement, locks, cleanup on failure.
 * The format decides what its header names; the chain decides whether and
 * how that may be opened.
 */
export interface ChainOpener {
  /** Counts one more layer against the depth limit; throws past it. */
  enterLayer(file: string, namedIn?: string): void;
  /**
   * Opens the layer's own file read-only (judged when a header names it),
   * locked for `access` (shared to read, exclusive to write). `kind` names it
   * in messages when the user named it ("add-cow file", "qcow2 file").
   */
  openLayerFile(
    name: ResolvedName,
    kind: string,
    access: Access,
    namer?: Namer,
  ): Promise<LayerFile>;
  /** Judges a file named in a header now; it is opened later, after the layers below. */
  judgeNamedFile(
    name: ResolvedName,
    role: string,
    access: Access,
    namer: Namer,
  ): Promise<JudgedFile>;
  /** A name stored in namer's file as a local path, resolved against the directory it was opened in. */
  resolve(namer: Namer, stored: string): ResolvedName;
  /** A stored backing name: a URL as it is (under the URL rules), a path resolved. */
  backingName(namer: Namer, stored: string): ResolvedName;
  /**
   * Opens a backing layer of a known format, and its own chain; read-only
   * unless `writable`. `pinned` is what the header's pin says it is (a remote
   * base fetches the manifest it was pinned with); the caller compares.
   */
  openBacking(
    name: ResolvedName,
    format: BackingFormat,
    namer: Namer,
    writable?: boolean,
    pinned?: LayerIdentity | null,
  ): Promise<BlockDevice>;
}
