import type { AddCowHeader } from "../addcow/header";
import type { PinState } from "../addcow/pin";
import type { FileIO } from "../block/file-io";
import type { Confinement, Namer } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";

/**
 * The shared parts of `addcow check` (ops/check.ts): verifies an add-cow disk without modifying anything. The
 * checks are a list of independent steps sharing a context; a step that needs
 * something an earlier step could not establish (e.g. a valid header) skips.
 * Findings of severity "corruption" make the exit code 2; "warning"s do not.
 */
export type Severity = "corruption" | "warning";

export interface Finding {
  severity: Severity;
  /** The file the problem is in. */
  file: string;
  /** Byte offset in that file, when the problem has one. */
  offset: number | null;
  /** What part of the file: "magic", "cluster_bits", "bitmap", "image file", ... */
  field: string;
  message: string;
}

export interface CheckContext {
  /** The .add-cow file as given, and its absolute path. */
  file: string;
  path: string;
  fd: number;
  /** The same open file, for readers that take a FileIO. */
  io: FileIO;
  /** Device and inode of the .add-cow file opened. */
  selfId: string;
  fileSize: number;
  /** The backing pin (feature bit 1) and where the bitmap ends: at the pin, else at fileSize. */
  pin: PinState;
  bitmapEnd: number;
  forceShare: boolean;
  /** The .add-cow file and its owner: the names in its header are judged for that user. */
  namer: Namer;
  confine: Confinement | null;
  /** The operator's URL rules (chain/url-policy.ts). */
  urls?: UrlRules;
  header: AddCowHeader | null;
  allAllocated: boolean;
  imagePath: string | null;
  imageSize: number | null;
  imageId: string | null;
  numClusters: number | null;
  /** Bytes of bitmap present in the file (may be fewer than needed). */
  bitmapPresent: number;
  allocatedClusters: number | null;
  findings: Finding[];
  report(f: Omit<Finding, "file"> & { file?: string }): void;
}

export interface CheckStep {
  name: string;
  run(ctx: CheckContext): Promise<void> | void;
}
