import type { BlockDevice } from "../block/block-device";
import { FilterDevice } from "../block/filter-device";
import { log } from "../util/log";
import { OPERATOR_ACCESS } from "./access";
import { type RemoteOpenOptions, openRemoteDevice } from "./open-remote-device";
import { type RemoteSettings, remoteSettingsFromEnv } from "./options";
import type { Reader, RemoteDevice } from "./remote-device";
import { sameIdentity } from "./source";

/** A remote device open for one or more disks of this process. */
interface Shared {
  device: RemoteDevice;
  key: string;
  refs: number;
}

const open: Shared[] = [];
/** Environments told apart by identity: credentials come from them, so they are part of the key. */
const envIds = new WeakMap<NodeJS.ProcessEnv, number>();
let nextEnvId = 0;

/**
 * What must be equal for two opens to share a device: the object, how it is
 * read, the credentials, the manifest its disk was pinned with (what the
 * device says it is) and the one its blocks are checked against.
 */
function sharingKey(
  device: RemoteDevice,
  settings: RemoteSettings,
  opts: RemoteOpenOptions,
): string {
  let envId = envIds.get(settings.env);
  if (envId === undefined) envIds.set(settings.env, (envId = nextEnvId++));
  const { cache: _cache, warn: _warn, ...tuning } = settings.device;
  return JSON.stringify([
    device.name,
    tuning,
    settings.cache?.dir ?? null,
    envId,
    opts.manifest ?? null,
    device.verifiedBy?.sha256 ?? null,
  ]);
}

/**
 * Opens a remote base for a disk, sharing the device with the other disks of
 * this process that read the same object: overlays of one base in a host
 * daemon then fetch each block once and keep one memory cache for it, not
 * one per overlay. Every open probes the object as it is now (the identity
 * check a direct open makes); only a device of that same identity, opened
 * with the same settings and credentials, is shared, so a base that changed
 * on the server gets a new device instead of the one refusing the old one.
 * Each disk gets its own handle; the device closes with the last one.
 */
export async function openSharedRemoteDevice(
  stored: string,
  settings: RemoteSettings = remoteSettingsFromEnv(),
  opts: RemoteOpenOptions = {},
): Promise<BlockDevice> {
  const fresh = await openRemoteDevice(stored, settings, opts);
  // A tenant's URL is reached under its own decision (origins, credentials, addresses):
  // only the operator's own URLs share a device.
  if (opts.access !== undefined && opts.access !== OPERATOR_ACCESS) return fresh;
  const key = sharingKey(fresh, settings, opts);
  const same = open.find(
    (s) => s.key === key && sameIdentity(s.device.objectIdentity, fresh.objectIdentity),
  );
  if (same) {
    await fresh.close();
    same.refs++;
    log.remote("%s: shared by %d disks", same.device.name, same.refs);
    return new SharedRemote(same);
  }
  const shared: Shared = { device: fresh, key, refs: 1 };
  open.push(shared);
  return new SharedRemote(shared);
}

/**
 * One disk's handle on a shared remote device: its reads have a pattern of
 * their own (streams, read-around); closing it closes the device only if it
 * was the last.
 */
class SharedRemote extends FilterDevice {
  private closed = false;
  private readonly reader: Reader;

  constructor(private readonly shared: Shared) {
    super(shared.device);
    this.reader = shared.device.newReader();
  }

  override read(buf: Buffer, offset: number): Promise<void> {
    return this.shared.device.readAs(this.reader, buf, offset);
  }

  override async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (--this.shared.refs > 0) return;
    open.splice(open.indexOf(this.shared), 1);
    await this.shared.device.close();
  }
}

/** How many remote devices are open, and for how many disks (tests, `addcow info` of a host). */
export function sharedRemoteCount(): { devices: number; handles: number } {
  return { devices: open.length, handles: open.reduce((n, s) => n + s.refs, 0) };
}
