import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { CacheRoot, defaultCacheRoot, headerSize } from "../../src/remote/block-cache";
import { cleanupAll, smallFileSystem, tempDir } from "../helpers/mount";
import { pattern } from "../helpers/pattern";
import { cacheState } from "../helpers/remote-cache-layout";

afterEach(cleanupAll);

const KiB = 1024;
const MiB = 1024 * KiB;
const identity = { size: 10 * MiB, etag: '"abc"', lastModified: "Mon, 30 Nov 2026 06:00:00 GMT" };
const http = JSON.stringify(["http", "http://h/base.raw"]);

function blockFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(path.join(d, e.name));
      else if (e.name.endsWith(".blk")) out.push(path.join(d, e.name));
    }
  };
  walk(dir);
  return out;
}

/** The cached bytes at [offset, +length), or null on a miss. */
function get(c: ReturnType<CacheRoot["open"]>, offset: number, length: number): Buffer | null {
  const buf = Buffer.alloc(length);
  return c.read(offset, buf) ? buf : null;
}

describe("the block cache on disk", () => {
  it("keys entries by source and identity: another ETag, URL, S3 endpoint or block size is another entry", () => {
    const root = new CacheRoot(tempDir());
    const a = root.open(http, identity, 64 * KiB);
    a.put(0, pattern(64 * KiB, 1));
    expect(get(root.open(http, identity, 64 * KiB), 0, 64 * KiB)).not.toBeNull();
    expect(get(root.open(http, { ...identity, etag: '"new"' }, 64 * KiB), 0, 64 * KiB)).toBeNull();
    expect(
      get(root.open(JSON.stringify(["http", "http://h/other.raw"]), identity, 64 * KiB), 0, 4096),
    ).toBeNull();
    expect(get(root.open(http, identity, 128 * KiB), 0, 4096)).toBeNull();
    const s3 = (endpoint: string) =>
      JSON.stringify(["s3", `${endpoint}/golden/base.raw`, "golden", "base.raw"]);
    root.open(s3("http://127.0.0.1:9000"), identity, 64 * KiB).put(0, pattern(64 * KiB, 2));
    expect(get(root.open(s3("http://127.0.0.1:9000"), identity, 64 * KiB), 0, 4096)).not.toBeNull();
    expect(get(root.open(s3("http://127.0.0.1:9001"), identity, 64 * KiB), 0, 4096)).toBeNull();
  });

  it("stores parts of a block: what was stored reads back, the rest is a miss; another handle sees it", () => {
    const root = new CacheRoot(tempDir());
    const data = pattern(3 * MiB, 9);
    const a = root.open(http, identity, MiB);
    const b = root.open(http, identity, MiB); // another process, its block file already open
    expect(get(b, MiB + 64 * KiB, 4096)).toBeNull();
    a.put(MiB + 64 * KiB, data.subarray(MiB + 64 * KiB, MiB + 128 * KiB));
    expect(
      get(a, MiB + 64 * KiB, 64 * KiB)!.equals(data.subarray(MiB + 64 * KiB, MiB + 128 * KiB)),
    ).toBe(true);
    expect(
      get(b, MiB + 70 * KiB, 1000)!.equals(data.subarray(MiB + 70 * KiB, MiB + 70 * KiB + 1000)),
    ).toBe(true);
    expect(get(a, MiB + 60 * KiB, 8 * KiB)).toBeNull(); // half outside what was stored
    expect(get(a, MiB, 4096)).toBeNull();
    expect(a.has(MiB + 64 * KiB, 64 * KiB)).toBe(true);
    expect(a.has(MiB + 64 * KiB, 68 * KiB)).toBe(false);
    // A range across two block files.
    a.put(2 * MiB - 64 * KiB, data.subarray(2 * MiB - 64 * KiB, 2 * MiB + 64 * KiB));
    expect(
      get(b, 2 * MiB - 5000, 10_000)!.equals(data.subarray(2 * MiB - 5000, 2 * MiB + 5000)),
    ).toBe(true);
    // The block file is sparse: it takes about what was stored, not the whole block.
    const file = path.join(a.dir, "1.blk");
    expect(fs.statSync(file).blocks * 512).toBeLessThan(512 * KiB);
    expect(a.cachedBytes()).toBe(192 * KiB);
    const state = cacheState(root.dir);
    expect(state).toMatchObject({ badChunks: [], badFiles: [], tmp: 0, bytes: 192 * KiB });
  });

  it("checks every chunk a read covers, aligned or not; a damaged chunk is a miss, cleared, and stored again", () => {
    const root = new CacheRoot(tempDir());
    const data = pattern(64 * KiB, 5);
    const c = root.open(http, identity, 64 * KiB);
    c.put(0, data);
    const file = path.join(c.dir, "0.blk");
    const damage = (pos: number) => {
      const fd = fs.openSync(file, "r+");
      fs.writeSync(fd, Buffer.from([0x5a]), 0, 1, pos);
      fs.closeSync(fd);
    };
    const header = headerSize(64 * KiB);
    // Whole chunks (read straight into the caller's buffer) and a read across chunk edges.
    expect(get(c, 8 * KiB, 4 * KiB)!.equals(data.subarray(8 * KiB, 12 * KiB))).toBe(true);
    expect(get(c, 8 * KiB - 100, 300)!.equals(data.subarray(8 * KiB - 100, 8 * KiB + 200))).toBe(
      true,
    );
    for (const [at, len] of [
      [8 * KiB, 4 * KiB],
      [8 * KiB + 10, 100],
    ] as const) {
      damage(header + 9 * KiB);
      expect(get(c, 4 * KiB, 4 * KiB)).not.toBeNull(); // another chunk: still good
      expect(get(c, at, len)).toBeNull();
      expect(cacheState(root.dir).badChunks).toEqual([]); // its entry is gone, not left bad
      expect(get(c, 0, 8 * KiB)).not.toBeNull();
      c.put(8 * KiB, data.subarray(8 * KiB, 12 * KiB)); // fetched again
      expect(get(c, at, len)!.equals(data.subarray(at, at + len))).toBe(true);
    }
    expect(c.stats.corrupt).toBe(2);
    // A header naming another block (a key byte changed) is never read; the file goes.
    damage(9);
    const fresh = root.open(http, identity, 64 * KiB);
    expect(get(fresh, 0, 4 * KiB)).toBeNull();
    expect(fs.existsSync(file)).toBe(false);
    c.close();
    fresh.close();
  });

  it("stays under its size limit by evicting the least recently used blocks, counting the space they take", () => {
    const dir = tempDir();
    const root = new CacheRoot(dir, 640 * KiB);
    const c = root.open(http, identity, 64 * KiB);
    for (let i = 0; i < 20; i++) {
      c.put(i * 64 * KiB, pattern(64 * KiB, i));
      // Distinct ages, oldest first (mtime has coarse resolution on some file systems).
      const old = new Date(Date.now() - (100 - i) * 1000);
      fs.utimesSync(path.join(c.dir, `${i}.blk`), old, old);
    }
    const left = blockFiles(dir);
    const total = left.reduce((s, f) => s + fs.statSync(f).blocks * 512, 0);
    expect(total).toBeLessThanOrEqual(640 * KiB);
    expect(c.stats.evicted).toBeGreaterThan(0);
    // The newest blocks are the ones kept, and they still verify.
    expect(get(c, 19 * 64 * KiB, 64 * KiB)!.equals(pattern(64 * KiB, 19))).toBe(true);
    expect(get(c, 0, 64 * KiB)).toBeNull();
  });

  it("removes temp files of killed writers once they are stale, never reads them", () => {
    const dir = tempDir();
    const root = new CacheRoot(dir, 64 * KiB);
    const c = root.open(http, identity, 64 * KiB);
    const stale = path.join(c.dir, "3.blk.999.dead.tmp");
    const fresh = path.join(c.dir, "4.blk.999.beef.tmp");
    fs.writeFileSync(stale, "half a block");
    fs.writeFileSync(fresh, "a block being written right now");
    const old = new Date(Date.now() - 3600_000);
    fs.utimesSync(stale, old, old);
    expect(get(c, 3 * 64 * KiB, 4096)).toBeNull();
    c.put(0, pattern(64 * KiB, 1));
    c.put(64 * KiB, pattern(64 * KiB, 2)); // over the limit: a scan runs
    expect(fs.existsSync(stale)).toBe(false);
    expect(fs.existsSync(fresh)).toBe(true);
  });

  it("a full cache file system: stores what fits, says so once, leaves no partial chunk and no empty file", async () => {
    const dir = path.join(tempDir(), "cache");
    await smallFileSystem("tmpfs", dir, 2);
    const warnings: string[] = [];
    const root = new CacheRoot(dir);
    const c = root.open(http, identity, MiB, (m) => warnings.push(m));
    const data = pattern(identity.size, 3);
    for (let off = 0; off < identity.size; off += 256 * KiB) {
      c.put(off, data.subarray(off, off + 256 * KiB));
    }
    expect(c.stats.storeFailures).toBeGreaterThan(0);
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toMatch(
      /cannot store fetched blocks \(the file system is full\).*once per mount/,
    );
    const state = cacheState(dir);
    expect(state.badChunks).toEqual([]);
    expect(state.badFiles).toEqual([]);
    expect(state.tmp).toBe(0);
    expect(state.bytes).toBeGreaterThan(512 * KiB);
    // Every block file holds something, and what it holds reads back right.
    for (const f of state.files) {
      const index = Number(path.basename(f, ".blk"));
      expect(c.has(index * MiB, 4096)).toBe(true);
    }
    for (let off = 0; off < identity.size; off += 64 * KiB) {
      const got = get(c, off, 64 * KiB);
      if (got) expect(got.equals(data.subarray(off, off + 64 * KiB))).toBe(true);
    }
    c.close();
  });

  it("lives in /var/cache/addcow for root, else under XDG_CACHE_HOME", () => {
    if (process.getuid?.() === 0) expect(defaultCacheRoot({})).toBe("/var/cache/addcow");
    else expect(defaultCacheRoot({ XDG_CACHE_HOME: "/x" })).toBe("/x/addcow");
  });
});
