import type { FileIO, FileOpener } from "../../src/block/file-io";
import { openPosixFile } from "../../src/block/file-io";
import { FileIOWrapper } from "./file-io-wrapper";

/**
 * Wraps real files so that every read, write and sync yields to the event loop
 * for a random moment first. Requests that would otherwise run back to back on
 * the JS thread then interleave, which is what concurrency tests need.
 */
export function jitterOpener(random: () => number, maxDelayMs = 2): FileOpener {
  const pause = () =>
    new Promise<void>((resolve) => {
      const r = random();
      if (r < 0.3) resolve();
      else if (r < 0.6) setImmediate(resolve);
      else setTimeout(resolve, Math.floor(r * maxDelayMs));
    });
  return async (path, mode) => new JitterFile(await openPosixFile(path, mode), pause);
}

class JitterFile extends FileIOWrapper {
  constructor(
    inner: FileIO,
    private readonly pause: () => Promise<void>,
  ) {
    super(inner);
  }

  override async read(buf: Buffer, pos: number): Promise<number> {
    await this.pause();
    return this.inner.read(buf, pos);
  }

  override async write(buf: Buffer, pos: number): Promise<void> {
    await this.pause();
    await this.inner.write(buf, pos);
  }

  override async sync(): Promise<void> {
    await this.pause();
    await this.inner.sync();
  }
}

/** A small deterministic PRNG (mulberry32), so failures replay from their seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
