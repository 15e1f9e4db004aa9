import type { PinnedManifest } from "../block/layer-identity";
import { log } from "../util/log";
import { findManifest, loadPinnedManifest } from "./fetch-manifest";
import type { FoundManifest } from "./manifest";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";
import { HttpSource } from "./http-source";
import { type RemoteSettings, remoteSettingsFromEnv } from "./options";
import { DEFAULT_REMOTE_OPTIONS, RemoteDevice } from "./remote-device";
import type { RangeSource } from "./source";
import { parseRemoteName } from "./url";

/** How one remote base is opened: what the overlay's pin says, and what the chain allowed. */
export interface RemoteOpenOptions {
  /** The manifest the overlay was pinned with: fetched at open, its digest compared by the pin. */
  manifest?: PinnedManifest | null;
  /**
   * What may be contacted and with which credentials, as the chain decided it
   * (remote/access.ts); the operator's own URLs by default.
   */
  access?: RemoteAccess;
}

/**
 * One range source for a stored URL (http, https, s3), with credentials from
 * `env` where `access` lends them. The AWS SDK is loaded for s3:// only.
 */
export async function sourceFor(
  stored: string,
  env: NodeJS.ProcessEnv,
  access: RemoteAccess = OPERATOR_ACCESS,
): Promise<RangeSource> {
  const loc = parseRemoteName(stored);
  if (loc.scheme !== "s3") return new HttpSource(loc.url, loc.name, env, access);
  const { S3Source } = await import("./s3-source");
  return new S3Source(loc.bucket, loc.key, loc.name, env, access);
}

/**
 * The S3 endpoint requests go to, as the SDK picks it (ADDCOW_S3_ENDPOINT,
 * AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS in the region); null for http(s).
 */
export function s3Endpoint(stored: string, env: NodeJS.ProcessEnv): string | null {
  if (parseRemoteName(stored).scheme !== "s3") return null;
  const custom = env.ADDCOW_S3_ENDPOINT || env.AWS_ENDPOINT_URL_S3 || env.AWS_ENDPOINT_URL;
  return custom || `aws:${env.AWS_REGION || env.AWS_DEFAULT_REGION || "us-east-1"}`;
}

/**
 * Opens a remote object (http://, https://, s3://) as a read-only block
 * device, under `opts.access`: what the chain decided may be contacted and
 * with which credentials (the pinned manifest is fetched under it too).
 */
export async function openRemoteDevice(
  stored: string,
  settings: RemoteSettings = remoteSettingsFromEnv(),
  opts: RemoteOpenOptions = {},
): Promise<RemoteDevice> {
  const loc = parseRemoteName(stored);
  const access = opts.access ?? OPERATOR_ACCESS;
  const sources = (url: string, env: NodeJS.ProcessEnv) => sourceFor(url, env, access);
  const manifest = opts.manifest
    ? await loadPinnedManifest(loc.name, opts.manifest, settings, sources)
    : null;
  const source = await sources(stored, settings.env);
  const device = { ...settings.device, endpoint: s3Endpoint(stored, settings.env), manifest };
  try {
    const warn = settings.device.warn ?? DEFAULT_REMOTE_OPTIONS.warn;
    return await RemoteDevice.open(source, device, (identity) => {
      if (!settings.cache) return null;
      const blockSize = settings.device.blockSize ?? DEFAULT_REMOTE_OPTIONS.blockSize;
      try {
        return settings.cache.open(source.cacheKey, identity, blockSize, warn);
      } catch (err) {
        // A cache that cannot be used costs speed, not correctness.
        log.remote("cache %s unusable: %s", settings.cache.dir, (err as Error).message);
        return null;
      }
    });
  } catch (err) {
    await source.close().catch(() => undefined);
    throw err;
  }
}

/**
 * The manifest of the base at `stored` (at `location`, or `URL.manifest`),
 * with the credentials and settings of the environment; null when there is none.
 */
export function findRemoteManifest(
  stored: string,
  location: string | null,
  baseSize: number,
  settings: RemoteSettings = remoteSettingsFromEnv(),
): Promise<FoundManifest | null> {
  return findManifest(parseRemoteName(stored).name, location, baseSize, settings, sourceFor);
}
