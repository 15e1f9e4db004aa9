import { readOnlyError } from "../util/errors";
import { type FileIO, statOf } from "./file-io";
import * as fs from "node:fs";
import { DeviceBase, type Extent, type LayerDescription } from "./block-device";
import { checkRange } from "./range";
import { pushExtent } from "./extents";
import { fingerprintFile } from "./fingerprint";
import type { LayerIdentity } from "./layer-identity";

/** A raw disk image: the virtual disk is the file's bytes. */
export class RawDevice extends DeviceBase {
  private constructor(
    readonly file: FileIO,
    readonly size: number,
  ) {
    super();
  }

  static async open(file: FileIO): Promise<RawDevice> {
    return new RawDevice(file, await file.size());
  }

  get readOnly(): boolean {
    return !this.file.writable;
  }

  readonly backing = null;

  /**
   * Every byte is this file's own: data, except the file's holes (found with
   * SEEK_HOLE/SEEK_DATA), which read as zeros without being read, and a tail
   * past a file that shrank since it was opened.
   */
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    try {
      checkRange(this, length, offset);
      const end = offset + length;
      const out: Extent[] = [];
      let pos = offset;
      for (const [a, b] of this.file.holes(offset, end)) {
        pushExtent(out, pos, a - pos, "data");
        pushExtent(out, a, b - a, "zero");
        pos = b;
      }
      pushExtent(out, pos, end - pos, "data");
      return Promise.resolve(out);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  describe(): LayerDescription {
    const p = this.file.path;
    return { format: "raw", name: p, storage: p, files: [p] };
  }

  override storageStat(): fs.BigIntStats | null {
    return statOf(this.file);
  }

  /** Its size and a fingerprint of sampled bytes (fingerprint.ts). */
  override async identity(): Promise<LayerIdentity> {
    const fileSize = await this.file.size();
    return {
      kind: "file",
      format: "raw",
      size: this.size,
      fileSize,
      fingerprint: await fingerprintFile(this.file, fileSize),
    };
  }

  read(buf: Buffer, offset: number): Promise<void> {
    try {
      checkRange(this, buf.length, offset);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.file.read(buf, offset).then((n) => {
      // The file may have been shortened behind our back; the disk still has its size.
      if (n < buf.length) buf.fill(0, n);
    });
  }

  async write(buf: Buffer, offset: number): Promise<void> {
    if (this.readOnly) {
      throw readOnlyError(this.file.path);
    }
    checkRange(this, buf.length, offset);
    await this.file.write(buf, offset);
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.file.sync();
  }

  async close(): Promise<void> {
    try {
      await this.flush();
    } finally {
      await this.file.close();
    }
  }
}
