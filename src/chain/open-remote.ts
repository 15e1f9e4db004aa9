import type { BackingFormat } from "../block/chain-opener";
import type { BlockDevice } from "../block/block-device";
import { AddCowError } from "../util/errors";
import type { RemoteSettings } from "../remote/options";
import type { RemoteOpenOptions } from "../remote/open-remote-device";
import { displayName } from "../remote/url";
import { log } from "../util/log";
import type { UrlDecision } from "./url-policy";

/**
 * A backing name that is a URL: a read-only remote device. Only raw remote
 * bases are supported (a remote add-cow would need its image file named
 * relative to a URL); commit can never write into a remote base.
 */
export async function openRemoteBacking(
  url: string,
  format: BackingFormat,
  writable: boolean,
  namedIn: string | undefined,
  settings: RemoteSettings | undefined,
  decision: UrlDecision,
  pinned: Pick<RemoteOpenOptions, "manifest"> = {},
): Promise<BlockDevice> {
  const where = namedIn ? ` (named in ${namedIn})` : "";
  const name = displayName(url);
  if (format !== "raw") {
    throw new AddCowError(
      `backing file ${name}${where} is remote with format ${format}: only raw remote bases are supported; stream or convert it to a raw image first`,
      { code: "EINVAL", reason: "remote", file: name },
    );
  }
  if (writable) {
    throw new AddCowError(
      `backing file ${name}${where} is remote and read-only: it cannot be written (commit needs a local backing file)`,
      { code: "EROFS", reason: "remote", file: name },
    );
  }
  // Loaded only when a disk needs it: the HTTP and S3 clients cost more start-up
  // time than the rest of addcow, and most disks never use them. Disks of one
  // process over the same base share its device (fetches and memory cache).
  const { openSharedRemoteDevice } = await import("../remote/shared-remote");
  try {
    // No settings: the default, from the environment.
    return await openSharedRemoteDevice(url, settings, { ...pinned, access: decision.access });
  } catch (err) {
    if (!decision.quiet || !(err instanceof AddCowError) || err.reason !== "remote") throw err;
    // Allowed by the wildcard only: how a server a tenant named answered is not for the tenant.
    log.remote("%s: %s", name, err.message);
    throw new AddCowError(
      `remote backing ${name}${where} cannot be used; what its server answered is not shown for another user's disk (list its origin with --allow-url ORIGIN to see it, or trace with DEBUG=addcow:remote)`,
      { code: "EIO", reason: "remote", file: name },
    );
  }
}
