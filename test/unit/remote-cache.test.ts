import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { CacheRoot, defaultCacheRoot } from "../../src/remote/block-cache";
import { cleanupAll, tempDir } from "../helpers/mount";
import { pattern } from "../helpers/pattern";

afterEach(cleanupAll);

const KiB = 1024;
const identity = { size: 10 << 20, etag: '"abc"', lastModified: "Mon, 30 Nov 2026 06:00:00 GMT" };

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

describe("the block cache on disk", () => {
  it("keys entries by URL and identity: another ETag or URL is another entry", () => {
    const root = new CacheRoot(tempDir());
    const a = root.open("http://h/base.raw", identity, 64 * KiB);
    a.put(0, pattern(64 * KiB, 1));
    expect(root.open("http://h/base.raw", identity, 64 * KiB).get(0, 64 * KiB)).not.toBeNull();
    expect(
      root.open("http://h/base.raw", { ...identity, etag: '"new"' }, 64 * KiB).get(0, 64 * KiB),
    ).toBeNull();
    expect(root.open("http://h/other.raw", identity, 64 * KiB).get(0, 64 * KiB)).toBeNull();
    // A block of another length than asked for is not used either.
    expect(a.get(0, 32 * KiB)).toBeNull();
  });

  it("checks every chunk a read covers, aligned or not; a damaged chunk or header is a miss and goes", () => {
    const root = new CacheRoot(tempDir());
    const data = pattern(64 * KiB, 5);
    const fresh = () => {
      const c = root.open("http://h/base.raw", identity, 64 * KiB);
      c.put(0, data);
      return c;
    };
    const read = (c: ReturnType<typeof fresh>, at: number, len: number) => {
      const buf = Buffer.alloc(len);
      return c.read(0, 64 * KiB, at, buf) ? buf : null;
    };
    const damage = (c: ReturnType<typeof fresh>, pos: number) => {
      const fd = fs.openSync(path.join(c.dir, "0.blk"), "r+");
      fs.writeSync(fd, Buffer.from([0x5a]), 0, 1, pos);
      fs.closeSync(fd);
    };
    const header = 32 + 4 * 16;
    let c = fresh();
    // Whole chunks (read straight into the caller's buffer) and a read across chunk edges.
    expect(read(c, 8 * KiB, 4 * KiB)!.equals(data.subarray(8 * KiB, 12 * KiB))).toBe(true);
    expect(read(c, 8 * KiB - 100, 300)!.equals(data.subarray(8 * KiB - 100, 8 * KiB + 200))).toBe(
      true,
    );
    for (const [at, len] of [
      [8 * KiB, 4 * KiB],
      [8 * KiB + 10, 100],
    ] as const) {
      c.close();
      c = fresh();
      damage(c, header + 9 * KiB);
      expect(read(c, 4 * KiB, 4 * KiB)).not.toBeNull(); // another chunk: still good
      expect(read(c, at, len)).toBeNull();
      expect(fs.existsSync(path.join(c.dir, "0.blk"))).toBe(false);
      expect(c.stats.corrupt).toBe(1);
    }
    // A header naming another block (a key byte changed) is never read.
    c.close();
    c = fresh();
    damage(c, 9);
    expect(read(c, 0, 4 * KiB)).toBeNull();
    expect(fs.existsSync(path.join(c.dir, "0.blk"))).toBe(false);
    c.close();
  });

  it("stays under its size limit by evicting the least recently used blocks", () => {
    const dir = tempDir();
    const root = new CacheRoot(dir, 640 * KiB);
    const c = root.open("http://h/base.raw", identity, 64 * KiB);
    for (let i = 0; i < 20; i++) {
      c.put(i, pattern(64 * KiB, i));
      // Distinct ages, oldest first (mtime has coarse resolution on some file systems).
      const old = new Date(Date.now() - (100 - i) * 1000);
      fs.utimesSync(path.join(c.dir, `${i}.blk`), old, old);
    }
    const left = blockFiles(dir);
    const total = left.reduce((s, f) => s + fs.statSync(f).size, 0);
    expect(total).toBeLessThanOrEqual(640 * KiB);
    expect(c.stats.evicted).toBeGreaterThan(0);
    // The newest blocks are the ones kept, and they still verify.
    expect(c.get(19, 64 * KiB)!.equals(pattern(64 * KiB, 19))).toBe(true);
    expect(c.get(0, 64 * KiB)).toBeNull();
  });

  it("removes temp files of killed writers once they are stale, never reads them", () => {
    const dir = tempDir();
    const root = new CacheRoot(dir, 64 * KiB);
    const c = root.open("http://h/base.raw", identity, 64 * KiB);
    const stale = path.join(c.dir, "3.blk.999.dead.tmp");
    const fresh = path.join(c.dir, "4.blk.999.beef.tmp");
    fs.writeFileSync(stale, "half a block");
    fs.writeFileSync(fresh, "a block being written right now");
    const old = new Date(Date.now() - 3600_000);
    fs.utimesSync(stale, old, old);
    expect(c.get(3, 64 * KiB)).toBeNull();
    c.put(0, pattern(64 * KiB, 1));
    c.put(1, pattern(64 * KiB, 2)); // over the limit: a scan runs
    expect(fs.existsSync(stale)).toBe(false);
    expect(fs.existsSync(fresh)).toBe(true);
  });

  it("lives in /var/cache/addcow for root, else under XDG_CACHE_HOME", () => {
    if (process.getuid?.() === 0) expect(defaultCacheRoot({})).toBe("/var/cache/addcow");
    else expect(defaultCacheRoot({ XDG_CACHE_HOME: "/x" })).toBe("/x/addcow");
  });
});
