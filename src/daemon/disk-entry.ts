import type * as fs from "node:fs";
import type { BlockDevice } from "../block/block-device";
import type { OpenOptions } from "../chain/open-chain";
import { AddCowError } from "../util/errors";

/**
 * One disk presented as a file in the mount directory. Requests enter and
 * leave so the device can be swapped atomically (live snapshot): `exclusive`
 * holds new requests back, waits for the running ones, then runs its function.
 */
export class DiskEntry<D extends BlockDevice = BlockDevice> {
  /** Set by writes, cleared when a flush starts; the periodic write-back looks at it. */
  dirty = false;
  /** Set once the device is closed; later requests get EIO. */
  closed = false;
  /**
   * The error of a failed data sync, once the device reported one: it then
   * refuses every flush until reopened, and the periodic write-back stops trying.
   */
  failure: AddCowError | null = null;
  /** Called once, when the device first reports a failed data sync. */
  onFailure: ((err: AddCowError) => void) | null = null;
  private inflight = 0;
  private gate: Promise<void> | null = null;
  private drained: (() => void) | null = null;

  constructor(
    /** File name inside the mount directory. */
    readonly name: string,
    /** The .add-cow file it was opened from (for messages and jobs). */
    readonly file: string,
    private topLayer: D,
    /**
     * How the disk was opened (writable, cache mode, copy-on-read, confinement,
     * opener): a live job reopening its layers opens them the same way.
     */
    readonly openOptions: OpenOptions = {},
  ) {
    this.dev = topLayer;
  }

  /** What requests go to: the disk, or a device in front of it while a live job needs one. */
  private dev: BlockDevice;

  get target(): BlockDevice {
    return this.dev;
  }

  /** The disk's top layer: what this file serves and live jobs work on. */
  get top(): D {
    return this.topLayer;
  }

  /** Counts a request in; returns null when it may start now, else a promise to wait for first. */
  enter(): Promise<void> | null {
    if (this.gate === null) {
      this.inflight++;
      return null;
    }
    return this.gate.then(() => this.enter() ?? undefined);
  }

  leave(): void {
    this.inflight--;
    if (this.inflight === 0 && this.drained) this.drained();
  }

  /** Runs fn with no request running and none starting (swap the device, pause I/O). */
  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    while (this.gate) await this.gate;
    let open!: () => void;
    this.gate = new Promise<void>((resolve) => (open = resolve));
    try {
      if (this.inflight > 0) {
        await new Promise<void>((resolve) => (this.drained = resolve));
        this.drained = null;
      }
      return await fn();
    } finally {
      this.gate = null;
      open();
    }
  }

  /**
   * Requests go to `target` from now on, which serves the top layer `top`;
   * call inside `exclusive`. The caller owns closing the old one.
   */
  switchTo(target: BlockDevice, top: D): BlockDevice {
    const old = this.dev;
    this.dev = target;
    this.topLayer = top;
    return old;
  }

  /** The stat of the file holding the disk's own bytes (allocation, times), when it has one. */
  storageStat(): fs.BigIntStats | null {
    return this.dev.storageStat();
  }

  /** Flushes when something was written since the last flush started. */
  async flushIfDirty(): Promise<void> {
    if (!this.dirty) return;
    await this.flush();
  }

  /**
   * The periodic write-back: like flushIfDirty, but only while the device
   * keeps unsaved metadata (bits). Overwrites of allocated clusters change no
   * bit: their data reaches the disk like any file's, and syncing it every few
   * seconds would only stall a streaming writer.
   */
  async writeBackIfNeeded(): Promise<void> {
    if (this.failure) return;
    // Bits can be set by reads too (copy-on-read): they are written back without a write.
    if (this.dev.hasUnsavedMetadata()) await this.flush();
  }

  async flush(): Promise<void> {
    this.dirty = false;
    const wait = this.enter();
    if (wait) await wait;
    try {
      if (this.closed) return;
      await this.dev.flush();
    } catch (err) {
      this.dirty = true;
      this.noteError(err);
      throw err;
    } finally {
      this.leave();
    }
  }

  /** Looks at a failed request's error: the first failed data sync is reported once. */
  noteError(err: unknown): void {
    if (this.failure || !(err instanceof AddCowError) || err.reason !== "sync-failed") return;
    this.failure = err;
    this.onFailure?.(err);
  }

  /** Closes the device once the running requests are done (the close flushes). */
  async close(): Promise<void> {
    await this.exclusive(async () => {
      if (this.closed) return;
      this.closed = true;
      await this.dev.close();
    });
  }
}
