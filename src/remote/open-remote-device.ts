import type { PinnedManifest } from "../block/layer-identity";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import type { ObjectCache } from "./block-cache";
import { openDigestCache } from "./digest-store";
import { type SourceFor, findManifest, loadPinnedManifest } from "./fetch-manifest";
import { type FoundManifest, defaultManifestLocation } from "./manifest";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";
import { HttpSource } from "./http-source";
import { type RemoteSettings, remoteSettingsFromEnv } from "./options";
import { DEFAULT_REMOTE_OPTIONS, RemoteDevice } from "./remote-device";
import type { ObjectIdentity, RangeSource } from "./source";
import { parseRemoteName } from "./url";
import { BlockVerifier, type VerifyMode } from "./verify";

/** How one remote base is opened: what the overlay's pin says, and what the chain allowed. */
export interface RemoteOpenOptions {
  /** The manifest the overlay was pinned with: fetched at open, its digest compared by the pin. */
  manifest?: PinnedManifest | null;
  /**
   * What may be contacted and with which credentials, as the chain decided it
   * (remote/access.ts); the operator's own URLs by default.
   */
  access?: RemoteAccess;
  /** Whether a manifest is required (default: settings.verify, from ADDCOW_VERIFY; else auto). */
  verify?: VerifyMode;
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
 * The manifest blocks are checked against: the pinned one (fetched again,
 * it must be there), else with verify=required the one at `URL.manifest`,
 * which must exist; else none.
 */
async function manifestToCheck(
  name: string,
  settings: RemoteSettings,
  opts: RemoteOpenOptions,
  sources: SourceFor,
): Promise<FoundManifest | null> {
  if (opts.manifest) return loadPinnedManifest(name, opts.manifest, settings, sources);
  if ((opts.verify ?? settings.verify ?? "auto") !== "required") return null;
  const found = await findManifest(name, null, null, settings, sources);
  if (found !== null) return found;
  const where = parseRemoteName(defaultManifestLocation(name)).name;
  throw new AddCowError(
    `remote backing ${name}: verification is required (verify=required) but it has no manifest: none is pinned in the disk and none is published at ${where} (HTTP 404); publish one there (addcow manifest ${name}), or open without verify=required`,
    { code: "ENOENT", reason: "remote", file: where },
  );
}

/**
 * Opens a remote object (http://, https://, s3://) as a read-only block
 * device, under `opts.access`: what the chain decided may be contacted and
 * with which credentials (its manifest is fetched under it too).
 */
export async function openRemoteDevice(
  stored: string,
  settings: RemoteSettings = remoteSettingsFromEnv(),
  opts: RemoteOpenOptions = {},
): Promise<RemoteDevice> {
  const loc = parseRemoteName(stored);
  const access = opts.access ?? OPERATOR_ACCESS;
  const sources: SourceFor = (url, env) => sourceFor(url, env, access);
  const checked = await manifestToCheck(loc.name, settings, opts, sources);
  const pinned = opts.manifest ? checked : null;
  const source = await sources(stored, settings.env);
  const warn = settings.device.warn ?? DEFAULT_REMOTE_OPTIONS.warn;
  const verifier = checked === null ? null : new BlockVerifier(checked, source.name, warn);
  const device = {
    ...settings.device,
    endpoint: s3Endpoint(stored, settings.env),
    manifest: pinned,
    verifier,
  };
  try {
    // Blocks by digest are shared by every base on this host: a tenant's URL does not
    // use that store, or its server could learn which blocks other disks read here.
    const shared = access === OPERATOR_ACCESS ? verifier : null;
    return await RemoteDevice.open(source, device, (identity) =>
      cacheFor(source, identity, settings, shared, warn),
    );
  } catch (err) {
    await source.close().catch(() => undefined);
    throw err;
  }
}

/**
 * The persistent cache of an object: with a manifest (`verifier`), its blocks
 * by digest (shared with every base and version that holds them); else the
 * entry of this source and identity.
 */
function cacheFor(
  source: RangeSource,
  identity: ObjectIdentity,
  settings: RemoteSettings,
  verifier: BlockVerifier | null,
  warn: (message: string) => void,
): ObjectCache | null {
  if (!settings.cache) return null;
  try {
    if (verifier) return openDigestCache(settings.cache, verifier.found.manifest, warn);
    const blockSize = settings.device.blockSize ?? DEFAULT_REMOTE_OPTIONS.blockSize;
    return settings.cache.open(source.cacheKey, identity, blockSize, warn);
  } catch (err) {
    // A cache that cannot be used costs speed, not correctness.
    log.remote("cache %s unusable: %s", settings.cache.dir, (err as Error).message);
    return null;
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
