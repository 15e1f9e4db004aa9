import type { BackingFormat } from "../block/chain-opener";
import type { FileIO } from "../block/file-io";
import type { FileReplacer } from "../block/replace-file";
import { type AddCowHeader, encodeHeader } from "./header";

/**
 * A new .add-cow file beside the old one with another backing name (or
 * none): the new header, then the bitmap as it is on disk, synced, renamed
 * over the old one; after a crash it is the old file or the new one, never a
 * mix of the two names. Returns the new header.
 */
export async function rewriteWithBacking(
  meta: FileIO,
  file: string,
  header: AddCowHeader,
  name: string | null,
  format: BackingFormat | null,
  replacer: FileReplacer,
): Promise<AddCowHeader> {
  const next: AddCowHeader = { ...header, backingName: name, backingFormat: format };
  const encoded = encodeHeader(next);
  const aside = await replacer.createBeside(file, meta);
  try {
    await aside.write(encoded, 0);
    const size = await meta.size();
    const chunk = Buffer.alloc(Math.min(1 << 20, Math.max(1, size - encoded.length)));
    for (let at = encoded.length; at < size; at += chunk.length) {
      const n = await meta.read(chunk.subarray(0, Math.min(chunk.length, size - at)), at);
      await aside.write(chunk.subarray(0, n), at);
    }
    await aside.sync();
    await replacer.replace(aside, file);
  } catch (err) {
    await replacer.discard(aside);
    throw err;
  }
  await aside.close();
  return next;
}
