import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { BlockDevice } from "../../src/block/block-device";
import { createDisk } from "../../src/ops/create";
import type { AddCowDevice } from "../../src/addcow/addcow-device";
import { type OpenOptions, openDisk } from "../../src/chain/open-chain";
import type { FileOpener } from "../../src/block/file-io";
import { openPosixFile } from "../../src/block/file-io";
import { overriding } from "./file-io-wrapper";
import { pattern } from "./pattern";

export { pattern };

export const KiB = 1024;
export const MiB = 1024 * 1024;

export function tempDir(tag: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `addcow-${tag}-`));
}

export function writeRaw(file: string, data: Buffer): void {
  fs.writeFileSync(file, data);
}

/** Reads the whole virtual disk through the engine. */
export async function readAll(dev: BlockDevice): Promise<Buffer> {
  const buf = Buffer.alloc(dev.size);
  const step = 4 * MiB;
  for (let off = 0; off < dev.size; off += step) {
    await dev.read(buf.subarray(off, Math.min(dev.size, off + step)), off);
  }
  return buf;
}

/** Opens a disk, runs fn on it and closes it, also when fn fails. */
export async function withDisk<T>(
  file: string,
  opts: OpenOptions,
  fn: (dev: AddCowDevice) => Promise<T>,
): Promise<T> {
  const dev = await openDisk(file, opts);
  try {
    return await fn(dev);
  } finally {
    await dev.close();
  }
}

export function readDisk(file: string, opts: OpenOptions = {}): Promise<Buffer> {
  return withDisk(file, opts, readAll);
}

/** Writes scattered pieces (some partial clusters) through the engine. */
export async function scribble(
  file: string,
  seed: number,
  count: number,
  maxLen = 200 * KiB,
): Promise<void> {
  await withDisk(file, { writable: true }, async (dev) => {
    const rnd = pattern(count * 8, seed);
    for (let i = 0; i < count; i++) {
      const len = 1 + (rnd.readUInt32LE(i * 8) % maxLen);
      const off = rnd.readUInt32LE(i * 8 + 4) % (dev.size - len);
      await dev.write(pattern(len, seed * 1000 + i), off);
    }
  });
}

/** base.raw (random data) <- a.add-cow [<- b.add-cow ...]; returns the .add-cow paths top last. */
export async function makeChain(
  dir: string,
  size: number,
  layers: number,
  clusterSize = 64 * KiB,
): Promise<{ base: string; layers: string[] }> {
  const base = path.join(dir, "base.raw");
  writeRaw(base, pattern(size, 1));
  const out: string[] = [];
  let below = base;
  let format = "raw";
  for (let i = 0; i < layers; i++) {
    const file = path.join(dir, `layer${i}.add-cow`);
    await createDisk({ file, backing: below, backingFormat: format, clusterSize });
    out.push(file);
    below = file;
    format = "add-cow";
  }
  return { base, layers: out };
}

export function qemuCompareRaw(a: string, b: string): void {
  execFileSync("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", a, b]);
}

/** Wraps an opener: every read/write waits `delayMs` first and is counted while running. */
export function delayingOpener(
  delayMs: number,
  match: (file: string) => boolean,
  stats: { concurrentReads: number; peakReads: number; onRead?: (pos: number) => void },
): FileOpener {
  return async (file, mode) => {
    const inner = await openPosixFile(file, mode);
    if (!match(file)) return inner;
    return overriding(inner, {
      async read(buf, pos) {
        stats.concurrentReads++;
        stats.peakReads = Math.max(stats.peakReads, stats.concurrentReads);
        try {
          stats.onRead?.(pos);
          await new Promise((r) => setTimeout(r, delayMs));
          return await inner.read(buf, pos);
        } finally {
          stats.concurrentReads--;
        }
      },
      async write(buf, pos) {
        await new Promise((r) => setTimeout(r, delayMs));
        return inner.write(buf, pos);
      },
    });
  };
}
