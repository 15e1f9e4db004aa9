import * as fs from "node:fs";
import {
  type BlockDevice,
  DeviceBase,
  type Extent,
  type LayerDescription,
} from "../block/block-device";
import { pushExtent } from "../block/extents";
import { type FileIO, statOf } from "../block/file-io";
import { checkRange } from "../block/range";
import { fingerprintFile } from "../block/fingerprint";
import type { LayerIdentity } from "../block/layer-identity";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { type Piece, ClusterMap } from "./cluster-map";
import { ClusterSlots } from "./cluster-slots";
import { DecompressError, decompressCluster } from "./decompress";
import type { Qcow2Header } from "./header";

export interface Qcow2DeviceParts {
  /** The name the layer was opened by (the qcow2 file). */
  path: string;
  io: FileIO;
  fileSize: number;
  header: Qcow2Header;
  l1: Float64Array;
  /** The external data file, when the image has one (else data lives in `io`). */
  dataFile: FileIO | null;
  dataFilePath: string | null;
  backing: BlockDevice | null;
  backingPath: string | null;
  l2CacheBytes?: number;
}

/** Decompressed clusters kept for sequential reads inside one cluster (bytes, at least two). */
const DECOMPRESSED_CACHE_BYTES = 4 << 20;
/** Read buffers for compressed bytes kept between reads (one per read in flight is used). */
const MAX_SPARE_INPUTS = 8;

type CompressedPiece = Extract<Piece, { kind: "compressed" }>;

function copyPiece(cluster: Buffer, out: Buffer, p: CompressedPiece): void {
  const from = p.start - p.cluster;
  cluster.copy(out, 0, from, from + p.length);
}

/**
 * A qcow2 image (version 2 or 3) as a read-only BlockDevice: the active L1
 * table, compressed clusters, zero clusters and subclusters, an external data
 * file, and unallocated ranges read from its own backing device (zeros past
 * the backing's end, or without one). Writes are refused with EROFS.
 */
export class Qcow2Device extends DeviceBase {
  readonly size: number;
  readonly readOnly = true;
  readonly backing: BlockDevice | null;
  readonly header: Qcow2Header;
  readonly path: string;
  readonly backingPath: string | null;
  private readonly map: ClusterMap;
  private readonly decompressed: ClusterSlots;
  /** Buffers for compressed bytes being read, kept for the next reads. */
  private readonly inputs: Buffer[] = [];
  private closed = false;

  constructor(private readonly parts: Qcow2DeviceParts) {
    super();
    this.header = parts.header;
    this.size = parts.header.size;
    this.backing = parts.backing;
    this.path = parts.path;
    this.backingPath = parts.backingPath;
    this.map = new ClusterMap(
      parts.io,
      parts.header,
      parts.l1,
      parts.path,
      parts.fileSize,
      parts.l2CacheBytes,
    );
    this.decompressed = new ClusterSlots(
      parts.header.clusterSize,
      Math.max(2, Math.floor(DECOMPRESSED_CACHE_BYTES / parts.header.clusterSize)),
    );
  }

  read(buf: Buffer, offset: number): Promise<void> {
    try {
      checkRange(this, buf.length, offset);
    } catch (err) {
      return Promise.reject(err);
    }
    if (buf.length === 0) return Promise.resolve();
    return this.map.pieces(offset, buf.length).then((pieces) => {
      if (pieces.length === 1) return this.readPiece(buf, pieces[0]!);
      // Settle every piece before failing: the caller reuses buf once read() settles.
      return Promise.allSettled(
        pieces.map((p) =>
          this.readPiece(buf.subarray(p.start - offset, p.start - offset + p.length), p),
        ),
      ).then((results) => {
        for (const r of results) if (r.status === "rejected") throw r.reason;
      });
    });
  }

  private async readPiece(out: Buffer, p: Piece): Promise<void> {
    switch (p.kind) {
      case "zero":
        out.fill(0);
        return;
      case "unallocated":
        return this.readBacking(out, p.start);
      case "data":
        return this.readData(out, p.host);
      case "compressed": {
        const cached = this.decompressed.get(p.cluster);
        if (cached) copyPiece(cached, out, p);
        else await this.readCompressed(out, p);
        return;
      }
      case "invalid":
        throw p.error;
    }
  }

  private async readBacking(out: Buffer, start: number): Promise<void> {
    const b = this.backing;
    const inBacking = b ? Math.max(0, Math.min(out.length, b.size - start)) : 0;
    if (inBacking > 0) await b!.read(out.subarray(0, inBacking), start);
    if (inBacking < out.length) out.fill(0, inBacking);
  }

  private async readData(out: Buffer, host: number): Promise<void> {
    const io = this.parts.dataFile ?? this.parts.io;
    const n = await io.read(out, host);
    // A cluster cut off by the end of its file reads as zeros there, as in QEMU.
    if (n < out.length) out.fill(0, n);
  }

