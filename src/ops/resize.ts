import type { AddCowDevice } from "../addcow/addcow-device";
import { withDiskAtRest } from "../chain/at-rest";
import type { OpenOptions } from "../chain/open-chain";
import { bitmapBytes } from "../addcow/header";
import { bytesOfKind } from "../block/extents";
import { AddCowError } from "../util/errors";
import { formatSize, parseSize } from "../util/size";
import { log } from "../util/log";

export interface ResizeOptions {
  /** Allow a smaller size (only past the last allocated cluster). */
  shrink?: boolean;
}

/** "+1G", "-512M" or "8G": the new size, from the current one. */
export function parseResize(spec: string, current: number): number {
  const sign = spec.startsWith("+") ? 1 : spec.startsWith("-") ? -1 : 0;
  const amount = parseSize(sign === 0 ? spec : spec.slice(1), "size");
  const size = sign === 0 ? amount : current + sign * amount;
  if (size <= 0) {
    throw new AddCowError(
      `invalid size ${spec}: the new size must be greater than 0 (the disk has ${current} bytes)`,
    );
  }
  return size;
}

/**
 * Resizes a disk at rest, open writable (`dev`, whose size is the old one;
 * close it afterwards without using it). The size of an add-cow disk is the
 * length of its image file, so this changes the image file and the bitmap:
 *
 * Growing (docs/specs/add-cow.md, "Growing a disk"): the new clusters must
 * read as zeros, also where the backing file is longer than the old disk (as
 * QEMU does for overlays since 5.1). In order, each step durable before the next:
 *  1. a partial last cluster still read from a longer backing gets its bytes
 *     copied (copy-on-write), so its new tail reads the image file's zeros;
 *  2. the bitmap grows, written for real (never a hole), and the bits of the
 *     new clusters that overlap the backing are set (all of them on an
 *     "all allocated" disk): still past the end of the disk, so nothing reads them;
 *  3. the image file grows: the new clusters exist, as zeros (a hole), and
 *     the bits set in 2 now say so.
 * A crash before 3 leaves the old disk, reading as before (with bits set past
 * its end, which `addcow check` reports until resize is run again); after 3
 * the new one.
 *
 * Shrinking (`shrink`) only cuts clusters the overlay does not hold: the
 * image file is cut first, then the bitmap.
 */
export async function resizeDisk(
  dev: AddCowDevice,
  newSize: number,
  opts: ResizeOptions = {},
): Promise<string> {
  const oldSize = dev.size;
  if (dev.readOnly) throw new AddCowError(`${dev.path} is open read-only`, { code: "EROFS" });
  if (!dev.image.truncate || !dev.meta.truncate) {
    throw new AddCowError(`${dev.path}: its files cannot change size here`, { code: "ENOTSUP" });
  }
  if (newSize === oldSize) {
    await setBitmapTail(dev, oldSize, oldSize);
    return `${dev.path} is ${formatSize(oldSize)} (${oldSize} bytes) already; nothing to do`;
  }
  if (newSize < oldSize) return shrink(dev, newSize, opts);

  const cs = dev.clusterSize;
  const oldClusters = dev.numClusters;
  // 1. A partial last cluster read from a longer backing: its bytes into the image file.
  const backingEnd = dev.allAllocated || !dev.backing ? 0 : dev.backing.size;
  if (oldSize % cs !== 0 && backingEnd > oldSize) {
    await dev.copyFromBacking(oldClusters - 1, oldClusters);
  }
  await dev.flush();
  // 2. The bitmap, grown and with the new overlapping clusters' bits set.
  await setBitmapTail(dev, oldSize, newSize);
  // 3. The disk grows.
  await dev.image.truncate!(newSize);
  await dev.image.sync();
  log.engine("%s: resized from %d to %d bytes", dev.path, oldSize, newSize);
  const overlap = Math.max(0, Math.min(newSize, backingEnd) - oldSize);
  const note =
    overlap > 0
      ? `; they read as zeros (${formatSize(overlap)} of them over the backing file's data, which is no longer seen there)`
      : "; they read as zeros";
  return `resized ${dev.path} from ${formatSize(oldSize)} to ${formatSize(newSize)} (${newSize} bytes): ${formatSize(newSize - oldSize)} added${note}`;
}

