import type { BackingFormat } from "../block/chain-opener";
import type { AddCowLayer } from "../addcow/addcow-layer";
import type { BlockDevice } from "../block/block-device";
import { bytesOfKind, readSkippingZeros, readSparse } from "../block/extents";
import { type FileReplacer, posixReplacer } from "../block/replace-file";
import { AddCowError, readOnlyError } from "../util/errors";
import { formatSize } from "../util/size";
import { log } from "../util/log";
import { CopyEngine, type CopyOptions } from "./copy-engine";
import type { Job } from "./job";
import { findRun } from "./scan";
import { streamDisk } from "./stream";
import type { LayerIdentity } from "../block/layer-identity";
import { repinWarning, warnOnStderr } from "./rebase-pin";

/** Where a disk is rebased to: a backing disk, opened read-only, or none. */
export interface RebaseTarget {
  /** The name stored in the header (relative names are relative to the .add-cow file). */
  name: string;
  format: BackingFormat;
  device: BlockDevice;
  /** Its path or URL, for messages. */
  path: string;
  /** It is the disk's current backing, by another name: nothing can differ. */
  sameAsCurrent?: boolean;
  /** What the disk pins of it (docs/specs/add-cow.md, "The backing pin"). */
  identity: LayerIdentity | null;
}

export interface RebaseOptions extends CopyOptions {
  /** How the .add-cow file is replaced (tests record it). */
  replacer?: FileReplacer;
  /** Where `-u`'s warning about a re-pinned base goes (default stderr). */
  warn?: (message: string) => void;
}

/**
 * Safe rebase (`addcow rebase -b NEW -F FMT`): afterwards the disk reads its
 * unallocated clusters from NEW and still reads exactly as before. Every
 * cluster the overlay does not hold (block status) is read from the old
 * chain and from NEW; where they differ, the old bytes are copied into the
 * image file and the cluster's bit set (copyFromBacking: data durable before
 * the bit, zeros kept sparse). Only once every copied cluster and bit is
 * durable does the header name NEW (switchBacking: one rename). A crash
 * before that leaves the old disk with some clusters allocated that read as
 * before; a crash after it, the rebased disk; running it again finishes
 * either (the clusters copied are not compared again).
 */
export async function rebaseDisk(
  dev: AddCowLayer,
  target: RebaseTarget | null,
  job: Job,
  opts: RebaseOptions = {},
): Promise<string> {
  if (dev.readOnly) throw readOnlyError(dev.path);
  const replacer = opts.replacer ?? posixReplacer;
  if (target === null) return makeStandalone(dev, job, opts, replacer);
  let copied = 0;
  if (!dev.allAllocated && dev.backing && !target.sameAsCurrent) {
    const outcome = await copyDifferences(dev, target.device, job, opts, (n) => (copied += n));
    if (outcome === "cancelled") {
      return `rebase of ${dev.path} stopped; it still reads from its old backing file, and the ${formatSize(copied)} copied so far are kept: run it again to finish`;
    }
  }
  await dev.switchBacking(target.name, target.format, replacer, target.identity);
  const what =
    copied > 0
      ? `${formatSize(copied)} that read differently from it were copied into image file ${dev.imagePath}`
      : "nothing had to be copied";
  return `${dev.path} now has backing file ${target.path} (${target.format}); ${what}, and it reads exactly as before`;
}

/** `-b ''`: the disk stands alone. Stream (sparse), then the header names no backing file. */
async function makeStandalone(
  dev: AddCowLayer,
  job: Job,
  opts: CopyOptions,
  replacer: FileReplacer,
): Promise<string> {
  if (dev.backingPath === null) {
    return `${dev.path} has no backing file already: nothing to do`;
  }
  const streamed = await streamDisk(dev, job, opts);
  if (!dev.allAllocated) return streamed;
  await dev.switchBacking(null, null, replacer);
  return `${dev.path} has no backing file now: every cluster is in image file ${dev.imagePath}, a standalone raw disk`;
}

/**
 * Compares the clusters the overlay does not hold between the old chain (what
 * the disk reads now) and the new backing, and copies the old bytes of those
 * that differ into the overlay. Returns the engine's outcome.
 */
