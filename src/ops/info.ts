import type { BlockDevice } from "../block/block-device";
import type { AddCowInfo } from "../addcow/addcow-info";
import { waitingForExitingDaemon } from "../chain/exiting-daemon";
import { type OpenOptions, openDisk } from "../chain/open-chain";
import { type Confinement, type ConfinementInfo, confinementOf } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";

export type { AddCowInfo, FileRef } from "../addcow/addcow-info";

/**
 * `addcow info`: what a disk is made of. The top layer is always an add-cow
 * disk; the layers below may be of any format and describe themselves
 * (describe() and, where it costs I/O, info()).
 */
export interface OtherLayerInfo {
  file: string;
  format: string;
  virtualSize: number;
  [detail: string]: unknown;
}

export type LayerInfo = (AddCowInfo | OtherLayerInfo) & { depth: number };

export interface DiskInfo extends AddCowInfo {
  /**
   * How the disk was opened for this answer: with confinement (--confine), the
   * directories every name had to resolve inside and whether URL backings were
   * allowed; null without.
   */
  confinement: ConfinementInfo | null;
  /** Only with --backing-chain: every layer below this disk, depth 1 = its backing file. */
  backingChain?: LayerInfo[];
}

async function describeLayer(dev: BlockDevice, depth: number): Promise<LayerInfo> {
  const d = dev.describe();
  const facts = await dev.info();
  return { file: d.name, format: d.format, virtualSize: dev.size, ...facts, depth } as LayerInfo;
}

export interface InfoOptions {
  backingChain?: boolean;
  /** Open without taking locks (like qemu-img -U): the answer may be stale. */
  forceShare?: boolean;
  /** Confinement for the names in headers (docs/security.md). */
  confine?: Confinement | null;
  /** The operator's URL rules (chain/url-policy.ts). */
  urls?: UrlRules;
}

/** Opens the disk read-only and describes it (and, when asked, every layer below it). */
export async function diskInfo(file: string, opts: InfoOptions = {}): Promise<DiskInfo> {
  const open: OpenOptions = {
    writable: false,
    lock: !opts.forceShare,
    confine: opts.confine,
    ...(opts.urls ? { urls: opts.urls } : {}),
  };
  const dev = await waitingForExitingDaemon(file, () => openDisk(file, open), { forceShare: true });
  try {
    const info: DiskInfo = {
      ...(await dev.info()),
      file,
      confinement: opts.confine ? confinementOf(file, opts.confine, dev.owner?.dir) : null,
    };
    if (opts.backingChain) {
      info.backingChain = [];
      let depth = 1;
      for (let layer = dev.backing; layer; layer = layer.backing) {
        info.backingChain.push(await describeLayer(layer, depth++));
      }
    }
    return info;
  } finally {
    await dev.close();
  }
}
