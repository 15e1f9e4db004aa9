import type { BackingFormat } from "../block/chain-opener";
import type { FileIO } from "../block/file-io";
import type { FileReplacer } from "../block/replace-file";
import { type AddCowHeader, FEATURE_BACKING_PIN, HEADER_ALIGN, encodeHeader } from "./header";
import { type PinRecord, type PinState, encodePinArea } from "./pin";

/** A new version of an .add-cow file: its header, how much of the old bitmap, its pin. */
export interface MetaRewrite {
  header: AddCowHeader;
  /** The old file's bitmap [HEADER_SIZE, copyEnd) is copied as it is on disk. */
  copyEnd: number;
  /** Changes the new file's bitmap after the copy (a grow writes its new bits). */
  editBitmap?: (aside: FileIO) => Promise<void>;
  /** The pin written after the bitmap (null: none, and feature bit 1 cleared). */
  pin: PinRecord | null;
  /** The current pin, whose generation the new one follows. */
  previous: PinState;
}

/**
 * Writes a new .add-cow file beside the old one: the header, the bitmap as it
 * is on disk, the pin extension (at a 4096-aligned offset after the bitmap),
 * synced, then renamed over the old one; after a crash it is the old file or
 * the new one, whole. Returns the new header and pin.
 */
export async function rewriteMetaFile(
  meta: FileIO,
  file: string,
  rw: MetaRewrite,
  replacer: FileReplacer,
): Promise<{ header: AddCowHeader; pin: PinState }> {
  const features = rw.pin
    ? rw.header.compatibleFeatures | FEATURE_BACKING_PIN
    : rw.header.compatibleFeatures & ~FEATURE_BACKING_PIN;
  const header: AddCowHeader = { ...rw.header, compatibleFeatures: features };
  const encoded = encodeHeader(header);
  const aside = await replacer.createBeside(file, meta);
  let pin: PinState = { kind: "none" };
  try {
    await aside.write(encoded, 0);
    const end = rw.copyEnd;
    const chunk = Buffer.alloc(Math.min(1 << 20, Math.max(1, end - encoded.length)));
    for (let at = encoded.length; at < end; at += chunk.length) {
      const n = await meta.read(chunk.subarray(0, Math.min(chunk.length, end - at)), at);
      // A bitmap shorter than the copy asked for (a file cut short) reads as zeros.
      if (n < Math.min(chunk.length, end - at)) chunk.fill(0, n);
      await aside.write(chunk.subarray(0, Math.min(chunk.length, end - at)), at);
    }
    if (rw.editBitmap) await rw.editBitmap(aside);
    if (rw.pin) {
      const size = await aside.size();
      const areaStart = Math.ceil(size / HEADER_ALIGN) * HEADER_ALIGN;
      const generation = rw.previous.kind === "pinned" ? rw.previous.generation + 1n : 1n;
      // Zeros up to the aligned start are written, never left a hole: they are bitmap bytes.
      await aside.write(Buffer.alloc(areaStart - size), size);
      await aside.write(encodePinArea(rw.pin, generation), areaStart);
      pin = { kind: "pinned", record: rw.pin, generation, slot: 0, areaStart };
    }
    await aside.sync();
    await replacer.replace(aside, file);
  } catch (err) {
    await replacer.discard(aside);
    throw err;
  }
  await aside.close();
  return { header, pin };
}

/** The same file with another backing name (or none) and that backing's pin (or none). */
export function withBacking(
  header: AddCowHeader,
  name: string | null,
  format: BackingFormat | null,
): AddCowHeader {
  return { ...header, backingName: name, backingFormat: format };
}
