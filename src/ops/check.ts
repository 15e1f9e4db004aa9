import * as fs from "node:fs";
import * as path from "node:path";
import { sharedFile } from "../chain/loops";
import { judgeNamedFile, openBacking, openDiskFile, resolveName } from "../chain/open-chain";
import { type Confinement, isUrlName } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";
import { AddCowError } from "../util/errors";
import {
  FEATURE_ALL_ALLOCATED,
  FIXED_HEADER_SIZE,
  KNOWN_COMPATIBLE,
  MAX_HEADER_SIZE,
  bitmapBytes,
  decodeFixedHeader,
  decodeHeader,
} from "../addcow/header";
import { PosixFile, openRegularFile } from "../block/file-io";
import { checkCreateLeftovers, checkShrunkImage } from "./check-crash";
import { checkPin, readPinState } from "../addcow/pin";
import { bitmapAreaEnd } from "../addcow/open-addcow";
import type { BlockDevice } from "../block/block-device";

import type { CheckContext, CheckStep, Finding } from "./check-context";

export type { CheckContext, CheckStep, Finding, Severity } from "./check-context";

export interface CheckReport {
  file: string;
  /** True when no corruption was found (warnings allowed). */
  clean: boolean;
  findings: Finding[];
  virtualSize: number | null;
  clusterSize: number | null;
  clusters: number | null;
  allocatedClusters: number | null;
}

function readAt(fd: number, length: number, pos: number): Buffer {
  const buf = Buffer.alloc(length);
  let done = 0;
  while (done < length) {
    const n = fs.readSync(fd, buf, done, length - done, pos + done);
    if (n === 0) break;
    done += n;
  }
  return buf.subarray(0, done);
}

/** A header that breaks a rule: the error names the field, the byte and the fact. */
function headerFinding(ctx: CheckContext, err: AddCowError): void {
  ctx.report({
    severity: "corruption",
    offset: err.offset ?? null,
    field: err.field ?? "header",
    message: err.detail ?? err.message,
  });
}

export const checkHeader: CheckStep = {
  name: "header",
  async run(ctx) {
    const head = readAt(ctx.fd, Math.min(ctx.fileSize, MAX_HEADER_SIZE), 0);
    try {
      const fixed = decodeFixedHeader(head.subarray(0, FIXED_HEADER_SIZE), ctx.file, ctx.fileSize);
      ctx.header = decodeHeader(head.subarray(0, fixed.headerSize), ctx.file, ctx.fileSize);
    } catch (err) {
      if (err instanceof AddCowError && err.reason === "bad-field") return headerFinding(ctx, err);
      throw err;
    }
    ctx.allAllocated = (ctx.header.compatibleFeatures & FEATURE_ALL_ALLOCATED) !== 0n;
    ctx.pin = await readPinState(ctx.io, ctx.header, ctx.fileSize);
    ctx.bitmapEnd = bitmapAreaEnd(ctx.pin, ctx.fileSize);
    const unknown = ctx.header.compatibleFeatures & ~KNOWN_COMPATIBLE;
    if (unknown !== 0n) {
      ctx.report({
        severity: "warning",
        offset: 32,
        field: "compatible features",
        message: `unknown compatible feature bits 0x${unknown.toString(16)} are set (ignored)`,
      });
    }
  },
};

export const checkImageFile: CheckStep = {
  name: "image file",
  async run(ctx) {
    const h = ctx.header;
    if (!h) return;
    const imagePath = resolveName(ctx.namer, h.imageName);
    const named = `image file ${imagePath} (stored as ${JSON.stringify(h.imageName)})`;
    // Judged first, as any command judges it: a name the disk may not use is refused (exit 1),
    // whether or not something is there.
    const st = await lookUp(ctx, imagePath, "image file");
    if (typeof st === "string") {
      ctx.report({
        severity: "corruption",
        offset: null,
        field: "image file",
        message: `${named} ${st}`,
      });
      return;
    }
    if (!st.isFile()) {
      ctx.report({
        severity: "corruption",
        offset: null,
        field: "image file",
        message: `${named} is not a regular file`,
      });
      return;
    }
    if (ctx.selfId === `${st.dev}:${st.ino}`) {
      ctx.report({
        severity: "corruption",
        offset: null,
        field: "image file",
        message: `${named} is the .add-cow file itself`,
      });
      return;
    }
    ctx.imagePath = imagePath;
    ctx.imageSize = Number(st.size);
    ctx.imageId = `${st.dev}:${st.ino}`;
    ctx.numClusters = Math.ceil(ctx.imageSize / 2 ** h.clusterBits);
    if (st.size === 0n) {
      ctx.report({
        severity: "warning",
        offset: null,
        field: "image file",
        message: `${named} is empty: the disk has 0 bytes`,
      });
    }
  },
};

