import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, writePatternFile } from "../helpers/mount";
import { servedBase } from "../helpers/remote-servers";
import { remoteSettingsFromEnv } from "../../src/remote/options";
import { openSharedRemoteDevice, sharedRemoteCount } from "../../src/remote/shared-remote";

afterEach(cleanupAll);

const BASE_BYTES = 3 << 20;

/** No block cache on disk by default: a block a second disk reads without a request came from memory. */
function settings(dir: string, cache = "none") {
  const s = remoteSettingsFromEnv({
    ADDCOW_CACHE_DIR: cache === "none" ? cache : path.join(dir, cache),
    ADDCOW_REMOTE_BLOCK_SIZE: "256K",
    ADDCOW_REMOTE_READAHEAD: "0",
  });
  s.device = { ...s.device, warn: () => undefined };
  return s;
}

/** GET requests nginx answered with data (not the one-byte probes). */
const dataRequests = (lines: string[]) => lines.filter((l) => !/"bytes=0-0"/.test(l)).length;

describe("remote devices shared by the disks of one process", () => {
  it("two opens of one base share a device and its memory; the last close closes it", async () => {
    const { dir, base, nginx, url } = await servedBase(BASE_BYTES, 5);
    const local = fs.readFileSync(base);
    const s = settings(dir);
    const a = await openSharedRemoteDevice(url, s);
    const b = await openSharedRemoteDevice(url, s);
    expect(sharedRemoteCount()).toEqual({ devices: 1, handles: 2 });
    const buf = Buffer.alloc(65536);
    await a.read(buf, 1 << 20);
    expect(buf.equals(local.subarray(1 << 20, (1 << 20) + 65536))).toBe(true);
    const fetched = dataRequests(nginx.requests());
    // The same range through the other disk's handle: from the shared memory cache, no request.
    buf.fill(0);
    await b.read(buf, 1 << 20);
    expect(buf.equals(local.subarray(1 << 20, (1 << 20) + 65536))).toBe(true);
    expect(dataRequests(nginx.requests())).toBe(fetched);
    await a.close();
    await a.close(); // a second close of one handle drops nothing more
    expect(sharedRemoteCount()).toEqual({ devices: 1, handles: 1 });
    await b.read(buf, 0);
    expect(buf.equals(local.subarray(0, 65536))).toBe(true);
    await b.close();
    expect(sharedRemoteCount()).toEqual({ devices: 0, handles: 0 });
  });

  it("another environment (credentials) or other settings get a device of their own", async () => {
    const { dir, url } = await servedBase(BASE_BYTES, 6);
    const a = await openSharedRemoteDevice(url, settings(dir));
    const b = await openSharedRemoteDevice(url, settings(dir, "cache"));
    expect(sharedRemoteCount()).toEqual({ devices: 2, handles: 2 });
    await a.close();
    await b.close();
    expect(sharedRemoteCount().devices).toBe(0);
  });

  it("a base that changed on the server gets a new device; the old one still refuses it", async () => {
    const { dir, base, url } = await servedBase(BASE_BYTES, 7);
    const s = settings(dir);
    const old = await openSharedRemoteDevice(url, s);
    // Replaced by another image of the same size (a new mtime, a new ETag).
    writePatternFile(base + ".new", BASE_BYTES, 8);
    const later = new Date(Date.now() + 5000);
    fs.utimesSync(base + ".new", later, later);
    fs.renameSync(base + ".new", base);
    const fresh = await openSharedRemoteDevice(url, s);
    expect(sharedRemoteCount()).toEqual({ devices: 2, handles: 2 });
    const buf = Buffer.alloc(4096);
    await fresh.read(buf, 0);
    expect(buf.equals(fs.readFileSync(base).subarray(0, 4096))).toBe(true);
    await expect(old.read(buf, 2 << 20)).rejects.toThrow(/changed since the disk was opened/);
    await old.close();
    await fresh.close();
    expect(sharedRemoteCount().devices).toBe(0);
  });

  it("each disk has its own read pattern: another disk's random reads leave its read-around on, ten disks' streams all get readahead", async () => {
    const { base, nginx, url } = await servedBase(32 << 20, 9);
    const local = fs.readFileSync(base);
    const s = remoteSettingsFromEnv({ ADDCOW_CACHE_DIR: "none" });
    s.device = { ...s.device, warn: () => undefined };
    const disks = await Promise.all(
      Array.from({ length: 10 }, () => openSharedRemoteDevice(url, s)),
    );
    expect(sharedRemoteCount()).toEqual({ devices: 1, handles: 10 });
    const read = async (d: (typeof disks)[number], off: number, len: number) => {
      const buf = Buffer.alloc(len);
      await d.read(buf, off);
      expect(buf.equals(local.subarray(off, off + len)), `[${off}, +${len})`).toBe(true);
    };
    const lines = () => nginx.requests().filter((l) => !/"bytes=0-0"/.test(l));
    // Disk 0 reads at random: 40 misses whose read-around nobody reads turn it off for disk 0.
    for (let i = 0; i < 40; i++) await read(disks[0]!, (i * 11 + 3) * 65536, 4096);
    const before = lines().length;
    await read(disks[0]!, 30 << 20, 4096);
    expect(lines()[lines().length - 1]).toMatch(/"bytes=31457280-31522815"/); // its piece alone
    // Disk 1's first miss still fetches the 2 pieces after it.
    await read(disks[1]!, 29 << 20, 4096);
    expect(lines()[lines().length - 1]).toMatch(/"bytes=30408704-30605311"/);
    expect(lines().length).toBe(before + 2);
    // Ten disks read a stream each, interleaved: more streams than a detector follows (8).
    const start = lines().length;
    for (let r = 0; r < 48; r++) {
      for (let d = 0; d < 10; d++) await read(disks[d]!, d * (3 << 20) + r * 65536, 65536);
    }
    const requests = lines().length - start;
    // Read-around alone would take a request per 3 pieces (160); with readahead once a stream
    // has read 1 MiB, 122. One detector for all (before): 375, with read-around off too.
    expect(requests).toBeLessThan(140);
    for (const d of disks) await d.close();
    expect(sharedRemoteCount().devices).toBe(0);
  });
});
