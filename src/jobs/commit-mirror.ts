import type * as fs from "node:fs";
import type { BlockDevice, Extent, LayerDescription } from "../block/block-device";
import type { AddCowDevice } from "../addcow/addcow-device";
import { RangeLock } from "../block/range-lock";

/**
 * The device a mounted disk uses during a live commit: every write goes to the
 * overlay and then to the backing disk, under a cluster lock the commit's
 * copies take too. So a copy never puts older data into the backing over a
 * newer write, and when the copy ends the backing holds every allocated
 * cluster as the overlay does.
 */
export class CommitMirror implements BlockDevice {
  readonly lock = new RangeLock();

  constructor(
    readonly overlay: AddCowDevice,
    private readonly target: BlockDevice,
  ) {}

  get size(): number {
    return this.overlay.size;
  }

  get readOnly(): boolean {
    return this.overlay.readOnly;
  }

  /** The overlay's view: the mirror changes where writes go, not what reads see. */
  get backing(): BlockDevice | null {
    return this.overlay.backing;
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.overlay.blockStatus(offset, length);
  }

  describe(): LayerDescription {
    return this.overlay.describe();
  }

  dataFileStat(): fs.Stats | null {
    return this.overlay.dataFileStat();
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.overlay.read(buf, offset);
  }

  async write(buf: Buffer, offset: number): Promise<void> {
    const cs = this.overlay.clusterSize;
    const c0 = Math.floor(offset / cs);
    const c1 = Math.ceil((offset + buf.length) / cs);
    const release = await this.lock.acquire(c0, c1);
    try {
      await this.overlay.write(buf, offset);
      // Past the backing's end there is nothing to mirror (the commit keeps such data).
      const n = Math.max(0, Math.min(buf.length, this.target.size - offset));
      if (n > 0) await this.target.write(n === buf.length ? buf : buf.subarray(0, n), offset);
    } finally {
      release();
    }
  }

  async flush(): Promise<void> {
    await this.overlay.flush();
    await this.target.flush();
  }

  close(): Promise<void> {
    return this.overlay.close();
  }
}