  /** Reads a compressed cluster, decompresses it into a slot and copies the piece out. */
  private async readCompressed(out: Buffer, p: CompressedPiece): Promise<void> {
    const input = this.takeInput(p.csize);
    try {
      const n = await this.parts.io.read(input.subarray(0, p.csize), p.coffset);
      // From here on synchronous: the slot is filled and read before any other read runs.
      const done = this.decompressed.get(p.cluster);
      if (done) return copyPiece(done, out, p);
      const slot = this.decompressed.claim(p.cluster);
      try {
        decompressCluster(this.header.compressionType, input.subarray(0, n), slot);
      } catch (err) {
        this.decompressed.drop(p.cluster);
        if (!(err instanceof DecompressError)) throw err;
        log.io("%s: compressed cluster at guest %d: %s", this.path, p.cluster, err.message);
        throw new AddCowError(
          `${this.path}: qcow2 compressed cluster for guest offset ${p.cluster} (${this.header.compressionType} data at ${p.coffset}) cannot be decompressed: ${err.message}; the image is damaged (reads of this range fail)`,
          {
            file: this.path,
            field: "compressed cluster",
            offset: p.coffset,
            reason: "bad-field",
            code: "EIO",
          },
        );
      }
      copyPiece(slot, out, p);
    } finally {
      this.giveInput(input);
    }
  }

  private takeInput(size: number): Buffer {
    const b = this.inputs.pop();
    if (b && b.length >= size) return b;
    return Buffer.allocUnsafe(Math.max(size, this.header.clusterSize));
  }

  private giveInput(b: Buffer): void {
    if (this.inputs.length < MAX_SPARE_INPUTS) this.inputs.push(b);
  }

  async write(): Promise<void> {
    throw new AddCowError(`${this.path}: a qcow2 backing image is read-only`, {
      code: "EROFS",
      file: this.path,
    });
  }

  async flush(): Promise<void> {}

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    checkRange(this, length, offset);
    if (length === 0) return [];
    const out: Extent[] = [];
    const backingEnd = this.backing ? this.backing.size : 0;
    for (const p of await this.map.pieces(offset, length, true)) {
      switch (p.kind) {
        case "data":
        case "compressed":
          pushExtent(out, p.start, p.length, "data");
          break;
        case "zero":
          pushExtent(out, p.start, p.length, "zero");
          break;
        case "unallocated": {
          const split = Math.max(p.start, Math.min(p.start + p.length, backingEnd));
          pushExtent(out, p.start, split - p.start, "backing");
          pushExtent(out, split, p.start + p.length - split, "zero");
          break;
        }
        case "invalid":
          throw p.error;
      }
    }
    return out;
  }

  describe(): LayerDescription {
    const h = this.header;
    const storage = this.parts.dataFilePath ?? this.path;
    return {
      format: "qcow2",
      name: this.path,
      storage,
      files: this.parts.dataFilePath ? [this.path, this.parts.dataFilePath] : [this.path],
      details: {
        version: h.version,
        clusterSize: h.clusterSize,
        virtualSize: h.size,
        compressionType: h.compressionType,
        extendedL2: h.extendedL2,
        dirty: h.dirty,
        corrupt: h.corrupt,
        ...(this.parts.dataFilePath ? { dataFile: this.parts.dataFilePath } : {}),
        snapshots: h.nbSnapshots,
        ...(h.backingFormat ? { backingFormat: h.backingFormat } : {}),
        readOnly: true,
      },
    };
  }

  override storageStat(): fs.BigIntStats | null {
    return statOf(this.parts.dataFile ?? this.parts.io);
  }

  /**
   * Its disk size and a fingerprint of the qcow2 file's samples, its active
   * L1 table (where every guest cluster lives), the samples of an external
   * data file, and its own backing's identity.
   */
  override async identity(): Promise<LayerIdentity> {
    const p = this.parts;
    const extra = [Buffer.from(p.l1.buffer, p.l1.byteOffset, p.l1.byteLength)];
    if (p.dataFile) {
      extra.push(Buffer.from(await fingerprintFile(p.dataFile, await p.dataFile.size()), "hex"));
    }
    if (this.backing) extra.push(Buffer.from(JSON.stringify(await this.backing.identity())));
    const fileSize = await p.io.size();
    return {
      kind: "file",
      format: "qcow2",
      size: this.size,
      fileSize,
      fingerprint: await fingerprintFile(p.io, fileSize, extra),
    };
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const errors: unknown[] = [];
    for (const f of [this.parts.dataFile, this.parts.io]) {
      try {
        await f?.close();
      } catch (err) {
        errors.push(err);
      }
    }
    try {
      await this.backing?.close();
    } catch (err) {
      errors.push(err);
    }
    if (errors.length > 0) throw errors[0];
  }
}
