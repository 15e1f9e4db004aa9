import { waitingForExitingDaemon } from "../open/exiting-daemon";
import type { BlockDevice } from "../block/block-device";
import { AddCowDevice } from "../addcow/addcow-device";
import { type OpenOptions, openDisk } from "../open/open-disk";
import { FEATURE_ALL_ALLOCATED, KNOWN_COMPATIBLE, bitmapBytes } from "../addcow/header";

/**
 * `addcow info`: what a disk is made of. The JSON form of these types is a
 * stable interface documented in docs/cli.md; sizes are in bytes.
 */
export interface FileRef {
  /** The name as stored in the .add-cow header (relative names are relative to its directory). */
  stored: string;
  /** The absolute path it resolves to. */
  path: string;
}

export interface AddCowInfo {
  /** The .add-cow file as given (top layer) or as resolved (backing layers). */
  file: string;
  format: "add-cow";
  virtualSize: number;
  clusterSize: number;
  clusterBits: number;
  headerSize: number;
  /** Bytes of bitmap the disk needs (one bit per cluster) and the padded length in the file. */
  bitmapSize: number;
  bitmapPaddedSize: number;
  /** Length of the .add-cow file. */
  metadataFileSize: number;
  clusters: number;
  allocatedClusters: number;
  /** allocatedClusters * 100 / clusters, rounded down to two decimals; 0 for an empty disk. */
  allocatedPercent: number;
  image: FileRef & { format: "raw"; size: number };
  backing:
    | (FileRef & {
        format: "raw" | "add-cow";
        inUse: boolean;
        /** A remote backing (URL): size, identity, block size, cache state (RemoteDevice details). */
        remote?: Record<string, unknown>;
      })
    | null;
  /** Backing layers in use below this disk: 0 without a backing file or when all allocated. */
  chainDepth: number;
  features: {
    allAllocated: boolean;
    /** Bit numbers set in the compatible / incompatible feature fields. */
    compatibleBits: number[];
    incompatibleBits: number[];
    unknownCompatibleBits: number[];
  };
}

export interface RawLayerInfo {
  file: string;
  format: "raw";
  virtualSize: number;
  /** A remote layer's facts (see AddCowInfo.backing.remote). */
  remote?: Record<string, unknown>;
}

export type LayerInfo = (AddCowInfo | RawLayerInfo) & { depth: number };

export interface DiskInfo extends AddCowInfo {
  /** Only with --backing-chain: every layer below this disk, depth 1 = its backing file. */
  backingChain?: LayerInfo[];
}

function setBits(value: bigint): number[] {
  const bits: number[] = [];
  for (let i = 0; i < 64; i++) if ((value >> BigInt(i)) & 1n) bits.push(i);
  return bits;
}

export async function describeAddCow(dev: AddCowDevice, name: string): Promise<AddCowInfo> {
  const h = dev.header;
  const allocated = await dev.countAllocated();
  const bitmap = bitmapBytes(dev.numClusters, dev.clusterBits);
  let depth = 0;
  for (let layer = dev.backing; layer; depth++) {
    layer = layer instanceof AddCowDevice ? layer.backing : null;
  }
  return {
    file: name,
    format: "add-cow",
    virtualSize: dev.size,
    clusterSize: dev.clusterSize,
    clusterBits: dev.clusterBits,
    headerSize: h.headerSize,
    bitmapSize: bitmap.needed,
    bitmapPaddedSize: bitmap.padded,
    metadataFileSize: await dev.meta.size(),
    clusters: dev.numClusters,
    allocatedClusters: allocated,
    allocatedPercent:
      dev.numClusters === 0 ? 0 : Math.floor((allocated * 10000) / dev.numClusters) / 100,
    image: { stored: h.imageName, path: dev.imagePath, format: "raw", size: dev.size },
    backing:
      h.backingName === null
        ? null
        : {
            stored: h.backingName,
            path: dev.backingPath!,
            format: h.backingFormat!,
            inUse: dev.backing !== null,
            ...remoteDetails(dev.backing),
          },
    chainDepth: depth,
    features: {
      allAllocated: (h.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n,
      compatibleBits: setBits(h.compatibleFeatures),
      incompatibleBits: setBits(h.incompatibleFeatures),
      unknownCompatibleBits: setBits(h.compatibleFeatures & ~KNOWN_COMPATIBLE),
    },
  };
}

/** The remote facts of a backing layer, when it is remote. */
function remoteDetails(dev: BlockDevice | null): { remote?: Record<string, unknown> } {
  const details = dev?.describe().details;
  return details?.remote === true ? { remote: details } : {};
}

async function describeLayer(dev: BlockDevice, path: string, depth: number): Promise<LayerInfo> {
  if (dev instanceof AddCowDevice) return { ...(await describeAddCow(dev, dev.path)), depth };
  return { file: path, format: "raw", virtualSize: dev.size, depth, ...remoteDetails(dev) };
}

export interface InfoOptions {
  backingChain?: boolean;
  /** Open without taking locks (like qemu-img -U): the answer may be stale. */
  forceShare?: boolean;
}

/** Opens the disk read-only and describes it (and, when asked, every layer below it). */
export async function diskInfo(file: string, opts: InfoOptions = {}): Promise<DiskInfo> {
  const open: OpenOptions = { writable: false, lock: !opts.forceShare };
  const dev = await waitingForExitingDaemon(file, () => openDisk(file, open));
  try {
    const info: DiskInfo = await describeAddCow(dev, file);
    if (opts.backingChain) {
      info.backingChain = [];
      let depth = 1;
      let path = dev.backingPath;
      for (let layer = dev.backing; layer && path; depth++) {
        info.backingChain.push(await describeLayer(layer, path, depth));
        path = layer instanceof AddCowDevice ? layer.backingPath : null;
        layer = layer instanceof AddCowDevice ? layer.backing : null;
      }
    }
    return info;
  } finally {
    await dev.close();
  }
}
