/**
 * Verified blocks (docs/remote.md, "Verified blocks"): with a manifest every
 * fetched block is checked before it is used or cached, against real servers
 * (nginx, and the fault proxy serving wrong bytes under the right ETag); and
 * the cache by digest, which lets two versions of a base share their blocks.
 * Bytes served are counted by the server (nginx's access log) or the proxy.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, tempDir } from "../helpers/mount";
import { servedBase, servedBytes, startNginx, startProxy } from "../helpers/remote-servers";
import { cacheState } from "../helpers/remote-cache-layout";
import { refused } from "../helpers/remote-devices";
import { manifestBytes, manifestDigest, sha256, twoVersions } from "../helpers/manifests";
import { type RemoteOpenOptions, openRemoteDevice } from "../../src/remote/open-remote-device";
import { remoteSettingsFromEnv } from "../../src/remote/options";
import type { RemoteDevice } from "../../src/remote/remote-device";

afterEach(cleanupAll);

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 64 * KiB;

function open(
  url: string,
  env: NodeJS.ProcessEnv,
  opts: RemoteOpenOptions = {},
  warnings: string[] = [],
): Promise<RemoteDevice> {
  const s = remoteSettingsFromEnv({
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "1",
    ...env,
  });
  s.device = { ...s.device, warn: (m) => warnings.push(m) };
  return openRemoteDevice(url, s, opts);
}

/** Pinned as `create` pins the manifest at URL.manifest. */
const pinned = (bytes: Buffer): RemoteOpenOptions => ({
  manifest: { location: null, sha256: manifestDigest(bytes) },
});

async function readAt(dev: RemoteDevice, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  await dev.read(buf, offset);
  return buf;
}

async function failure(p: Promise<unknown>): Promise<Error> {
  const err = await p.then(
    () => null,
    (e: unknown) => e as Error,
  );
  expect(err).toBeInstanceOf(Error);
  return err!;
}

const hex16 = (d: Buffer) => d.toString("hex").slice(0, 16);

