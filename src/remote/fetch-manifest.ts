import type { PinnedManifest } from "../block/layer-identity";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { type FoundManifest, Manifest, defaultManifestLocation } from "./manifest";
import { DEFAULT_REMOTE_OPTIONS } from "./remote-device";
import type { RemoteSettings } from "./options";
import { type RangeSource, RemoteFailure, networkFailure } from "./source";
import { parseRemoteName } from "./url";

/** How a range source is made for a URL (open-remote-device.ts sourceFor). */
export type SourceFor = (stored: string, env: NodeJS.ProcessEnv) => Promise<RangeSource>;

/** A manifest is a few hundred KiB; anything much larger is not one. */
const MAX_MANIFEST_BYTES = 256 << 20;

/**
 * Fetches the file at `location` (a URL) whole, through a source made like
 * the base's (same credentials, CA file, endpoint), with the remote timeout
 * and retries. Returns null when it does not exist (HTTP 404, no such key).
 */
export async function fetchWhole(
  location: string,
  settings: RemoteSettings,
  sourceFor: SourceFor,
): Promise<Buffer | null> {
  const source = await sourceFor(location, settings.env);
  const timeoutMs = settings.device.timeoutMs ?? DEFAULT_REMOTE_OPTIONS.timeoutMs;
  const retries = settings.device.retries ?? DEFAULT_REMOTE_OPTIONS.retries;
  try {
    for (let attempt = 0; ; attempt++) {
      const signal = AbortSignal.timeout(timeoutMs);
      try {
        const id = await source.probe(signal);
        if (id.size > MAX_MANIFEST_BYTES) {
          throw new RemoteFailure(
            `${source.name}: ${id.size} bytes, too large for a manifest`,
            false,
          );
        }
        if (id.size === 0) return Buffer.alloc(0);
        return (await source.fetch(0, id.size, signal)).data;
      } catch (err) {
        const f = networkFailure(err, source.name, signal);
        if (f.code === "ENOENT") return null;
        if (!f.retryable || attempt >= retries) {
          throw new AddCowError(`remote ${f.message}`, {
            code: f.code,
            reason: "remote",
            file: source.name,
          });
        }
        log.remote("%s; attempt %d failed, trying again", f.message, attempt + 1);
        await new Promise((r) => setTimeout(r, Math.min(5000, 100 * 2 ** attempt)));
      }
    }
  } finally {
    await source.close().catch(() => undefined);
  }
}

/**
 * The manifest of the base at `baseUrl`: at `location`, or at `URL.manifest`
 * when location is null. Null when there is none there; a file that is not a
 * valid manifest, or one for a base of another size (when baseSize is
 * given), is an error.
 */
export async function findManifest(
  baseUrl: string,
  location: string | null,
  baseSize: number | null,
  settings: RemoteSettings,
  sourceFor: SourceFor,
): Promise<FoundManifest | null> {
  const where = parseRemoteName(location ?? defaultManifestLocation(baseUrl)).name;
  const bytes = await fetchWhole(where, settings, sourceFor);
  if (bytes === null) return null;
  const manifest = Manifest.parse(bytes, where);
  if (baseSize !== null && manifest.size !== baseSize) {
    throw new AddCowError(
      `manifest ${where} describes a base of ${manifest.size} bytes, but ${parseRemoteName(baseUrl).name} has ${baseSize}: it belongs to another version of the base; rebuild it with addcow manifest`,
      { code: "EINVAL", reason: "remote", file: where },
    );
  }
  log.remote(
    "%s: manifest %s, %d blocks of %d bytes",
    baseUrl,
    where,
    manifest.blocks,
    manifest.blockSize,
  );
  return { location: where, manifest, sha256: manifest.sha256 };
}

/**
 * The manifest an overlay was pinned with, fetched again at open: it must be
 * there and valid (whether it is the same file, the pin check decides by its
 * digest).
 */
export async function loadPinnedManifest(
  baseUrl: string,
  pinned: PinnedManifest,
  settings: RemoteSettings,
  sourceFor: SourceFor,
): Promise<FoundManifest> {
  // Its size is not compared here: a base of another size is the pin check's to report.
  const found = await findManifest(baseUrl, pinned.location, null, settings, sourceFor);
  if (found === null) {
    const where = pinned.location ?? defaultManifestLocation(baseUrl);
    throw new AddCowError(
      `remote backing ${parseRemoteName(baseUrl).name}: its manifest ${parseRemoteName(where).name}, pinned in the disk, is not found (HTTP 404): publish it again, or re-pin the disk without it (addcow rebase -u)`,
      { code: "ENOENT", reason: "remote", file: where },
    );
  }
  return found;
}