export const checkBitmapLength: CheckStep = {
  name: "bitmap length",
  run(ctx) {
    const h = ctx.header;
    if (!h || ctx.numClusters === null) return;
    const { needed, padded } = bitmapBytes(ctx.numClusters, h.clusterBits);
    const have = Math.max(0, ctx.bitmapEnd - h.headerSize);
    ctx.bitmapPresent = Math.min(have, needed);
    const pinned = ctx.bitmapEnd < ctx.fileSize ? ` before its pin at byte ${ctx.bitmapEnd}` : "";
    const sizes = `the file has ${ctx.bitmapEnd} bytes${pinned}, ${h.headerSize + needed} are needed for ${ctx.numClusters} clusters of ${ctx.imageSize} bytes`;
    if (have < needed) {
      ctx.report({
        severity: ctx.allAllocated ? "warning" : "corruption",
        offset: ctx.bitmapEnd,
        field: "bitmap",
        message: ctx.allAllocated
          ? `bitmap is truncated (${sizes}); harmless while the all-allocated feature is set`
          : `bitmap is truncated: ${sizes}`,
      });
    } else if (have < padded) {
      ctx.report({
        severity: "warning",
        offset: ctx.bitmapEnd,
        field: "bitmap",
        message: `bitmap padding is missing: the bitmap ends at byte ${ctx.bitmapEnd}, the padded bitmap ends at ${h.headerSize + padded} (harmless)`,
      });
    }
  },
};

/** Reads [from, to) of the .add-cow file in chunks. */
function forEachChunk(
  ctx: CheckContext,
  from: number,
  to: number,
  fn: (chunk: Buffer, pos: number) => void,
): void {
  const CHUNK = 1 << 20;
  for (let pos = from; pos < to; pos += CHUNK) {
    fn(readAt(ctx.fd, Math.min(CHUNK, to - pos), pos), pos);
  }
}

export const checkPaddingBits: CheckStep = {
  name: "padding bits",
  run(ctx) {
    const h = ctx.header;
    if (!h || ctx.numClusters === null) return;
    const n = ctx.numClusters;
    const firstByte = h.headerSize + Math.floor(n / 8);
    if (firstByte >= ctx.bitmapEnd) return;
    let count = 0;
    let first = -1;
    forEachChunk(ctx, firstByte, ctx.bitmapEnd, (chunk, pos) => {
      for (let i = 0; i < chunk.length; i++) {
        let byte = chunk[i]!;
        // In the byte holding the last cluster's bit, only the bits after it are padding.
        if (pos + i === firstByte) byte &= (0xff << (n % 8)) & 0xff;
        if (byte !== 0) {
          count++;
          if (first < 0) first = pos + i;
        }
      }
    });
    if (count > 0) {
      ctx.report({
        severity: "corruption",
        offset: first,
        field: "bitmap",
        message: `bits set past the end of the disk (${n} clusters): ${count} non-zero padding byte(s), the first at byte ${first}; was the image file shrunk? (an interrupted 'addcow resize' leaves this too: run it again)`,
      });
    }
  },
};

export const checkAllocation: CheckStep = {
  name: "allocation",
  run(ctx) {
    const h = ctx.header;
    if (!h || ctx.numClusters === null) return;
    const n = ctx.numClusters;
    const needed = bitmapBytes(n, h.clusterBits).needed;
    if (ctx.bitmapPresent < needed) {
      if (ctx.allAllocated) ctx.allocatedClusters = n;
      return;
    }
    let allocated = 0;
    let firstZero = -1;
    const start = h.headerSize;
    forEachChunk(ctx, start, start + needed, (chunk, pos) => {
      for (let i = 0; i < chunk.length; i++) {
        let byte = chunk[i]!;
        const cluster = (pos - start + i) * 8;
        if (cluster + 8 > n) byte &= (1 << (n - cluster)) - 1;
        let ones = 0;
        for (let b = byte; b; b &= b - 1) ones++;
        allocated += ones;
        if (firstZero < 0 && ones < Math.min(8, n - cluster)) {
          for (let bit = 0; bit < 8; bit++) {
            if (!((byte >> bit) & 1)) {
              firstZero = cluster + bit;
              break;
            }
          }
        }
      }
    });
    ctx.allocatedClusters = ctx.allAllocated ? n : allocated;
    if (ctx.allAllocated && allocated < n) {
      ctx.report({
        severity: "corruption",
        offset: 32,
        field: "compatible features",
        message: `the all-allocated feature is set but ${n - allocated} of ${n} clusters have bit 0 in the bitmap (the first: cluster ${firstZero}, bitmap byte ${start + Math.floor(firstZero / 8)}); data of those clusters may be missing from the image file`,
      });
    }
  },
};

