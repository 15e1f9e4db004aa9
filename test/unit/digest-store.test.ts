/**
 * The content-addressed part of the block cache (src/remote/digest-store.ts):
 * blocks of bases with a manifest, stored once by SHA-256 whichever base,
 * version or offset holds them, checked by CRC on every read and hashed on
 * first use, whole or absent, evicted with the rest of the cache. The files
 * are read back by their documented layout (test/helpers/remote-cache-layout.ts).
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import * as zlib from "node:zlib";
import { afterEach, describe, expect, it } from "vitest";
import { CacheRoot } from "../../src/remote/block-cache";
import { DigestStore, digestHeaderSize, openDigestCache } from "../../src/remote/digest-store";
import { Manifest } from "../../src/remote/manifest";
import { cleanupAll, smallFileSystem, tempDir } from "../helpers/mount";
import { pattern } from "../helpers/pattern";
import { cacheState } from "../helpers/remote-cache-layout";

afterEach(cleanupAll);

const KiB = 1024;
const BS = 64 * KiB;

const sha = (b: Buffer) => crypto.createHash("sha256").update(b).digest();

function manifestOf(data: Buffer, bs = BS): Manifest {
  const digests: Buffer[] = [];
  for (let at = 0; at < data.length; at += bs) digests.push(sha(data.subarray(at, at + bs)));
  return Manifest.parse(Manifest.encode(data.length, bs, digests), "test.manifest");
}

/** Blocks of `seed` with blocks of `other` at the given indexes. */
function version(blocks: number, seed: number, changed: number[], other: number): Buffer {
  const out = pattern(blocks * BS, seed);
  for (const n of changed) pattern(BS, other + n).copy(out, n * BS);
  return out;
}

function get(c: { read(offset: number, b: Buffer): boolean }, offset: number, length: number) {
  const buf = Buffer.alloc(length);
  return c.read(offset, buf) ? buf : null;
}

/** Rewrites a stored file's bytes at `pos` of its block and its CRC entries to match. */
function plant(file: string, length: number, pos: number) {
  const raw = fs.readFileSync(file);
  const header = digestHeaderSize(length);
  raw[header + pos] = raw[header + pos]! ^ 0x40;
  const c = Math.floor(pos / 4096);
  raw.writeUInt32LE(
    zlib.crc32(raw.subarray(header + c * 4096, header + (c + 1) * 4096)),
    48 + 8 * c,
  );
  fs.writeFileSync(file, raw);
}

