import type { FileIO } from "../block/file-io";
import { bitmapBytes } from "./header";

/**
 * Writes the bitmap from the first bit of cluster `from` to its end (the
 * longer of `area.end`, where the bitmap area ends now, and the padded bitmap
 * of `clusters`; only up to `area.end` unless `area.grow`: a pin extension
 * follows): bits [from, setEnd) set, every other one 0 (this also clears bits
 * a crashed grow to another size left). Bits below `from` are kept. Written
 * bytes, never holes, then synced: setting a bit later must never need a new block.
 */
export async function writeBitmapTail(
  meta: FileIO,
  headerSize: number,
  clusterBits: number,
  from: number,
  setEnd: number,
  clusters: number,
  area: { end: number; grow: boolean },
): Promise<void> {
  const metaSize = await meta.size();
  const padded = headerSize + bitmapBytes(clusters, clusterBits).padded;
  const end = area.grow ? Math.max(area.end, padded) : area.end;
  const first = headerSize + Math.floor(from / 8);
  // The byte holding the bits below `from` keeps those.
  const head = Buffer.alloc(1);
  if (first < metaSize) await meta.read(head, first);
  const keepMask = (1 << (from % 8)) - 1;
  const chunk = Buffer.alloc(Math.min(1 << 20, Math.max(1, end - first)));
  for (let at = first; at < end; at += chunk.length) {
    const part = chunk.subarray(0, Math.min(chunk.length, end - at));
    part.fill(0);
    // Bits [from, setEnd) are set; bit c is bit c % 8 of byte c / 8 (after the header).
    for (let i = 0; i < part.length; i++) {
      const b = (at - headerSize + i) * 8;
      if (b >= setEnd) break;
      const lo = Math.max(from, b) - b;
      const hi = Math.min(setEnd, b + 8) - b;
      if (lo < hi) part[i] = ((1 << hi) - 1) & ~((1 << lo) - 1);
    }
    if (at === first) part[0] = (part[0]! & ~keepMask) | (head[0]! & keepMask);
    await meta.write(part, at);
  }
  await meta.sync();
}
