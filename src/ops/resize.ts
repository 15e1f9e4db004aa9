import type { AddCowLayer } from "../addcow/addcow-layer";
import { withDiskAtRest } from "../chain/at-rest";
import type { OpenOptions } from "../chain/open-chain";
import { bytesOfKind } from "../block/extents";
import { AddCowError, readOnlyError } from "../util/errors";
import { formatSize, parseSize } from "../util/size";

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
 * length of its image file, so this changes the image file and the bitmap,
 * crash-ordered by the layer (AddCowDevice.grow: the new clusters read as
 * zeros, also where the backing file is longer, as QEMU does for overlays
 * since 5.1). Shrinking (`shrink`) only cuts clusters the overlay does not hold.
 */
export async function resizeDisk(
  dev: AddCowLayer,
  newSize: number,
  opts: ResizeOptions = {},
): Promise<string> {
  const oldSize = dev.size;
  if (dev.readOnly) throw readOnlyError(dev.path);
  if (newSize === oldSize) {
    await dev.clearBitsPastEnd();
    return `${dev.path} is ${formatSize(oldSize)} (${oldSize} bytes) already; nothing to do`;
  }
  if (newSize < oldSize) return shrink(dev, newSize, opts);
  const backingEnd = dev.allAllocated || !dev.backing ? 0 : dev.backing.size;
  await dev.grow(newSize);
  const overlap = Math.max(0, Math.min(newSize, backingEnd) - oldSize);
  const note =
    overlap > 0
      ? `; they read as zeros (${formatSize(overlap)} of them over the backing file's data, which is no longer seen there)`
      : "; they read as zeros";
  return `resized ${dev.path} from ${formatSize(oldSize)} to ${formatSize(newSize)} (${newSize} bytes): ${formatSize(newSize - oldSize)} added${note}`;
}

async function shrink(dev: AddCowLayer, newSize: number, opts: ResizeOptions): Promise<string> {
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
  await dev.shrink(newSize);
  return `resized ${dev.path} from ${formatSize(oldSize)} to ${formatSize(newSize)} (${newSize} bytes): the last ${formatSize(oldSize - newSize)} are gone`;
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
