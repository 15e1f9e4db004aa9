import type * as fs from "node:fs";
import type { LayerIdentity } from "./layer-identity";

/**
 * The one interface every layer meets at: raw files, add-cow disks, qcow2 and
 * remote backings, block jobs and the FUSE front end all speak it. Code above
 * a device learns what it is only through these verbs (as QEMU's block layer
 * does with `bdrv_co_block_status`, nbdkit with `extents`), never by its type.
 *
 * Ranges must lie inside [0, size); callers (the FUSE layer) clip at the end
 * of the disk. A rejected promise carries an errno-style `code` (EIO, ENOSPC,
 * EROFS, ...) that the FUSE layer hands to the kernel.
 */
export interface BlockDevice {
  /** Virtual size in bytes; fixed while the device is open. */
  readonly size: number;
  readonly readOnly: boolean;
  /** The layer that `backing` extents are read from; null when there is none (or it is not used). */
  readonly backing: BlockDevice | null;
  /** Fills all of buf with the bytes at [offset, offset + buf.length). */
  read(buf: Buffer, offset: number): Promise<void>;
  /** Writes all of buf at offset. Not durable until flush() resolves. */
  write(buf: Buffer, offset: number): Promise<void>;
  /** Makes every write that completed before the call durable. */
  flush(): Promise<void>;
  /**
   * Where the bytes of [offset, offset + length) come from, seen from this
   * layer: contiguous extents in order, the first starting at offset. The list
   * may end before offset + length (a device answers in pieces it can find
   * cheaply); callers continue from where it ends (see `forEachExtent`).
   */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** What this layer is and which files it uses, for info, map and checks. */
  describe(): LayerDescription;
  /**
   * True while the device holds state of its own that only a flush persists
   * (add-cow: bitmap bits set in memory); the periodic write-back asks.
   */
  hasUnsavedMetadata(): boolean;
  /** Facts for `info --backing-chain`, some costing I/O (allocation counts); JSON-safe. */
  info(): Promise<object>;
  /** fstat of the local file holding this layer's own bytes (the mount's st_blocks and times). */
  storageStat(): fs.BigIntStats | null;
  /**
   * What this layer is, cheaply (a few reads, no more): what an overlay pins
   * of its backing and compares at every open (block/layer-identity.ts).
   * Null for a device that cannot tell.
   */
  identity(): Promise<LayerIdentity | null>;
  /** Flushes (when writable) and releases the underlying files. */
  close(): Promise<void>;
}

/**
 * The defaults of the optional parts of a device, in one place: a device
 * that keeps no metadata of its own, whose info is its description's details,
 * that has no local storage file and cannot tell its identity. Formats override what they have.
 */
export abstract class DeviceBase implements BlockDevice {
  abstract readonly size: number;
  abstract readonly readOnly: boolean;
  abstract readonly backing: BlockDevice | null;
  abstract read(buf: Buffer, offset: number): Promise<void>;
  abstract write(buf: Buffer, offset: number): Promise<void>;
  abstract flush(): Promise<void>;
  abstract blockStatus(offset: number, length: number): Promise<Extent[]>;
  abstract describe(): LayerDescription;
  abstract close(): Promise<void>;

  hasUnsavedMetadata(): boolean {
    return false;
  }

  info(): Promise<object> {
    return Promise.resolve(this.describe().details ?? {});
  }

  storageStat(): fs.BigIntStats | null {
    return null;
  }

  identity(): Promise<LayerIdentity | null> {
    return Promise.resolve(null);
  }
}

/**
 * data: this layer holds the bytes. zero: the bytes read as zeros, known
 * without reading them (a hole, a zero cluster, past the end of the backing).
 * backing: this layer does not hold them; they come from `backing`.
 */
export type ExtentKind = "data" | "zero" | "backing";

export interface Extent {
  start: number;
  length: number;
  kind: ExtentKind;
}

export interface LayerDescription {
  /** Format name: "raw", "add-cow", ... */
  format: string;
  /** The name the layer was opened by: a path (the .add-cow file, the raw file) or a URL. */
  name: string;
  /**
   * Where this layer's own bytes (its `data` extents) are stored, for map: an
   * add-cow layer's image file, a raw file itself, a qcow2 file or its
   * external data file, a remote object's URL.
   */
  storage: string;
  /** Every local file this layer opens itself (not its backing's), for overlap checks. */
  files: string[];
  /** Format-specific facts for `info --backing-chain` (JSON-safe). */
  details?: Record<string, unknown>;
}