describe("verified blocks", () => {
  it("a flipped digest: EIO for exactly that block's reads, one log line, nothing of it kept; other blocks read and are cached by digest", async () => {
    const SIZE = 4 * MiB + 3000;
    const { dir, base, nginx } = await servedBase(SIZE, 31);
    const local = fs.readFileSync(base);
    const m = manifestBytes(local, BS, [20]);
    fs.writeFileSync(`${base}.manifest`, m);
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const cache = path.join(dir, "cache");
    const warnings: string[] = [];
    const dev = await open(
      `${proxy.url}/base.raw`,
      { ADDCOW_CACHE_DIR: cache, ADDCOW_REMOTE_READAHEAD: "0" },
      pinned(m),
      warnings,
    );
    try {
      const truth = sha256(local.subarray(20 * BS, 21 * BS));
      const err = await failure(readAt(dev, 20 * BS + 4096, 4096));
      expect(err.message).toMatch(
        new RegExp(
          `^remote backing http://127\\.0\\.0\\.1:\\d+/base\\.raw: block 20 \\(bytes 1310720-1376255\\) does not match its manifest http://127\\.0\\.0\\.1:\\d+/base\\.raw\\.manifest: sha256 expected ${hex16(m.subarray(32 + 32 * 20))}\\.\\.\\., got ${hex16(truth)}\\.\\.\\.`,
        ),
      );
      expect((err as NodeJS.ErrnoException).code).toBe("EIO");
      // Again: fetched again (nothing of it was kept), failing again, not said again.
      const before = proxy.requests;
      await failure(readAt(dev, 20 * BS, 100));
      expect(proxy.requests).toBeGreaterThan(before);
      expect(warnings.filter((w) => /does not match its manifest/.test(w))).toHaveLength(1);
      // Its neighbours, and every other block, read right.
      expect((await readAt(dev, 19 * BS, BS)).equals(local.subarray(19 * BS, 20 * BS))).toBe(true);
      expect((await readAt(dev, 21 * BS, BS)).equals(local.subarray(21 * BS, 22 * BS))).toBe(true);
      for (let off = 0; off < SIZE; off += BS) {
        if (off === 20 * BS) continue;
        const len = Math.min(BS, SIZE - off);
        expect((await readAt(dev, off, len)).equals(local.subarray(off, off + len)), `${off}`).toBe(
          true,
        );
      }
      // A read that covers it fails as a whole.
      await failure(readAt(dev, 19 * BS, 3 * BS));
      await dev.settled();
      expect(dev.describe().details).toMatchObject({
        verifiedBy: { blockSize: BS, blocks: 65, sha256: manifestDigest(m) },
      });
    } finally {
      await dev.close();
    }
    const state = cacheState(cache);
    expect(state.badDigests).toEqual([]);
    expect(state.files).toEqual([]); // no entry keyed by URL
    const stored = new Set(state.digests);
    for (let n = 0; n < 65; n++) {
      const d = sha256(local.subarray(n * BS, (n + 1) * BS)).toString("hex");
      expect(stored.has(d), `block ${n}`).toBe(n !== 20);
    }
    expect(stored.has(m.subarray(32 + 32 * 20, 64 + 32 * 20).toString("hex"))).toBe(false);
  });

  it("a mirror serving wrong bytes under the right ETag: believed without a manifest; with one, EIO for that block and nothing cached", async () => {
    const SIZE = 3 * MiB;
    const { dir, base, nginx } = await servedBase(SIZE, 32);
    const local = fs.readFileSync(base);
    const m = manifestBytes(local, BS);
    fs.writeFileSync(`${base}.manifest`, m);
    const bad = 2 * MiB + 12345;
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`, {
      kind: "corrupt",
      at: [bad],
    });
    const url = `${proxy.url}/base.raw`;
    const unchecked = await open(url, { ADDCOW_CACHE_DIR: "none" });
    try {
      const got = await readAt(unchecked, 2 * MiB, BS);
      expect(got.equals(local.subarray(2 * MiB, 2 * MiB + BS))).toBe(false); // today's gap
    } finally {
      await unchecked.close();
    }
    const cache = path.join(dir, "cache");
    const warnings: string[] = [];
    const dev = await open(url, { ADDCOW_CACHE_DIR: cache }, pinned(m), warnings);
    try {
      const err = await failure(readAt(dev, bad - 10, 20));
      expect(err.message).toMatch(/block 32 \(bytes 2097152-2162687\) does not match its manifest/);
      expect((await readAt(dev, 0, 2 * MiB)).equals(local.subarray(0, 2 * MiB))).toBe(true);
      const after = 2 * MiB + BS;
      expect((await readAt(dev, after, SIZE - after)).equals(local.subarray(after))).toBe(true);
      await dev.settled();
    } finally {
      await dev.close();
    }
    expect(warnings).toHaveLength(1);
    const state = cacheState(cache);
    expect(state.badDigests).toEqual([]);
    expect(state.digests).toHaveLength(47);
    expect(state.digests).not.toContain(sha256(local.subarray(32 * BS, 33 * BS)).toString("hex"));
  });

  it("verify=required refuses a base without a manifest in one line; one published at URL.manifest is then used, unpinned", async () => {
    const { base, url } = await servedBase(MiB, 33);
    const none = await refused(open(url, { ADDCOW_CACHE_DIR: "none" }, { verify: "required" }));
    expect(none.message).toMatch(
      /^remote backing http:\/\/127\.0\.0\.1:\d+\/base\.raw: verification is required \(verify=required\) but it has no manifest: none is pinned in the disk and none is published at http:\/\/127\.0\.0\.1:\d+\/base\.raw\.manifest \(HTTP 404\); publish one there \(addcow manifest http:/,
    );
    // The same from the environment, as every command reads it.
    await refused(open(url, { ADDCOW_CACHE_DIR: "none", ADDCOW_VERIFY: "required" }));
    expect(() => remoteSettingsFromEnv({ ADDCOW_VERIFY: "yes" })).toThrow(
      /^invalid ADDCOW_VERIFY=yes: use verify=required/,
    );
    // Without it, the base opens unchecked.
    const plain = await open(url, { ADDCOW_CACHE_DIR: "none" });
    expect(plain.verifiedBy).toBeNull();
    await plain.close();
    const local = fs.readFileSync(base);
    const m = manifestBytes(local, BS, [3]);
    fs.writeFileSync(`${base}.manifest`, m);
    const dev = await open(url, { ADDCOW_CACHE_DIR: "none", ADDCOW_VERIFY: "required" });
    try {
      expect(dev.verifiedBy).toMatchObject({ sha256: manifestDigest(m) });
      // Checked against, not pinned: the disk's pin (none) still compares equal.
      expect((await dev.identity()).manifest).toBeNull();
      await failure(readAt(dev, 3 * BS, 10));
      expect((await readAt(dev, 0, 3 * BS)).equals(local.subarray(0, 3 * BS))).toBe(true);
    } finally {
      await dev.close();
    }
    // A manifest of another size is refused at open.
    fs.writeFileSync(`${base}.manifest`, manifestBytes(local.subarray(0, MiB - 1), BS));
    const other = await refused(open(url, { ADDCOW_CACHE_DIR: "none", ADDCOW_VERIFY: "required" }));
    expect(other.message).toMatch(
      /has 1048576 bytes, but its manifest .*base\.raw\.manifest describes a base of 1048575/,
    );
  });

  it("manifest blocks larger than a piece widen a fetch to whole blocks; smaller ones are checked inside each piece", async () => {
    const SIZE = 8 * MiB;
    const { base, nginx } = await servedBase(SIZE, 34);
    const local = fs.readFileSync(base);
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const url = `${proxy.url}/base.raw`;
    const env = { ADDCOW_CACHE_DIR: "none", ADDCOW_REMOTE_READAHEAD: "0" };
    const big = manifestBytes(local, MiB);
    fs.writeFileSync(`${base}.manifest`, big);
    let dev = await open(url, env, pinned(big));
    try {
      const start = proxy.bytes;
      const got = await readAt(dev, 5 * MiB + 100 * KiB, 4096);
      expect(got.equals(local.subarray(5 * MiB + 100 * KiB, 5 * MiB + 104 * KiB))).toBe(true);
      expect(proxy.bytes - start).toBe(MiB);
    } finally {
      await dev.close();
    }
    const small = manifestBytes(local, 4096, [100]);
    fs.writeFileSync(`${base}.manifest`, small);
    dev = await open(url, env, pinned(small));
    try {
      const start = proxy.bytes;
      expect((await readAt(dev, 0, 4096)).equals(local.subarray(0, 4096))).toBe(true);
      expect(proxy.bytes - start).toBe(BS); // a 64 KiB piece, checked as 16 blocks
      // Block 100 (4 KiB) is in piece 6: that piece's reads fail, the next piece's do not.
      const err = await failure(readAt(dev, 100 * 4096, 4096));
      expect(err.message).toMatch(/block 100 \(bytes 409600-413695\) does not match/);
      expect((await readAt(dev, 7 * BS, 4096)).equals(local.subarray(7 * BS, 7 * BS + 4096))).toBe(
        true,
      );
    } finally {
      await dev.close();
    }
  });

  it("v2 differing from v1 in 5% of its blocks fetches about 5% once v1 is cached (bytes counted by nginx)", async () => {
    const dir = tempDir();
    const SIZE = 16 * MiB;
    const { www, blocks, changed, v1, v2 } = twoVersions(dir, SIZE, BS, 35);
    fs.writeFileSync(path.join(www, "v1.raw.manifest"), manifestBytes(v1, BS));
    fs.writeFileSync(path.join(www, "v2.raw.manifest"), manifestBytes(v2, BS));
    const nginx = await startNginx(path.join(dir, "nginx"), www);
    const env = { ADDCOW_CACHE_DIR: path.join(dir, "cache") };
    const readAll = async (name: string, data: Buffer) => {
      const m = fs.readFileSync(path.join(www, `${name}.manifest`));
      const dev = await open(`${nginx.baseUrl}${name}`, env, pinned(m));
      try {
        for (let off = 0; off < SIZE; off += MiB) {
          expect((await readAt(dev, off, MiB)).equals(data.subarray(off, off + MiB))).toBe(true);
        }
        await dev.settled();
      } finally {
        await dev.close();
      }
    };
    await readAll("v1.raw", v1);
    expect(servedBytes(nginx.requests(), "/v1.raw")).toBe(SIZE);
    await readAll("v2.raw", v2);
    const fetched = servedBytes(nginx.requests(), "/v2.raw");
    // Exactly the changed blocks: 13 of 256, 5.1%.
    expect(changed).toHaveLength(13);
    expect(fetched).toBe(changed.length * BS);
    expect(cacheState(env.ADDCOW_CACHE_DIR).digests).toHaveLength(blocks + changed.length);
  });

  it("a stored block is checked when read back: a file holding other bytes is fetched again, the reader gets the right ones", async () => {
    const SIZE = 2 * MiB;
    const { dir, base, nginx } = await servedBase(SIZE, 36);
    const local = fs.readFileSync(base);
    const m = manifestBytes(local, BS);
    fs.writeFileSync(`${base}.manifest`, m);
    const url = `${nginx.baseUrl}base.raw`;
    const env = { ADDCOW_CACHE_DIR: path.join(dir, "cache") };
    let dev = await open(url, env, pinned(m));
    expect((await readAt(dev, 0, SIZE)).equals(local)).toBe(true);
    await dev.settled();
    await dev.close();
    // Block 9's file: other bytes, CRC entries rewritten to match them.
    const d = sha256(local.subarray(9 * BS, 10 * BS)).toString("hex");
    const file = path.join(env.ADDCOW_CACHE_DIR, "v3", "sha256", d.slice(0, 2), `${d}.blk`);
    const raw = fs.readFileSync(file);
    raw[4096 + 5000] = raw[4096 + 5000]! ^ 1;
    const zlib = await import("node:zlib");
    raw.writeUInt32LE(zlib.crc32(raw.subarray(4096 + 4096, 4096 + 8192)), 48 + 8);
    fs.writeFileSync(file, raw);
    const before = servedBytes(nginx.requests(), "/base.raw");
    dev = await open(url, env, pinned(m));
    try {
      const got = await readAt(dev, 9 * BS + 4096, 4096);
      expect(got.equals(local.subarray(9 * BS + 4096, 9 * BS + 8192))).toBe(true);
      await dev.settled();
    } finally {
      await dev.close();
    }
    expect(servedBytes(nginx.requests(), "/base.raw") - before).toBeGreaterThanOrEqual(BS);
    expect(cacheState(env.ADDCOW_CACHE_DIR).badDigests).toEqual([]);
  });
});

describe("the store of blocks by digest and a tenant's URL", () => {
  it("a tenant's URL is verified against its manifest but cached by URL, never in the shared digest store", async () => {
    const SIZE = 1 * MiB;
    const { dir, base, url } = await servedBase(SIZE, 41);
    const local = fs.readFileSync(base);
    const m = manifestBytes(local, BS);
    fs.writeFileSync(`${base}.manifest`, m);
    const origin = new URL(url).origin;
    const { judgeUrl } = await import("../../src/chain/url-policy");
    const decision = await judgeUrl({ any: false, origins: [origin], auth: [] }, url, {
      writers: [{ uid: 65534, owns: "/home/tenant/vm.add-cow" }],
      confined: false,
      role: "backing file",
    });
    const cache = path.join(dir, "cache");
    const dev = await open(
      url,
      { ADDCOW_CACHE_DIR: cache },
      { ...pinned(m), access: decision.access },
    );
    try {
      expect((await readAt(dev, 0, SIZE)).equals(local)).toBe(true);
      await dev.settled();
      expect(dev.describe().details).toMatchObject({ verifiedBy: { sha256: manifestDigest(m) } });
    } finally {
      await dev.close();
    }
    const state = cacheState(cache);
    expect(state.digests).toEqual([]);
    expect(state.files.length).toBeGreaterThan(0);
  });
});
