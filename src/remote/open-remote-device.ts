import { log } from "../util/log";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";
import { HttpSource } from "./http-source";
import { type RemoteSettings, remoteSettingsFromEnv } from "./options";
import { RemoteDevice } from "./remote-device";
import { S3Source } from "./s3-source";
import type { RangeSource } from "./source";
import { parseRemoteName } from "./url";

/**
 * Opens a remote object (http://, https://, s3://) as a read-only block
 * device, under `access`: what the chain decided may be contacted and with
 * which credentials (remote/access.ts).
 */
export async function openRemoteDevice(
  stored: string,
  settings: RemoteSettings = remoteSettingsFromEnv(),
  access: RemoteAccess = OPERATOR_ACCESS,
): Promise<RemoteDevice> {
  const loc = parseRemoteName(stored);
  const source: RangeSource =
    loc.scheme === "s3"
      ? new S3Source(loc.bucket, loc.key, loc.name, settings.env, access)
      : new HttpSource(loc.url, loc.name, settings.env, access);
  try {
    return await RemoteDevice.open(source, settings.device, (identity) => {
      if (!settings.cache) return null;
      try {
        return settings.cache.open(loc.name, identity, settings.device.blockSize ?? 1 << 20);
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
