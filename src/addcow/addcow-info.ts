import { type AddCowHeader, FEATURE_ALL_ALLOCATED, KNOWN_COMPATIBLE, bitmapBytes } from "./header";
import { type LayerIdentity, describeLayerIdentity } from "../block/layer-identity";
import type { PinState } from "./pin";

/**
 * The backing pin as info shows it: none (a disk made before pins, or
 * without a backing), the identity the backing must have, or why it cannot
 * be read.
 */
export type PinInfo =
  | { state: "none" }
  | {
      /** committing: a commit into the backing was interrupted; running it again re-pins. */
      state: "pinned" | "committing";
      /** This disk's own id, what a layer above pins of it. */
      disk: string;
      pinnedAt: string;
      identity: LayerIdentity;
      /** The identity in words. */
      description: string;
    }
  | { state: "unreadable"; reason: string };

export function describePin(p: PinState): PinInfo {
  if (p.kind === "none") return { state: "none" };
  if (p.kind === "unreadable") return { state: "unreadable", reason: p.why };
  const r = p.record;
  return {
    state: r.status,
    disk: r.disk,
    pinnedAt: r.pinnedAt,
    identity: r.identity,
    description: describeLayerIdentity(r.identity),
  };
}

/**
 * What `addcow info` says about one add-cow layer. The JSON form of these
 * types is a stable interface documented in docs/cli.md; sizes are in bytes.
 */
export interface FileRef {
  /** The name as stored in the .add-cow header (relative names are relative to its directory). */
  stored: string;
  /** The absolute path (or URL) it resolves to. */
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
        format: string;
        inUse: boolean;
        /** The backing layer's own facts (its describe().details): a remote base's identity and cache. */
        details?: Record<string, unknown>;
      })
    | null;
  /** Backing layers in use below this disk: 0 without a backing file or when all allocated. */
  chainDepth: number;
  /** The identity its backing must have (docs/specs/add-cow.md, "The backing pin"). */
  pin: PinInfo;
  features: {
    allAllocated: boolean;
    /** Bit numbers set in the compatible / incompatible feature fields. */
    compatibleBits: number[];
    incompatibleBits: number[];
    unknownCompatibleBits: number[];
  };
}

/** The facts describeAddCow needs; the device gathers them. */
export interface AddCowFacts {
  file: string;
  header: AddCowHeader;
  size: number;
  numClusters: number;
  allocatedClusters: number;
  metadataFileSize: number;
  imagePath: string;
  backingPath: string | null;
  backingInUse: boolean;
  backingDetails?: Record<string, unknown>;
  chainDepth: number;
  pin: PinState;
}

function setBits(value: bigint): number[] {
  const bits: number[] = [];
  for (let i = 0; i < 64; i++) if ((value >> BigInt(i)) & 1n) bits.push(i);
  return bits;
}

export function describeAddCow(f: AddCowFacts): AddCowInfo {
  const h = f.header;
  const bitmap = bitmapBytes(f.numClusters, h.clusterBits);
  const n = f.numClusters;
  return {
    file: f.file,
    format: "add-cow",
    virtualSize: f.size,
    clusterSize: 2 ** h.clusterBits,
    clusterBits: h.clusterBits,
    headerSize: h.headerSize,
    bitmapSize: bitmap.needed,
    bitmapPaddedSize: bitmap.padded,
    metadataFileSize: f.metadataFileSize,
    clusters: n,
    allocatedClusters: f.allocatedClusters,
    allocatedPercent: n === 0 ? 0 : Math.floor((f.allocatedClusters * 10000) / n) / 100,
    image: { stored: h.imageName, path: f.imagePath, format: "raw", size: f.size },
    backing:
      h.backingName === null
        ? null
        : {
            stored: h.backingName,
            path: f.backingPath!,
            format: h.backingFormat!,
            inUse: f.backingInUse,
            ...(f.backingDetails ? { details: f.backingDetails } : {}),
          },
    chainDepth: f.chainDepth,
    pin: describePin(f.pin),
    features: {
      allAllocated: (h.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n,
      compatibleBits: setBits(h.compatibleFeatures),
      incompatibleBits: setBits(h.incompatibleFeatures),
      unknownCompatibleBits: setBits(h.compatibleFeatures & ~KNOWN_COMPATIBLE),
    },
  };
}