export const checkBacking: CheckStep = {
  name: "backing chain",
  async run(ctx) {
    const h = ctx.header;
    if (!h || h.backingName === null) return;
    const backingPath = resolveName(ctx.namer, h.backingName);
    const named = `backing file ${backingPath} (stored as ${JSON.stringify(h.backingName)})`;
    if (isUrlName(h.backingName)) {
      return checkRemoteBacking(ctx, backingPath, named);
    }
    const st = await lookUp(ctx, backingPath, "backing file");
    if (typeof st === "string") {
      if (ctx.allAllocated) return; // Never read once every cluster is in the image file.
      ctx.report({
        severity: "corruption",
        offset: null,
        field: "backing file",
        message: `${named} ${st}`,
      });
      return;
    }
    const ownIds = new Set([ctx.selfId]);
    if (ctx.imageId) ownIds.add(ctx.imageId);
    if (ownIds.has(`${st.dev}:${st.ino}`)) {
      ctx.report({
        severity: "corruption",
        offset: null,
        field: "backing file",
        message: `${named} is this disk's own .add-cow or image file`,
      });
      return;
    }
    if (ctx.allAllocated) return;
    let backing;
    try {
      backing = await openBacking(backingPath, h.backingFormat!, {
        lock: !ctx.forceShare,
        layersAbove: 1,
        namedBy: ctx.namer,
        confine: ctx.confine,
        ...(ctx.urls ? { urls: ctx.urls } : {}),
      });
    } catch (err) {
      // A layer in use by a writer cannot be checked now: that is not corruption.
      // A name the disk may not use is refused, not reported.
      if (!(err instanceof AddCowError) || err.code === "EBUSY" || err.reason === "forbidden") {
        throw err;
      }
      ctx.report({
        severity: "corruption",
        offset: null,
        field: "backing chain",
        message: `${named} cannot be opened: ${err.message}`,
      });
      return;
    }
    try {
      await verifyPin(ctx, backingPath, backing);
      const same = sharedFile(backing, ctx.imagePath ? [ctx.path, ctx.imagePath] : [ctx.path]);
      if (same) {
        ctx.report({
          severity: "corruption",
          offset: null,
          field: "backing chain",
          message: `the backing chain loops back: ${same.used} is this disk's own .add-cow or image file`,
        });
      }
    } finally {
      await backing.close();
    }
  },
};

/**
 * A name of the header looked up and judged for the users it speaks for (a
 * refusal throws); a file that cannot be found is a finding, in words.
 */
async function lookUp(
  ctx: CheckContext,
  file: string,
  role: string,
): Promise<fs.BigIntStats | string> {
  try {
    return await judgeNamedFile({ file, role, access: "read", namer: ctx.namer }, ctx.confine);
  } catch (err) {
    if (!(err instanceof AddCowError) || err.reason !== "cannot-open") throw err;
    return err.code === "ENOENT" ? "does not exist" : (err.detail ?? err.message);
  }
}

/**
 * A remote backing (URL) must answer with a usable object: a missing object or
 * a refused format is corruption of the disk's naming; a server that cannot be
 * reached now (network, timeouts, 5xx, access) means the check cannot finish.
 */
async function checkRemoteBacking(ctx: CheckContext, url: string, named: string): Promise<void> {
  if (ctx.allAllocated) return;
  let backing;
  try {
    // Judged as the disk names it: the URL rules for its owner (chain/url-policy.ts).
    backing = await openBacking(url, ctx.header!.backingFormat!, {
      layersAbove: 1,
      namedBy: ctx.namer,
      confine: ctx.confine,
      ...(ctx.urls ? { urls: ctx.urls } : {}),
      pinned: ctx.pin.kind === "pinned" ? ctx.pin.record.identity : null,
    });
  } catch (err) {
    if (!(err instanceof AddCowError) || (err.code !== "ENOENT" && err.code !== "EINVAL")) {
      throw err;
    }
    ctx.report({
      severity: "corruption",
      offset: null,
      field: "backing file",
      message: `${named} cannot be used: ${err.message}`,
    });
    return;
  }
  try {
    await verifyPin(ctx, url, backing);
  } finally {
    await backing.close();
  }
}

