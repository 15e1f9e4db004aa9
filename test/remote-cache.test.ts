import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { CacheRoot, defaultCacheRoot } from "../src/remote/block-cache";
import { cleanupAll, tempDir } from "./helpers/mount";
import { pattern } from "./helpers/pattern";

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
