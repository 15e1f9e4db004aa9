/**
 * What a remote device fetches and how long it waits, against real servers
 * the test starts (nginx, a fault-injecting proxy that counts what it served):
 * a miss fetches its small aligned range, only a real stream of reads gets
 * readahead (growing while it lasts), and a read's wait is bounded from when
 * it arrives even when the server stalls and requests queue.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, smallFileSystem, tempDir } from "../helpers/mount";
import { servedBase, startProxy } from "../helpers/remote-servers";
import { cacheState } from "../helpers/remote-cache-layout";
import { openDevice } from "../helpers/remote-devices";
import { AddCowError } from "../../src/util/errors";

afterEach(cleanupAll);

const KiB = 1024;
const MiB = 1024 * KiB;
const BASE = 32 * MiB;

async function setup(env: NodeJS.ProcessEnv = {}, warnings: string[] = []) {
  const s = await servedBase(BASE, 17);
  const proxy = await startProxy(`http://127.0.0.1:${s.nginx.port}`);
  const settings = {
    ADDCOW_CACHE_DIR: "none",
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "1",
    ...env,
  };
  const reopen = () => openDevice(`${proxy.url}/base.raw`, settings, warnings);
  const dev = await reopen();
  const local = fs.readFileSync(s.base);
  const read = async (off: number, len: number, from = dev) => {
    const buf = Buffer.alloc(len);
    await from.read(buf, off);
    expect(buf.equals(local.subarray(off, off + len)), `[${off}, +${len})`).toBe(true);
  };
  // The probe is not part of what the reads fetched.
  const start = { requests: proxy.requests, bytes: proxy.bytes };
  const served = () => ({
    requests: proxy.requests - start.requests,
    bytes: proxy.bytes - start.bytes,
  });
  return { ...s, proxy, dev, read, served, reopen };
}

function lcg(seed: number) {
  return (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
}

describe("a remote device fetches what is read", () => {
  it("two unrelated 4 KiB reads in one 1 MiB block fetch their 64 KiB piece each (and read-around), not the block", async () => {
    const { dev, read, served } = await setup({ ADDCOW_REMOTE_READAHEAD: "0" });
    try {
      await read(20 * MiB, 4096);
      await read(20 * MiB + 512 * KiB, 4096);
      expect(served()).toEqual({ requests: 2, bytes: 128 * KiB });
      expect(dev.stats.readaheadBytes).toBe(0);
    } finally {
      await dev.close();
    }
    // With the defaults a miss also fetches the 2 pieces after it (read-around), no more.
    const d = await setup();
    try {
      await d.read(20 * MiB, 4096);
      await d.read(20 * MiB + 512 * KiB, 4096);
      await d.dev.settled();
      expect(d.served()).toEqual({ requests: 2, bytes: 2 * 3 * 64 * KiB });
    } finally {
      await d.dev.close();
    }
  });

  it("random 4 KiB reads: read-around stops paying after a few dozen misses, then each miss fetches 64 KiB", async () => {
    const { dev, read, served } = await setup();
    try {
      const rnd = lcg(5);
      const at = (x: number) => (x >>> 8) % (BASE / 4096);
      for (let i = 0; i < 100; i++) await read(at(rnd(1 << 30)) * 4096, 4096);
      await dev.settled();
      const first = served();
      expect(first.requests).toBeLessThanOrEqual(100);
      // Read-around for at most the first 40 misses (2 pieces each).
      expect(dev.stats.readaheadBytes).toBeLessThanOrEqual(40 * 128 * KiB);
      const ahead = dev.stats.readaheadBytes;
      for (let i = 0; i < 100; i++) await read(at(rnd(1 << 30)) * 4096, 4096);
      await dev.settled();
      expect(served().bytes - first.bytes).toBeLessThanOrEqual(100 * 64 * KiB);
      expect(dev.stats.readaheadBytes).toBe(ahead);
      // (The old code fetched 1 MiB per miss plus 8 MiB of readahead: 64 MB for 200 such reads.)
    } finally {
      await dev.close();
    }
  });

  it("a sequential stream of 4 KiB reads gets readahead that grows while it lasts, wasting at most about what it read", async () => {
    const { dev, read, served, nginx } = await setup();
    try {
      const from = 3 * MiB;
      for (let off = from; off < from + 6 * MiB; off += 4096) await read(off, 4096);
      await dev.settled();
      const s = served();
      // 1536 reads; requests of growing size, not one per read or per 64 KiB piece.
      expect(s.requests).toBeLessThanOrEqual(20);
      expect(s.bytes).toBeLessThanOrEqual(2 * 6 * MiB + 64 * KiB);
      const sizes = nginx
        .requests()
        .map((l) => /"bytes=(\d+)-(\d+)"/.exec(l))
        .filter((m): m is RegExpExecArray => m !== null && Number(m[1]) >= from)
        .map((m) => Number(m[2]) - Number(m[1]) + 1);
      expect(Math.max(...sizes)).toBeGreaterThanOrEqual(2 * MiB);
      expect(sizes[0]).toBeLessThanOrEqual(192 * KiB); // the first miss and its read-around
    } finally {
      await dev.close();
    }
  });

  it("a short stream that stops wastes no more than it read; reads behind it and beside it start nothing", async () => {
    const { dev, read, served } = await setup();
    try {
      for (let off = 8 * MiB; off < 8 * MiB + 512 * KiB; off += 64 * KiB) await read(off, 64 * KiB);
      await dev.settled();
      const s = served();
      expect(s.bytes).toBeLessThanOrEqual(2 * 512 * KiB + 64 * KiB);
      const ahead = dev.stats.readaheadBytes;
      // Re-reading inside the stream: nothing; a read far away: its own read-around only.
      await read(8 * MiB + 64 * KiB, 4096);
      await dev.settled();
      expect(dev.stats.readaheadBytes).toBe(ahead);
      await read(1 * MiB, 4096);
      await dev.settled();
      expect(dev.stats.readaheadBytes - ahead).toBeLessThanOrEqual(128 * KiB);
    } finally {
      await dev.close();
    }
  });

  it("reads of a stream that arrive out of order are still one stream", async () => {
    const { dev, read } = await setup();
    try {
      for (let batch = 0; batch < 8; batch++) {
        const base = 16 * MiB + batch * 512 * KiB;
        // Four 128 KiB reads in flight at once, the second before the first.
        await Promise.all([1, 0, 3, 2].map((k) => read(base + k * 128 * KiB, 128 * KiB)));
      }
      expect(dev.stats.readaheadBytes).toBeGreaterThan(MiB);
    } finally {
      await dev.close();
    }
  });

  it("ADDCOW_REMOTE_READAHEAD and ADDCOW_REMOTE_MAX_REQUEST are bytes, whatever the block size", async () => {
    const { dev, read, nginx } = await setup({
      ADDCOW_REMOTE_BLOCK_SIZE: "64K",
      ADDCOW_REMOTE_READAHEAD: "2M",
      ADDCOW_REMOTE_MAX_REQUEST: "1M",
    });
    try {
      for (let off = 0; off < 16 * MiB; off += 128 * KiB) await read(off, 128 * KiB);
      const sizes = nginx
        .requests()
        .map((l) => /"bytes=(\d+)-(\d+)"/.exec(l))
        .filter((m): m is RegExpExecArray => m !== null && m[2] !== "0")
        .map((m) => Number(m[2]) - Number(m[1]) + 1);
      expect(Math.max(...sizes)).toBe(MiB);
      // 16 MiB in requests of up to 1 MiB: about 16 of them (the old code, counting
      // blocks: 8 x 64 KiB = 512 KiB requests, twice as many).
      expect(sizes.length).toBeLessThanOrEqual(24);
      expect(dev.describe().details).toMatchObject({ readahead: 2 * MiB, maxRequest: MiB });
    } finally {
      await dev.close();
    }
  });
});

describe("a read's wait is bounded from when it arrives", () => {
  it("16 concurrent misses on a server that accepts and never answers all fail within the bound", async () => {
    const env = { ADDCOW_REMOTE_TIMEOUT: "2", ADDCOW_REMOTE_RETRIES: "1" };
    const warnings: string[] = [];
    const { dev, proxy } = await setup(env, warnings);
    try {
      // Two attempts of 2 s and one pause of at most 0.1 s.
      expect(dev.waitBoundMs).toBe(4100);
      proxy.mode = { kind: "hang" };
      const t0 = Date.now();
      const outcomes = await Promise.all(
        Array.from({ length: 16 }, (_, i) =>
          dev.read(Buffer.alloc(4096), i * 2 * MiB).then(
            () => ({ ok: true, ms: Date.now() - t0, err: null }),
            (err: unknown) => ({ ok: false, ms: Date.now() - t0, err }),
          ),
        ),
      );
      for (const o of outcomes) {
        expect(o.ok).toBe(false);
        expect(o.err).toBeInstanceOf(AddCowError);
        expect((o.err as AddCowError).code).toBe("EIO");
      }
      const slowest = Math.max(...outcomes.map((o) => o.ms));
      // The old code started each request's timer only when it got one of the 4
      // slots: 4.1, 8.2, 12.2 and 16.3 s. A loaded machine gets 1.5 s of slack.
      expect(slowest).toBeLessThan(4100 + 1500);
      expect(
        warnings.filter((w) => /no answer within the timeout/.test(w)),
        warnings.join("\n"),
      ).toHaveLength(1);
      // The server comes back: the same device reads again.
      proxy.mode = { kind: "pass" };
      await dev.read(Buffer.alloc(4096), 0);
    } finally {
      await dev.close();
    }
  }, 30_000);
});

describe("a full cache file system", () => {
  it("the reads are right, the device says so once, and the cache holds only whole chunks", async () => {
    const dir = path.join(tempDir(), "cache");
    await smallFileSystem("tmpfs", dir, 3);
    const warnings: string[] = [];
    const { dev, read, served, reopen } = await setup(
      { ADDCOW_CACHE_DIR: dir, ADDCOW_REMOTE_READAHEAD: "0" },
      warnings,
    );
    try {
      for (let off = 0; off < 12 * MiB; off += 256 * KiB) await read(off, 256 * KiB);
      expect(warnings.filter((w) => /block cache/.test(w))).toHaveLength(1);
      expect(warnings[0]).toMatch(/cannot store fetched blocks \(the file system is full\)/);
      expect(dev.describe().details!.cacheStoreFailures).toBeGreaterThan(0);
      const state = cacheState(dir);
      expect(state).toMatchObject({ badChunks: [], badFiles: [], tmp: 0 });
      expect(state.bytes).toBeGreaterThan(MiB);
      // What was cached is read from the cache, the rest fetched again, all of it right.
      const again = await reopen();
      const before = served().bytes;
      try {
        for (let off = 0; off < 12 * MiB; off += 256 * KiB) await read(off, 256 * KiB, again);
      } finally {
        await again.close();
      }
      expect(served().bytes - before).toBeLessThanOrEqual(12 * MiB - state.bytes + 256 * KiB);
    } finally {
      await dev.close();
    }
  });
});
