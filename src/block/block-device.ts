/**
 * The one interface every layer meets at: raw files, add-cow disks, backing
 * chains, block jobs and the FUSE front end all speak it.
 *
 * Ranges must lie inside [0, size); callers (the FUSE layer) clip at the end
 * of the disk. A rejected promise carries an errno-style `code` (EIO, ENOSPC,
 * EROFS, ...) that the FUSE layer hands to the kernel.
 */
export interface BlockDevice {
  /** Virtual size in bytes; fixed while the device is open. */
  readonly size: number;
  readonly readOnly: boolean;
  /** Fills all of buf with the bytes at [offset, offset + buf.length). */
  read(buf: Buffer, offset: number): Promise<void>;
  /** Writes all of buf at offset. Not durable until flush() resolves. */
  write(buf: Buffer, offset: number): Promise<void>;
  /** Makes every write that completed before the call durable. */
  flush(): Promise<void>;
  /**
   * True while the device holds state of its own that only a flush persists
   * (add-cow: bitmap bits set in memory). Absent: assume there is some.
   */
  hasUnsavedMetadata?(): boolean;
  /** Flushes (when writable) and releases the underlying files. */
  close(): Promise<void>;
}
