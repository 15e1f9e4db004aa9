import type { FileIO, FileOpener } from "../../src/io/file-io";
import { openPosixFile } from "../../src/io/file-io";

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
  return async (path, mode) => {
    const inner = await openPosixFile(path, mode);
    const wrapped: FileIO = {
      path: inner.path,
      writable: inner.writable,
      fd: inner.fd,
      read: async (buf, pos) => {
        await pause();
        return inner.read(buf, pos);
      },
      write: async (buf, pos) => {
        await pause();
        await inner.write(buf, pos);
      },
      sync: async () => {
        await pause();
        await inner.sync();
      },
      size: () => inner.size(),
      close: () => inner.close(),
    };
    return wrapped;
  };
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
