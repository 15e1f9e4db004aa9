import type { BlockDevice } from "../block/block-device";
import type { BackingFormat, Namer } from "../block/chain-opener";
import type { FileReplacer } from "../block/replace-file";
import type { LayerIdentity } from "../block/layer-identity";
import type { PinState, PinStatus } from "./pin";

/**
 * What commands and jobs may ask of an add-cow layer beyond the block-device
 * verbs: facts about it and the few changes only the format can make safely
 * (allocating from the backing, the bitmap's bulk changes, growing, switching
 * the backing name). Nothing outside src/addcow touches its files or bits.
 */
export interface AddCowLayer extends BlockDevice {
  /** The .add-cow file. */
  readonly path: string;
  /**
   * Whose words the names in its header are, as the chain found when it
   * opened it: its owner, and who controls the way to it (null: opened
   * outside the chain, in tests). New names are judged for them.
   */
  readonly owner: Namer | null;
  /** Where its clusters live (resolved), and its backing's name (resolved) and format. */
  readonly imagePath: string;
  readonly backingPath: string | null;
  readonly backingFormat: BackingFormat | null;
  readonly clusterSize: number;
  readonly numClusters: number;
  /** Compatible feature "all allocated": the image file stands alone. */
  readonly allAllocated: boolean;
  /**
   * Copies clusters [c0, c1) that are still unallocated from the backing into
   * the image file, then sets their bits (the copy path of stream, rebase and
   * copy-on-read). `known` holds backing bytes already read. Returns the count.
   */
  copyFromBacking(
    c0: number,
    c1: number,
    scratch?: Buffer,
    known?: { buf: Buffer; pos: number },
  ): Promise<number>;
  countAllocated(): Promise<number>;
  /** Sets "all allocated" once every cluster is in the image file. */
  markAllAllocated(): Promise<void>;
  /** Clears every bit (commit, once the backing holds everything durably). */
  clearAllocation(): Promise<void>;
  /** Grows or shrinks the disk at rest (the device keeps its old size: close it after). */
  grow(newSize: number): Promise<void>;
  shrink(newSize: number): Promise<void>;
  /** Clears bits past the last cluster that a crashed grow left. */
  clearBitsPastEnd(): Promise<void>;
  /** The backing pin read at open (docs/specs/add-cow.md, "The backing pin"). */
  readonly pin: PinState;
  /**
   * Names another backing file (or none) in the header, by one rename, with
   * `identity` pinned for it (null: no pin; the disk keeps its id).
   */
  switchBacking(
    name: string | null,
    format: BackingFormat | null,
    replacer?: FileReplacer,
    identity?: LayerIdentity | null,
  ): Promise<void>;
  /** Replaces the pin of a pinned disk in place, crash-safely (commit changed the backing). */
  repin(identity: LayerIdentity, status?: PinStatus): Promise<void>;
  /** It became another layer's backing: flushed, then only read from now on. */
  retire(): Promise<void>;
}
