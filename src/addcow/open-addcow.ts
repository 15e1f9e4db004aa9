import type { BlockDevice } from "../block/block-device";
import type { ChainOpener, Namer, ResolvedName } from "../block/chain-opener";
import type { FileIO } from "../block/file-io";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import { AddCowDevice, type CacheMode } from "./addcow-device";
import { reserveBitmap } from "./bitmap-space";
import {
  type AddCowHeader,
  FEATURE_ALL_ALLOCATED,
  FIXED_HEADER_SIZE,
  bitmapBytes,
  decodeFixedHeader,
  decodeHeader,
} from "./header";
import { type PinState, checkPin, readPinState } from "./pin";

/** How one add-cow layer is opened; the chain fills it in. */
export interface AddCowOpenRequest {
  /** The layer's .add-cow file, as the chain resolved it. */
  name: ResolvedName;
  writable: boolean;
  /** The file whose header names this layer (absent for the disk the user named). */
  namer?: Namer;
  /**
   * Where its backing comes from: opened by the chain (read-only, or writable
   * for commit), an already open device (a live snapshot stacks a new layer
   * on the open disk), or none at all (`rebase -u`: the named backing may be gone).
   */
  backing: "open" | "open-writable" | "none" | { device: BlockDevice };
  cacheMode?: CacheMode;
  bitmapCacheBytes?: number;
  copyOnRead?: boolean;
}

/** Reads and validates the header of an open .add-cow file. */
export async function readHeader(meta: FileIO, file: string): Promise<AddCowHeader> {
  const fileSize = await meta.size();
  const fixed = Buffer.alloc(FIXED_HEADER_SIZE);
  const n = await meta.read(fixed, 0);
  const f = decodeFixedHeader(fixed.subarray(0, n), file, fileSize);
  const full = Buffer.alloc(f.headerSize);
  await meta.read(full, 0);
  return decodeHeader(full, file, fileSize);
}

/**
 * Opens one add-cow layer and, through the chain, everything below it. Its
 * names are judged before anything is opened, and nothing is opened for
 * writing before every layer below has passed: the .add-cow file is read
 * first and reopened for writing last, the image file opened after the
 * backing chain.
 */
export async function openAddCow(
  chain: ChainOpener,
  req: AddCowOpenRequest,
): Promise<AddCowDevice> {
  const { writable, namer } = req;
  const file = req.name.path;
  chain.enterLayer(file, namer?.file);
  const access = writable ? "write" : "read";
  const layerFile = await chain.openLayerFile(req.name, "add-cow file", access, namer);
  let meta = layerFile.io;
  // Names in this header are this file's owner's words: judged for that user too.
  const layer = layerFile.owner;
  const header = await readHeader(meta, file);
  const pin = await readPinState(meta, header, await meta.size());
  log.open(
    "%s: cluster_bits %d, image %s, backing %s",
    file,
    header.clusterBits,
    header.imageName,
    header.backingName,
  );

  const imageName = chain.resolve(layer, header.imageName);
  const imagePath = imageName.path;
  const imageFile = await chain.judgeNamedFile(imageName, "image file", access, layer);

  const allAllocated = (header.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n;
  let backing: BlockDevice | null = null;
  let backingPath: string | null = null;
  if (header.backingName !== null) {
    const backingName = chain.backingName(layer, header.backingName);
    backingPath = backingName.path;
    if (typeof req.backing === "object") {
      backing = req.backing.device;
    } else if (req.backing !== "none" && !allAllocated) {
      // With every cluster allocated the backing file is never read: it may be gone.
      const writableBacking = writable && req.backing === "open-writable";
      const pinned = pin.kind === "pinned" ? pin.record.identity : null;
      backing = await chain.openBacking(
        backingName,
        header.backingFormat!,
        layer,
        writableBacking,
        pinned,
      );
    }
    // Never put this disk on another base than the one it was made on without being told.
    if (backing) checkPin(file, header, backingPath, pin, await backing.identity());
  }

  const image = await imageFile.open();
  if (writable) meta = await layerFile.reopenForWriting();
  const imageSize = await image.size();
  if (!allAllocated) {
    const bitmapEnd = bitmapAreaEnd(pin, await meta.size());
    checkBitmapLength(file, header, bitmapEnd, imagePath, imageSize);
    // Setting bits must never need new blocks: fill holes in the bitmap before any use.
    if (writable) await reserveBitmap(meta, file, header.headerSize, bitmapEnd);
  }

  return new AddCowDevice({
    path: file,
    header,
    meta,
    image,
    imageSize,
    backing,
    imagePath,
    backingPath,
    pin,
    owner: layer,
    cacheMode: req.cacheMode,
    bitmapCacheBytes: req.bitmapCacheBytes,
    copyOnRead: writable && req.copyOnRead === true,
  });
}

/** Where the bitmap ends: at the pin extension, or at the end of the file. */
export function bitmapAreaEnd(pin: PinState, metaSize: number): number {
  return pin.kind === "pinned" ? pin.areaStart : metaSize;
}

/**
 * The bitmap must cover every cluster of the disk (the image file's length). A
 * longer bitmap is accepted: the disk is as long as the image file, and bits
 * past its last cluster are ignored like padding (`addcow check` reports an
 * image file shorter than its bitmap, and set bits past the end).
 */
function checkBitmapLength(
  file: string,
  header: AddCowHeader,
  bitmapEnd: number,
  imagePath: string,
  imageSize: number,
): void {
  const numClusters = Math.ceil(imageSize / 2 ** header.clusterBits);
  const { needed } = bitmapBytes(numClusters, header.clusterBits);
  const have = bitmapEnd - header.headerSize;
  if (have < needed) {
    throw new AddCowError(
      `${file}: bitmap is ${have} bytes, shorter than the ${needed} bytes the disk needs for image file ${imagePath} (${imageSize} bytes, ${numClusters} clusters); the .add-cow file is truncated or the image file was grown: restore the original files`,
      { file, code: "EINVAL" },
    );
  }
}
