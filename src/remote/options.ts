import { AddCowError } from "../util/errors";
import { parseSize } from "../util/size";
import { CacheRoot, DEFAULT_CACHE_BYTES, defaultCacheRoot } from "./block-cache";
import { DEFAULT_REMOTE_OPTIONS, type RemoteDeviceOptions } from "./remote-device";
import { type VerifyMode, parseVerifyMode } from "./verify";

/**
 * Tuning of remote backings, from the environment (docs/remote.md); sizes in bytes
 * (suffixes K, M, G):
 *   ADDCOW_REMOTE_MIN_REQUEST smallest aligned range a miss fetches, 4K..block size (default 64K)
 *   ADDCOW_REMOTE_MAX_REQUEST most one range request asks for (default 8M)
 *   ADDCOW_REMOTE_READAHEAD   most fetched ahead of a sequential stream, 0 for none (default 8M)
 *   ADDCOW_REMOTE_BLOCK_SIZE  bytes of the object per cache block file, 64K..64M (default 1M)
 *   ADDCOW_REMOTE_TIMEOUT     seconds one attempt may take (default 30)
 *   ADDCOW_REMOTE_RETRIES     attempts after the first (default 4)
 *   ADDCOW_REMOTE_IN_FLIGHT   range requests at once (default 4)
 *   ADDCOW_CACHE_DIR          block cache root, or "none" (default /var/cache/addcow
 *                             for root, else $XDG_CACHE_HOME/addcow or ~/.cache/addcow)
 *   ADDCOW_CACHE_SIZE         cache size limit (default 8G)
 *   ADDCOW_VERIFY             auto (check blocks when a manifest is pinned) or required
 *                             (refuse a base without a manifest); -o verify= at mount wins
 */
export interface RemoteSettings {
  device: Partial<RemoteDeviceOptions>;
  cache: CacheRoot | null;
  /** Where credentials, endpoints and CA files are looked up. */
  env: NodeJS.ProcessEnv;
  /** Whether a manifest is required (verify.ts); an open's own option wins. */
  verify?: VerifyMode;
}

function number(
  env: NodeJS.ProcessEnv,
  name: string,
  min: number,
  max: number,
): number | undefined {
  const text = env[name];
  if (text === undefined || text === "") return undefined;
  const v = Number(text);
  if (!Number.isFinite(v) || v < min || v > max) {
    throw new AddCowError(`invalid ${name}=${text}: give a number from ${min} to ${max}`, {
      code: "EINVAL",
    });
  }
  return v;
}

function size(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const text = env[name];
  return text === undefined || text === "" ? undefined : parseSize(text, name);
}

function powerOfTwo(name: string, v: number, min: number, max: number, hint: string): number {
  if (v < min || v > max || (v & (v - 1)) !== 0) {
    throw new AddCowError(`invalid ${name}: ${v} bytes; give a power of two from ${hint}`, {
      code: "EINVAL",
    });
  }
  return v;
}

export function remoteSettingsFromEnv(env: NodeJS.ProcessEnv = process.env): RemoteSettings {
  const blockSize = powerOfTwo(
    "ADDCOW_REMOTE_BLOCK_SIZE",
    size(env, "ADDCOW_REMOTE_BLOCK_SIZE") ?? DEFAULT_REMOTE_OPTIONS.blockSize,
    65536,
    64 << 20,
    "64K to 64M",
  );
  const minRequest = powerOfTwo(
    "ADDCOW_REMOTE_MIN_REQUEST",
    size(env, "ADDCOW_REMOTE_MIN_REQUEST") ??
      Math.min(DEFAULT_REMOTE_OPTIONS.minRequestBytes, blockSize),
    4096,
    blockSize,
    `4K to the block size (ADDCOW_REMOTE_BLOCK_SIZE, ${blockSize} bytes)`,
  );
  const device: Partial<RemoteDeviceOptions> = { blockSize, minRequestBytes: minRequest };
  const timeout = number(env, "ADDCOW_REMOTE_TIMEOUT", 0.1, 3600);
  if (timeout !== undefined) device.timeoutMs = Math.round(timeout * 1000);
  const retries = number(env, "ADDCOW_REMOTE_RETRIES", 0, 100);
  if (retries !== undefined) device.retries = Math.floor(retries);
  const inFlight = number(env, "ADDCOW_REMOTE_IN_FLIGHT", 1, 64);
  if (inFlight !== undefined) device.maxInFlight = Math.floor(inFlight);
  const readahead = size(env, "ADDCOW_REMOTE_READAHEAD");
  if (readahead !== undefined) device.readaheadBytes = readahead;
  const maxRequest = size(env, "ADDCOW_REMOTE_MAX_REQUEST");
  if (maxRequest !== undefined) device.maxRequestBytes = Math.max(minRequest, maxRequest);
  const dir = env.ADDCOW_CACHE_DIR || defaultCacheRoot(env);
  const cache =
    dir === "none"
      ? null
      : new CacheRoot(dir, size(env, "ADDCOW_CACHE_SIZE") ?? DEFAULT_CACHE_BYTES);
  const verify = env.ADDCOW_VERIFY ? parseVerifyMode(env.ADDCOW_VERIFY, "ADDCOW_VERIFY=") : "auto";
  return { device, cache, env, verify };
}