async function shrink(dev: AddCowDevice, newSize: number, opts: ResizeOptions): Promise<string> {
  const oldSize = dev.size;
  if (!opts.shrink) {
    throw new AddCowError(
      `${formatSize(newSize)} is smaller than ${dev.path} (${formatSize(oldSize)}): shrinking cuts the end of the disk off; add --shrink to do it`,
      { file: dev.path, reason: "invalid" },
    );
  }
  const cs = dev.clusterSize;
  // The overlay's own data is never cut: the new end may not fall before the end of its last cluster.
  const keep = Math.min(oldSize, Math.floor(newSize / cs) * cs);
  const held = await bytesOfKind(dev, ["data"], keep, oldSize);
  if (held > 0) {
    throw new AddCowError(
      `${dev.path} holds ${formatSize(held)} of its own data past ${formatSize(keep)}${dev.allAllocated ? ' (every cluster is allocated: "all allocated")' : ""}; resize --shrink cuts only clusters the overlay does not hold`,
      { file: dev.path, reason: "invalid" },
    );
  }
  await dev.flush();
  await dev.image.truncate!(newSize);
  await dev.image.sync();
  // The bitmap past the new end (all 0: nothing there was allocated) is cut too.
  const padded = bitmapBytes(Math.ceil(newSize / cs), dev.clusterBits).padded;
  await dev.meta.truncate!(dev.header.headerSize + padded);
  await dev.meta.sync();
  return `resized ${dev.path} from ${formatSize(oldSize)} to ${formatSize(newSize)} (${newSize} bytes): the last ${formatSize(oldSize - newSize)} are gone`;
}

/**
 * Writes the bitmap from the first bit past the old disk's last cluster to
 * its end (the longer of the file and the padded bitmap of `newSize`): the
 * bits of the clusters of [oldSize, newSize) that must read as zeros over the
 * backing set (or all, on an "all allocated" disk), every other one 0 (this
 * also clears bits a crashed grow to another size set). Written bytes, never
 * holes, then synced.
 */
async function setBitmapTail(dev: AddCowDevice, oldSize: number, newSize: number): Promise<void> {
  const cs = dev.clusterSize;
  const from = Math.ceil(oldSize / cs);
  const newClusters = Math.ceil(newSize / cs);
  const backingEnd = dev.allAllocated || !dev.backing ? 0 : dev.backing.size;
  const setEnd = dev.allAllocated ? newClusters : Math.min(newClusters, Math.ceil(backingEnd / cs));
  const base = dev.header.headerSize;
  const metaSize = await dev.meta.size();
  const end = Math.max(metaSize, base + bitmapBytes(newClusters, dev.clusterBits).padded);
  const first = base + Math.floor(from / 8);
  // The byte holding the old disk's last bits keeps those.
  const head = Buffer.alloc(1);
  if (first < metaSize) await dev.meta.read(head, first);
  const keepMask = (1 << (from % 8)) - 1;
  const chunk = Buffer.alloc(Math.min(1 << 20, end - first));
  for (let at = first; at < end; at += chunk.length) {
    const part = chunk.subarray(0, Math.min(chunk.length, end - at));
    part.fill(0);
    // Bits [from, setEnd) are set; bit c is bit c % 8 of byte c / 8 (after the header).
    for (let i = 0; i < part.length; i++) {
      const b = (at - base + i) * 8;
      if (b >= setEnd) break;
      const lo = Math.max(from, b) - b;
      const hi = Math.min(setEnd, b + 8) - b;
      if (lo < hi) part[i] = ((1 << hi) - 1) & ~((1 << lo) - 1);
    }
    if (at === first) part[0] = (part[0]! & ~keepMask) | (head[0]! & keepMask);
    await dev.meta.write(part, at);
  }
  await dev.meta.sync();
}

/** Resizes a disk at rest to SIZE, +SIZE or -SIZE (see resizeDisk). */
export function resizeAtRest(
  file: string,
  spec: string,
  opts: ResizeOptions = {},
  open: OpenOptions = {},
): Promise<string> {
  return withDiskAtRest(file, { ...open, writable: true }, (dev) =>
    resizeDisk(dev, parseResize(spec, dev.size), opts),
  );
}
