import { AddCowError } from "../util/errors";
import { parseSize } from "../util/size";
import { CacheRoot, DEFAULT_CACHE_BYTES, defaultCacheRoot } from "./block-cache";
import { DEFAULT_REMOTE_OPTIONS, type RemoteDeviceOptions } from "./remote-device";

/**
 * Tuning of remote backings, from the environment (docs/remote.md):
 *   ADDCOW_REMOTE_BLOCK_SIZE  aligned read size, 64K..64M (default 1M)
 *   ADDCOW_REMOTE_TIMEOUT     seconds one attempt may take (default 30)
 *   ADDCOW_REMOTE_RETRIES     attempts after the first (default 4)
 *   ADDCOW_REMOTE_IN_FLIGHT   range requests at once (default 4)
 *   ADDCOW_REMOTE_READAHEAD   bytes fetched ahead of sequential readers (default 8M)
 *   ADDCOW_REMOTE_MAX_REQUEST bytes of adjacent blocks one request may ask for (default 8M)
 *   ADDCOW_CACHE_DIR          block cache root, or "none" (default /var/cache/addcow
 *                             for root, else $XDG_CACHE_HOME/addcow or ~/.cache/addcow)
 *   ADDCOW_CACHE_SIZE         cache size limit (default 8G)
 */
export interface RemoteSettings {
  device: Partial<RemoteDeviceOptions>;
  cache: CacheRoot | null;
  /** Where credentials, endpoints and CA files are looked up. */
  env: NodeJS.ProcessEnv;
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

export function remoteSettingsFromEnv(env: NodeJS.ProcessEnv = process.env): RemoteSettings {
  const blockSize = size(env, "ADDCOW_REMOTE_BLOCK_SIZE") ?? DEFAULT_REMOTE_OPTIONS.blockSize;
  if (blockSize < 65536 || blockSize > 64 << 20 || (blockSize & (blockSize - 1)) !== 0) {
    throw new AddCowError(
      `invalid ADDCOW_REMOTE_BLOCK_SIZE: ${blockSize} bytes; give a power of two from 64K to 64M`,
      { code: "EINVAL" },
    );
  }
  const timeout = number(env, "ADDCOW_REMOTE_TIMEOUT", 0.1, 3600);
  const readahead = size(env, "ADDCOW_REMOTE_READAHEAD");
  const device: Partial<RemoteDeviceOptions> = { blockSize };
  if (timeout !== undefined) device.timeoutMs = Math.round(timeout * 1000);
  const retries = number(env, "ADDCOW_REMOTE_RETRIES", 0, 100);
  if (retries !== undefined) device.retries = Math.floor(retries);
  const inFlight = number(env, "ADDCOW_REMOTE_IN_FLIGHT", 1, 64);
  if (inFlight !== undefined) device.maxInFlight = Math.floor(inFlight);
  if (readahead !== undefined) device.readaheadBlocks = Math.ceil(readahead / blockSize);
  const maxRequest = size(env, "ADDCOW_REMOTE_MAX_REQUEST");
  if (maxRequest !== undefined) {
    device.maxRequestBlocks = Math.max(1, Math.floor(maxRequest / blockSize));
  }
  const dir = env.ADDCOW_CACHE_DIR || defaultCacheRoot(env);
  const cache =
    dir === "none"
      ? null
      : new CacheRoot(dir, size(env, "ADDCOW_CACHE_SIZE") ?? DEFAULT_CACHE_BYTES);
  return { device, cache, env };
}
