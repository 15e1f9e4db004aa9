import { log } from "../util/log";
import { HttpSource } from "./http-source";
import { type RemoteSettings, remoteSettingsFromEnv } from "./options";
import { DEFAULT_REMOTE_OPTIONS, RemoteDevice } from "./remote-device";
import type { RangeSource } from "./source";
import { parseRemoteName } from "./url";

/** Opens a remote object (http://, https://, s3://) as a read-only block device. */
export async function openRemoteDevice(
  stored: string,
  settings: RemoteSettings = remoteSettingsFromEnv(),
): Promise<RemoteDevice> {
  const loc = parseRemoteName(stored);
  // The AWS SDK is loaded for s3:// only: it costs an http(s) base more start-up time than all the rest.
  const source: RangeSource =
    loc.scheme === "s3"
      ? new (await import("./s3-source")).S3Source(loc.bucket, loc.key, loc.name, settings.env)
      : new HttpSource(loc.url, loc.name, settings.env);
  try {
    const warn = settings.device.warn ?? DEFAULT_REMOTE_OPTIONS.warn;
    return await RemoteDevice.open(source, settings.device, (identity) => {
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
