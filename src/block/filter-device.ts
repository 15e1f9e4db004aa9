import type * as fs from "node:fs";
import type { BlockDevice, Extent, LayerDescription } from "./block-device";
import type { LayerIdentity } from "./layer-identity";

/**
 * A device in front of another that changes some of what it does (a filter,
 * as nbdkit and QEMU call it): every member it does not override goes to the
 * device below unchanged, so nothing is forgotten when the seam grows.
 */
export class FilterDevice implements BlockDevice {
  constructor(protected readonly inner: BlockDevice) {}

  get size(): number {
    return this.inner.size;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get backing(): BlockDevice | null {
    return this.inner.backing;
  }
  read(buf: Buffer, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }
  write(buf: Buffer, offset: number): Promise<void> {
    return this.inner.write(buf, offset);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  describe(): LayerDescription {
    return this.inner.describe();
  }
  hasUnsavedMetadata(): boolean {
    return this.inner.hasUnsavedMetadata();
  }
  info(): Promise<object> {
    return this.inner.info();
  }
  storageStat(): fs.BigIntStats | null {
    return this.inner.storageStat();
  }
  identity(): Promise<LayerIdentity | null> {
    return this.inner.identity();
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
