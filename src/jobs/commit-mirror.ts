import type { BlockDevice } from "../block/block-device";
import type { AddCowLayer } from "../addcow/addcow-layer";
import { FilterDevice } from "../block/filter-device";
import { RangeLock } from "../block/range-lock";

/**
 * The device a mounted disk uses during a live commit: every write goes to the
 * overlay and then to the backing disk, under a cluster lock the commit's
 * copies take too. So a copy never puts older data into the backing over a
 * newer write, and when the copy ends the backing holds every allocated
 * cluster as the overlay does. Reads and everything else are the overlay's.
 */
export class CommitMirror extends FilterDevice {
  readonly lock = new RangeLock();

  constructor(
    readonly overlay: AddCowLayer,
    private readonly target: BlockDevice,
  ) {
    super(overlay);
  }

  override async write(buf: Buffer, offset: number): Promise<void> {
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

  override async flush(): Promise<void> {
    await this.overlay.flush();
    await this.target.flush();
  }

  /** Mirrored writes may set bits in an add-cow backing too. */
  override hasUnsavedMetadata(): boolean {
    return this.overlay.hasUnsavedMetadata() || this.target.hasUnsavedMetadata();
  }
}