describe("blocks stored by digest", () => {
  it("a block is stored once under its SHA-256 and read for every base and offset that holds it", () => {
    const root = new CacheRoot(tempDir());
    const v1 = version(8, 1, [], 0);
    // v2: blocks 2 and 5 changed, and v1's block 3 moved to block 7.
    const v2 = version(8, 1, [2, 5], 100);
    v1.copy(v2, 7 * BS, 3 * BS, 4 * BS);
    const a = openDigestCache(root, manifestOf(v1));
    const b = openDigestCache(root, manifestOf(v2));
    a.put(0, v1);
    const state = cacheState(root.dir);
    expect(state.badDigests).toEqual([]);
    expect(state.digests.sort()).toEqual(
      [...new Set(Array.from({ length: 8 }, (_, n) => sha(v1.subarray(n * BS, (n + 1) * BS))))]
        .map((d) => d.toString("hex"))
        .sort(),
    );
    // Named v3/sha256/DD/HEX.blk.
    const d0 = sha(v1.subarray(0, BS)).toString("hex");
    expect(fs.existsSync(path.join(root.dir, "v3", "sha256", d0.slice(0, 2), `${d0}.blk`))).toBe(
      true,
    );
    // v2 finds what it shares with v1, whatever the offset; not what it changed.
    for (const n of [0, 1, 3, 4, 6, 7]) {
      expect(get(b, n * BS, BS)?.equals(v2.subarray(n * BS, (n + 1) * BS)), `block ${n}`).toBe(
        true,
      );
    }
    expect(get(b, 2 * BS, 4096)).toBeNull();
    expect(get(b, 5 * BS + 100, 10)).toBeNull();
    expect(b.has(0, 2 * BS)).toBe(true);
    expect(b.has(0, 3 * BS)).toBe(false);
    expect(b.usage()).toEqual({ blocks: 6, bytes: 6 * BS });
    // Parts of a block, across chunk and block edges.
    expect(get(b, 7 * BS + 4000, 5000)!.equals(v2.subarray(7 * BS + 4000, 7 * BS + 9000))).toBe(
      true,
    );
    expect(get(a, BS - 10, 20)!.equals(v1.subarray(BS - 10, BS + 10))).toBe(true);
    a.close();
    b.close();
  });

  it("the short last block of a base is its own entry; a part of a block is never stored", () => {
    const root = new CacheRoot(tempDir());
    const data = pattern(2 * BS + 5000, 7);
    const c = openDigestCache(root, manifestOf(data));
    c.put(0, data.subarray(0, BS + 4096)); // block 0 whole, block 1 in part
    c.put(2 * BS, data.subarray(2 * BS));
    expect(get(c, 0, BS)).not.toBeNull();
    expect(get(c, BS, 4096)).toBeNull();
    expect(get(c, 2 * BS, 5000)!.equals(data.subarray(2 * BS))).toBe(true);
    expect(cacheState(root.dir).digests).toHaveLength(2);
    c.close();
  });

  it("a file whose bytes are not its digest is never served: caught on first use, deleted", () => {
    const root = new CacheRoot(tempDir());
    const data = pattern(4 * BS, 3);
    const m = manifestOf(data);
    const writer = openDigestCache(root, m);
    writer.put(0, data);
    writer.close();
    const store = new DigestStore(root);
    const file = store.file(m.digestOf(1));
    // Other bytes with CRCs that match them: only the digest tells.
    plant(file, BS, 9000);
    const reader = openDigestCache(root, m);
    expect(get(reader, BS, 4096)).toBeNull(); // another chunk than the one changed
    expect(fs.existsSync(file)).toBe(false);
    expect(reader.stats.corrupt).toBe(1);
    expect(get(reader, 2 * BS, BS)!.equals(data.subarray(2 * BS, 3 * BS))).toBe(true);
    // Stored again, it reads back.
    reader.put(BS, data.subarray(BS, 2 * BS));
    expect(get(reader, BS, BS)!.equals(data.subarray(BS, 2 * BS))).toBe(true);
    // Damage after first use is caught by the CRC of the chunk read.
    const f2 = store.file(m.digestOf(2));
    const fd = fs.openSync(f2, "r+");
    fs.writeSync(fd, Buffer.from([0x11]), 0, 1, digestHeaderSize(BS) + 3 * 4096 + 7);
    fs.closeSync(fd);
    expect(get(reader, 2 * BS + 3 * 4096, 4096)).toBeNull();
    expect(fs.existsSync(f2)).toBe(false);
    reader.close();
    store.close();
  });

  it("a file under another block's name, or with a header not its own, is a miss and deleted", () => {
    const root = new CacheRoot(tempDir());
    const data = pattern(3 * BS, 4);
    const m = manifestOf(data);
    const c = openDigestCache(root, m);
    c.put(0, data);
    c.close();
    const store = new DigestStore(root);
    fs.copyFileSync(store.file(m.digestOf(0)), store.file(m.digestOf(1)));
    fs.writeFileSync(store.file(m.digestOf(2)), "not a block file");
    const again = openDigestCache(root, m);
    expect(get(again, BS, 100)).toBeNull();
    expect(get(again, 2 * BS, 100)).toBeNull();
    expect(get(again, 0, 100)).not.toBeNull();
    expect(cacheState(root.dir)).toMatchObject({ badDigests: [], tmp: 0 });
    expect(cacheState(root.dir).digests).toHaveLength(1);
    again.close();
    store.close();
  });

  it("is evicted with the rest of the cache, least recently used first, under its size limit", () => {
    const dir = tempDir();
    const root = new CacheRoot(dir, 10 * (BS + 4096));
    const data = pattern(20 * BS, 5);
    const m = manifestOf(data);
    const c = openDigestCache(root, m);
    const store = new DigestStore(root);
    for (let n = 0; n < 20; n++) {
      c.put(n * BS, data.subarray(n * BS, (n + 1) * BS));
      const old = new Date(Date.now() - (100 - n) * 1000);
      const f = store.file(m.digestOf(n));
      if (fs.existsSync(f)) fs.utimesSync(f, old, old);
    }
    const state = cacheState(dir);
    expect(state.digests.length).toBeLessThanOrEqual(10);
    expect(c.stats.evicted).toBeGreaterThan(0);
    expect(get(c, 19 * BS, BS)!.equals(data.subarray(19 * BS))).toBe(true);
    expect(get(c, 0, BS)).toBeNull();
    c.close();
    store.close();
  });

  it("a full cache file system: stores what fits, says so once, leaves no partial or temp file", async () => {
    const dir = path.join(tempDir(), "cache");
    await smallFileSystem("tmpfs", dir, 1);
    const warnings: string[] = [];
    const data = pattern(40 * BS, 6);
    const c = openDigestCache(new CacheRoot(dir), manifestOf(data), (w) => warnings.push(w));
    for (let n = 0; n < 40; n++) c.put(n * BS, data.subarray(n * BS, (n + 1) * BS));
    expect(c.stats.storeFailures).toBeGreaterThan(0);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(/cannot store fetched blocks \(the file system is full\)/);
    const state = cacheState(dir);
    expect(state).toMatchObject({ badDigests: [], tmp: 0 });
    expect(state.digests.length).toBeGreaterThan(4);
    for (let n = 0; n < 40; n++) {
      const got = get(c, n * BS, BS);
      if (got) expect(got.equals(data.subarray(n * BS, (n + 1) * BS))).toBe(true);
    }
    c.close();
  });
});