async function copyDifferences(
  dev: AddCowLayer,
  next: BlockDevice,
  job: Job,
  opts: CopyOptions,
  onCopied: (bytes: number) => void,
) {
  const cs = dev.clusterSize;
  const total = await bytesOfKind(dev, ["backing", "zero"]);
  // The engine hands each copy one buffer (the old bytes); the new bytes get a twin.
  const twins = new Map<Buffer, Buffer>();
  const engine = new CopyEngine(
    {
      clusterSize: cs,
      numClusters: dev.numClusters,
      size: dev.size,
      findRun: (from, maxLen) =>
        findRun(dev, cs, from, dev.numClusters, ["backing", "zero"], maxLen),
      copy: async (c0, c1, buf) => {
        const start = c0 * cs;
        const stop = Math.min(c1 * cs, dev.size);
        const old = buf.subarray(0, stop - start);
        let twin = twins.get(buf);
        if (!twin) twins.set(buf, (twin = Buffer.allocUnsafe(buf.length)));
        const now = twin.subarray(0, stop - start);
        await Promise.all([readSkippingZeros(dev, old, start), readSparse(next, now, start)]);
        // Runs of clusters whose bytes differ get the old bytes (already read).
        let runStart = -1;
        for (let c = c0; c <= c1; c++) {
          const a = c * cs - start;
          const b = Math.min((c + 1) * cs, stop) - start;
          const differs = c < c1 && !old.subarray(a, b).equals(now.subarray(a, b));
          if (differs && runStart < 0) runStart = c;
          if (!differs && runStart >= 0) {
            const n = await dev.copyFromBacking(runStart, c, undefined, { buf: old, pos: start });
            onCopied(Math.min(c * cs, dev.size) - runStart * cs);
            log.job("rebase: %d cluster(s) at %d differ, copied", n, runStart);
            runStart = -1;
          }
        }
      },
      checkpoint: () => dev.flush(),
    },
    { ...opts, total },
  );
  return job.runEngine(engine);
}

/**
 * What is known about the disk's current backing file, for -u: its size, or
 * why it cannot be opened ("does not exist", ...); null: it has none.
 */
export type OldBacking = { size: number } | { unreadable: string } | null;

/**
 * Unsafe rebase (`-u`): only the name changes, nothing is read or copied. The
 * user vouches that the new backing holds the same data; what can be checked
 * is: it opens as the format given (done when it was opened), its chain does
 * not loop back (done by the caller), and it has the old backing's size when
 * the old one can still be opened (a different size cannot be the same data;
 * QEMU checks nothing here). `-u -b ''` is refused while any cluster is still
 * read from the backing chain: it would read as zeros.
 */
export async function rebaseUnsafe(
  dev: AddCowLayer,
  target: RebaseTarget | null,
  old: OldBacking,
  replacer: FileReplacer = posixReplacer,
  warn: (message: string) => void = warnOnStderr,
): Promise<string> {
  if (dev.readOnly) throw readOnlyError(dev.path);
  if (target === null) {
    if (dev.backingPath === null) return `${dev.path} has no backing file already: nothing to do`;
    const left = dev.allAllocated ? 0 : await bytesOfKind(dev, ["backing", "zero"]);
    if (left > 0) {
      throw new AddCowError(
        `${dev.path} still reads ${formatSize(left)} from its backing file; with -u -b '' that would read as zeros: drop -u to copy it first (like stream)`,
        { file: dev.path, reason: "invalid" },
      );
    }
    await dev.switchBacking(null, null, replacer);
    return `${dev.path} has no backing file now (it had every cluster already)`;
  }
  let note = "";
  if (old !== null && "size" in old) {
    if (old.size !== target.device.size) {
      throw new AddCowError(
        `${target.path} has ${target.device.size} bytes, the current backing file ${dev.backingPath} has ${old.size}: with -u the new backing must hold the same data, so the same size; drop -u to copy what differs into the overlay instead`,
        { file: target.path, reason: "invalid" },
      );
    }
  } else if (old !== null) {
    note = ` (the current backing file ${dev.backingPath} ${old.unreadable}, so its size was not compared)`;
  }
  const warning = repinWarning(dev, target.path, target.identity);
  if (warning) warn(warning);
  await dev.switchBacking(target.name, target.format, replacer, target.identity);
  const pinned = target.identity ? "; its identity is pinned as it is now" : "";
  return `${dev.path} now names ${target.path} (${target.format}) as its backing file; nothing was copied (-u)${note}${pinned}`;
}
