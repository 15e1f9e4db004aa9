/**
 * The rack tier of docs/remote.md: hosts fetch through a standard caching
 * HTTP proxy (nginx proxy_cache with the slice module, the configuration the
 * docs give) in front of the origin. Two hosts (two cache directories, two
 * devices) read the same base; the origin's access log shows every slice
 * served once; ranges and the identity check survive the proxy, and a base
 * replaced at the origin is refused, never mixed.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, tempDir, writePatternFile } from "../helpers/mount";
import { servedBase, startCachingProxy } from "../helpers/remote-servers";
import { openDevice, refused } from "../helpers/remote-devices";
import type { RemoteDevice } from "../../src/remote/remote-device";

afterEach(cleanupAll);

const MiB = 1 << 20;
const BASE = 24 * MiB + 4096;

function host(url: string, cacheDir: string): Promise<RemoteDevice> {
  return openDevice(url, {
    ADDCOW_CACHE_DIR: cacheDir,
    ADDCOW_REMOTE_TIMEOUT: "10",
    ADDCOW_REMOTE_RETRIES: "1",
  });
}

/** A boot-like mix: a sequential run and scattered small reads, compared with the file. */
async function bootLike(dev: RemoteDevice, local: Buffer): Promise<void> {
  const reads: Array<[number, number]> = [];
  for (let off = 0; off < 3 * MiB; off += 128 * 1024) reads.push([off, 128 * 1024]);
  let seed = 3;
  for (let i = 0; i < 40; i++) {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    reads.push([(seed % (BASE / 4096 - 1)) * 4096, 4096]);
  }
  reads.push([BASE - 1000, 1000]);
  for (const [off, len] of reads) {
    const buf = Buffer.alloc(len);
    await dev.read(buf, off);
    expect(buf.equals(local.subarray(off, off + len)), `[${off}, +${len})`).toBe(true);
  }
  await dev.settled();
}

describe("a rack tier: nginx proxy_cache + slice in front of the origin", () => {
  it("two hosts behind one caching proxy: the origin serves each slice once; identity and ranges survive", async () => {
    const origin = await servedBase(BASE, 31);
    const rack = await startCachingProxy(
      path.join(tempDir(), "rack"),
      `http://127.0.0.1:${origin.nginx.port}`,
    );
    const url = `${rack.baseUrl}base.raw`;
    const local = fs.readFileSync(origin.base);
    const direct = await host(origin.url, "none");
    const a = await host(url, path.join(tempDir(), "host-a"));
    try {
      expect(a.objectIdentity).toEqual(direct.objectIdentity);
      await bootLike(a, local);
    } finally {
      await a.close();
      await direct.close();
    }
    const b = await host(url, path.join(tempDir(), "host-b"));
    try {
      expect(b.objectIdentity.etag).toBe(a.objectIdentity.etag);
      await bootLike(b, local);
      expect(b.stats.bytesFetched).toBeGreaterThan(0); // its own cache was empty: it asked the rack
    } finally {
      await b.close();
    }
    const atOrigin = origin.nginx
      .requests()
      .filter((l) => l.startsWith("GET /base.raw"))
      .map((l) => /"(bytes=\d+-\d+)"/.exec(l)?.[1] ?? l);
    // The direct probe, then slices only (1 MiB aligned), each once.
    const slices = atOrigin.filter((r) => r !== "bytes=0-0");
    expect(slices.length).toBeGreaterThan(5);
    expect(new Set(slices).size).toBe(slices.length);
    for (const r of slices) {
      const [, s, e] = /bytes=(\d+)-(\d+)/.exec(r)!;
      expect(Number(s) % MiB).toBe(0);
      expect(Number(e) + 1 - Number(s)).toBe(MiB);
    }
    // The rack's own log: host B's requests were all hits.
    expect(rack.requests().some((l) => / HIT$/.test(l))).toBe(true);
  }, 60_000);

  it("a base replaced at the origin: a host that meets a slice of the new one refuses it (EIO), never mixes", async () => {
    const origin = await servedBase(BASE, 32);
    const rack = await startCachingProxy(
      path.join(tempDir(), "rack"),
      `http://127.0.0.1:${origin.nginx.port}`,
    );
    const url = `${rack.baseUrl}base.raw`;
    const old = fs.readFileSync(origin.base);
    const a = await host(url, "none");
    try {
      const head = Buffer.alloc(4096);
      await a.read(head, 0); // slice 0 of the old base is in the rack now
      expect(head.equals(old.subarray(0, 4096))).toBe(true);
      writePatternFile(origin.base + ".new", BASE, 99);
      fs.utimesSync(origin.base + ".new", new Date(2001, 1, 1), new Date(2001, 1, 1));
      fs.renameSync(origin.base + ".new", origin.base);
      const err = await refused(a.read(Buffer.alloc(4096), 20 * MiB));
      expect(err.message).toMatch(/changed since the disk was opened/);
    } finally {
      await a.close();
    }
  }, 60_000);
});