/**
 * The backing against the disk's pin, as every open compares it: a pin that
 * cannot be read, was taken for another backing, or names another identity
 * is corruption (the disk would be refused); an interrupted commit a warning.
 */
async function verifyPin(ctx: CheckContext, backingPath: string, backing: BlockDevice) {
  const h = ctx.header!;
  if (ctx.pin.kind === "pinned" && ctx.pin.record.status === "committing") {
    ctx.report({
      severity: "warning",
      offset: ctx.pin.areaStart,
      field: "backing pin",
      message: `a commit into backing file ${backingPath} was interrupted: the disk reads as before, but its pin waits for the commit to finish: run addcow commit ${ctx.file} again`,
    });
    return;
  }
  try {
    checkPin(ctx.file, h, backingPath, ctx.pin, await backing.identity());
  } catch (err) {
    if (!(err instanceof AddCowError) || err.reason !== "changed-backing") throw err;
    ctx.report({
      severity: "corruption",
      offset: ctx.pin.kind === "pinned" ? ctx.pin.areaStart : ctx.bitmapEnd,
      field: "backing pin",
      message: err.message.slice(`${ctx.file}: `.length),
    });
  }
}

/** The checks, in order. Later helpers append steps here (e.g. crash leftovers). */
export const CHECKS: CheckStep[] = [
  checkHeader,
  checkImageFile,
  checkBitmapLength,
  checkPaddingBits,
  checkAllocation,
  checkBacking,
  checkCreateLeftovers,
  checkShrunkImage,
];

export interface CheckOptions {
  /** Skip the shared lock (like qemu-img -U); results may be stale while a writer runs. */
  forceShare?: boolean;
  steps?: CheckStep[];
  /** Confinement for the names in headers (docs/security.md). */
  confine?: Confinement | null;
  /** The operator's URL rules (chain/url-policy.ts). */
  urls?: UrlRules;
}

/**
 * Checks an add-cow disk. Throws AddCowError when it cannot check at all (the
 * file is missing, unreadable, not a regular file, or in use by a writer).
 */
export async function checkDisk(file: string, opts: CheckOptions = {}): Promise<CheckReport> {
  const abs = path.resolve(file);
  let handle!: PosixFile;
  // Read synchronously through the descriptor: the steps read the bitmap in chunks.
  const opener = async (p: string, mode: "read" | "write", at?: string) =>
    (handle = new PosixFile(p, await openRegularFile(at ?? p, mode), false, "sync"));
  let namer;
  try {
    ({ namer } = await openDiskFile(abs, { lock: !opts.forceShare, opener }));
  } catch (err) {
    if (!(err instanceof AddCowError) || err.code !== "ENOENT") throw err;
    throw new AddCowError(`cannot check ${file}: it does not exist`, { file, code: err.code });
  }
  const fd = handle.fd;
  try {
    const own = handle.stat();
    const ctx: CheckContext = {
      file,
      path: abs,
      fd,
      io: handle,
      selfId: `${own.dev}:${own.ino}`,
      fileSize: Number(own.size),
      pin: { kind: "none" },
      bitmapEnd: Number(own.size),
      forceShare: opts.forceShare ?? false,
      namer,
      confine: opts.confine ?? null,
      ...(opts.urls ? { urls: opts.urls } : {}),
      header: null,
      allAllocated: false,
      imagePath: null,
      imageSize: null,
      imageId: null,
      numClusters: null,
      bitmapPresent: 0,
      allocatedClusters: null,
      findings: [],
      report(f) {
        const { severity, offset, field, message } = f;
        this.findings.push({ severity, file: f.file ?? file, offset, field, message });
      },
    };
    for (const step of opts.steps ?? CHECKS) await step.run(ctx);
    return {
      file,
      clean: !ctx.findings.some((f) => f.severity === "corruption"),
      findings: ctx.findings,
      virtualSize: ctx.imageSize,
      clusterSize: ctx.header ? 2 ** ctx.header.clusterBits : null,
      clusters: ctx.numClusters,
      allocatedClusters: ctx.allocatedClusters,
    };
  } finally {
    await handle.close();
  }
}
