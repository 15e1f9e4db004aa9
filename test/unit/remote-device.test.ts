import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, tempDir, writePatternFile } from "../helpers/mount";
import { servedBase, startNginx, startProxy, startS3 } from "../helpers/remote-servers";
import { openRemoteDevice } from "../../src/remote/open-remote-device";
import { remoteSettingsFromEnv } from "../../src/remote/options";
import type { RemoteDevice } from "../../src/remote/remote-device";
import { AddCowError } from "../../src/util/errors";

afterEach(cleanupAll);

const BASE_BYTES = 5 * (1 << 20) + 12345; // not a multiple of the block size

/** A base image file in dir/www and an nginx serving it. */
function served(opts: { tls?: boolean; bearer?: string } = {}) {
  return servedBase(BASE_BYTES, 3, opts);
}

function settings(dir: string, env: NodeJS.ProcessEnv = {}) {
  return remoteSettingsFromEnv({
    ADDCOW_CACHE_DIR: path.join(dir, "cache"),
    ADDCOW_REMOTE_BLOCK_SIZE: "256K",
    ADDCOW_REMOTE_TIMEOUT: "2",
    ADDCOW_REMOTE_RETRIES: "2",
    ...env,
  });
}

const quiet = { warn: () => undefined };

async function open(url: string, dir: string, env: NodeJS.ProcessEnv = {}) {
  const s = settings(dir, env);
  s.device = { ...s.device, ...quiet };
  return openRemoteDevice(url, s);
}

/** Random reads compared with the same ranges of the local file. */
async function readsLikeFile(dev: RemoteDevice, file: string, count = 60): Promise<void> {
  const local = fs.readFileSync(file);
  expect(dev.size).toBe(local.length);
  let seed = 11;
  const rnd = (n: number) => {
    seed = (seed * 1103515245 + 12345) & 0x7fffffff;
    return seed % n;
  };
  for (let i = 0; i < count; i++) {
    const len = 1 + rnd(700_000);
    const off = rnd(local.length - len);
    const buf = Buffer.alloc(len, 0xee);
    await dev.read(buf, off);
    expect(buf.equals(local.subarray(off, off + len)), `[${off}, +${len})`).toBe(true);
  }
  const tail = Buffer.alloc(100);
  await dev.read(tail, local.length - 100);
  expect(tail.equals(local.subarray(local.length - 100))).toBe(true);
}

async function failure(p: Promise<unknown>): Promise<AddCowError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(AddCowError);
  return err as AddCowError;
}

describe("remote device over real servers", () => {
  it("http: random reads return the file's bytes; identity from ETag and Last-Modified", async () => {
    const { dir, base, url } = await served();
    const dev = await open(url, dir);
    try {
      expect(dev.objectIdentity.etag).toMatch(/^"/);
      expect(dev.objectIdentity.lastModified).not.toBeNull();
      await readsLikeFile(dev, base);
      const d = dev.describe();
      expect(d).toMatchObject({ format: "raw", name: url, files: [] });
      expect(d.details).toMatchObject({ remote: true, size: BASE_BYTES, blockSize: 256 << 10 });
    } finally {
      await dev.close();
    }
  });

  it("https with a self-signed certificate: refused without its CA, read with ADDCOW_CA_FILE", async () => {
    const { dir, base, url, nginx } = await served({ tls: true });
    const err = await failure(open(url, dir));
    expect(err.reason).toBe("remote");
    expect(err.message).toMatch(/certificate is not trusted.*ADDCOW_CA_FILE/);
    const dev = await open(url, dir, { ADDCOW_CA_FILE: nginx.caFile! });
    try {
      await readsLikeFile(dev, base, 20);
    } finally {
      await dev.close();
    }
  });

  it("a bearer token comes from ADDCOW_HTTP_TOKEN or the auth file; without it: access denied", async () => {
    const { dir, base, url } = await served({ bearer: "s3cr3t" });
    const err = await failure(open(url, dir));
    expect(err).toMatchObject({ reason: "remote", code: "EACCES" });
    expect(err.message).toMatch(/access denied \(HTTP 401\).*ADDCOW_HTTP_TOKEN/);
    const byEnv = await open(url, dir, { ADDCOW_HTTP_TOKEN: "s3cr3t" });
    await readsLikeFile(byEnv, base, 5);
    await byEnv.close();
    const authFile = path.join(dir, "auth.json");
    fs.writeFileSync(
      authFile,
      JSON.stringify({ [url.replace(/base\.raw$/, "")]: { token: "s3cr3t" } }),
    );
    const byFile = await open(url, dir, { ADDCOW_HTTP_AUTH_FILE: authFile });
    await readsLikeFile(byFile, base, 5);
    await byFile.close();
  });

  // s3rver accepts SigV4-signed requests and checks the access key id, but does not
  // verify v4 signatures: a wrong secret would pass, so the test uses an unknown key id.
  it("s3 (s3rver, SigV4-signed): reads return the object's bytes; an unknown key is refused", async () => {
    const dir = tempDir();
    const base = path.join(dir, "base.raw");
    writePatternFile(base, BASE_BYTES, 4);
    const s3 = await startS3(path.join(dir, "s3"), ["images"]);
    await s3.put("images", "golden/base.raw", base);
    const dev = await open("s3://images/golden/base.raw", dir, s3.env);
    try {
      await readsLikeFile(dev, base, 20);
    } finally {
      await dev.close();
    }
    const bad = await failure(
      open("s3://images/golden/base.raw", dir, { ...s3.env, AWS_ACCESS_KEY_ID: "NOBODY" }),
    );
    expect(bad).toMatchObject({ reason: "remote", code: "EACCES" });
    const missing = await failure(open("s3://images/nothere.raw", dir, s3.env));
    expect(missing).toMatchObject({ reason: "remote", code: "ENOENT" });
  });

  it("open errors are one line each: 404, DNS, refused connection, no range support", async () => {
    const { dir, url, nginx } = await served();
    const notFound = await failure(open(url.replace("base.raw", "missing.raw"), dir));
    expect(notFound.message).toMatch(/not found \(HTTP 404\)$/);
    const dns = await failure(open("http://no-such-host.invalid/base.raw", dir));
    expect(dns.message).toMatch(/cannot be resolved/);
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    await proxy.stop();
    const refused = await failure(
      open(`${proxy.url}/base.raw`, dir, { ADDCOW_REMOTE_RETRIES: "0" }),
    );
    expect(refused.message).toMatch(/connection refused/);
    // A server that ignores Range answers 200 with the whole file.
    const noRanges = tempDir();
    fs.mkdirSync(path.join(noRanges, "www"));
    fs.copyFileSync(path.join(dir, "www", "base.raw"), path.join(noRanges, "www", "base.raw"));
    const plain = await startNginx(path.join(noRanges, "run"), path.join(noRanges, "www"), {
      extra: "max_ranges 0;",
    });
    const err = await failure(open(`${plain.baseUrl}base.raw`, dir));
    expect(err.message).toMatch(/does not support range requests/);
    for (const e of [notFound, dns, refused, err]) {
      expect(e.reason).toBe("remote");
      expect(e.message).not.toMatch(/\n/);
    }
  });
});

describe("remote device faults (through a fault-injecting proxy)", () => {
  async function viaProxy() {
    const s = await served();
    const proxy = await startProxy(`http://127.0.0.1:${s.nginx.port}`);
    const url = `${proxy.url}/base.raw`;
    return { ...s, proxy, url };
  }

  it("500 answers: retried, then EIO; reads work again once the server recovers", async () => {
    const { dir, base, proxy, url } = await viaProxy();
    const dev = await open(url, dir, { ADDCOW_CACHE_DIR: "none" });
    try {
      proxy.mode = { kind: "status", status: 500 };
      const before = proxy.requests;
      const err = await failure(dev.read(Buffer.alloc(4096), 0));
      expect(err).toMatchObject({ code: "EIO", reason: "remote" });
      expect(err.message).toMatch(/HTTP 500/);
      expect(proxy.requests - before).toBe(3); // the first attempt and 2 retries
      proxy.mode = { kind: "pass" };
      await readsLikeFile(dev, base, 10);
    } finally {
      await dev.close();
    }
  });

  it("answers cut short are retried and never return wrong bytes", async () => {
    const { dir, base, proxy, url } = await viaProxy();
    const dev = await open(url, dir, { ADDCOW_CACHE_DIR: "none", ADDCOW_REMOTE_RETRIES: "0" });
    try {
      proxy.mode = { kind: "cut" };
      const err = await failure(dev.read(Buffer.alloc(300_000), 1000));
      expect(err.code).toBe("EIO");
      proxy.mode = { kind: "pass" };
      await readsLikeFile(dev, base, 10);
    } finally {
      await dev.close();
    }
  });

  it("a server that does not answer: EIO after the timeout and retries, not a hang", async () => {
    const { dir, proxy, url } = await viaProxy();
    const dev = await open(url, dir, {
      ADDCOW_CACHE_DIR: "none",
      ADDCOW_REMOTE_TIMEOUT: "0.5",
      ADDCOW_REMOTE_RETRIES: "1",
    });
    try {
      proxy.mode = { kind: "hang" };
      const t0 = Date.now();
      const err = await failure(dev.read(Buffer.alloc(4096), 0));
      expect(err.message).toMatch(/no answer within the timeout/);
      // Two attempts of 0.5 s and one pause; generous bound for a loaded machine.
      expect(Date.now() - t0).toBeLessThan(10_000);
      proxy.mode = { kind: "delay", ms: 50 };
      const buf = Buffer.alloc(4096);
      await dev.read(buf, 0);
    } finally {
      await dev.close();
    }
  });

  it("the server stops mid-run: EIO; back again: the same device reads on", async () => {
    const { dir, base, nginx, url } = await viaProxy();
    const dev = await open(url, dir, { ADDCOW_CACHE_DIR: "none", ADDCOW_REMOTE_RETRIES: "1" });
    try {
      await nginx.stop();
      const err = await failure(dev.read(Buffer.alloc(4096), 3 << 20));
      expect(err.code).toBe("EIO");
      await nginx.start();
      await readsLikeFile(dev, base, 10);
    } finally {
      await dev.close();
    }
  });

  it("the object changes: refused with EIO, and every later read too (no mixing of images)", async () => {
    const { dir, base, url } = await viaProxy();
    const warnings: string[] = [];
    const s = settings(dir, { ADDCOW_CACHE_DIR: "none" });
    s.device = { ...s.device, warn: (m) => warnings.push(m) };
    const dev = await openRemoteDevice(url, s);
    try {
      const first = Buffer.alloc(1000);
      await dev.read(first, 0);
      // Replace the file (new inode, new ETag), as an image update would.
      writePatternFile(base + ".new", BASE_BYTES, 99);
      // HTTP validators have one-second resolution: make the new version's mtime differ.
      fs.utimesSync(base + ".new", new Date(2001, 1, 1), new Date(2001, 1, 1));
      fs.renameSync(base + ".new", base);
      const err = await failure(dev.read(Buffer.alloc(1000), 4 << 20));
      expect(err).toMatchObject({ code: "EIO", reason: "remote" });
      expect(err.message).toMatch(/changed since the disk was opened/);
      // Even a block still in memory is refused now.
      await failure(dev.read(Buffer.alloc(1000), 0));
      expect(warnings.filter((w) => /changed/.test(w))).toHaveLength(1);
    } finally {
      await dev.close();
    }
  });
});

describe("remote device requests", () => {
  it("adjacent missing blocks go out as one request; a sequential reader is read ahead of", async () => {
    const { dir, base, nginx } = await served();
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const dev = await open(`${proxy.url}/base.raw`, dir, { ADDCOW_CACHE_DIR: "none" });
    const local = fs.readFileSync(base);
    try {
      // 2 MiB = 8 blocks of 256 KiB, none cached: one range request.
      let before = proxy.requests;
      const two = Buffer.alloc(2 << 20);
      await dev.read(two, 0);
      expect(two.equals(local.subarray(0, 2 << 20))).toBe(true);
      expect(proxy.requests - before).toBe(1);
      // Sequential 64 KiB reads through the next 2 MiB: readahead (a window
      // doubling from 128 KiB) keeps the requests far fewer than the 32 reads.
      before = proxy.requests;
      for (let off = 2 << 20; off < 4 << 20; off += 65536) {
        const b = Buffer.alloc(65536);
        await dev.read(b, off);
        expect(b.equals(local.subarray(off, off + 65536))).toBe(true);
      }
      expect(proxy.requests - before).toBeLessThanOrEqual(6);
      expect(dev.stats.memoryHits).toBeGreaterThan(20);
      expect(dev.stats.readaheadBytes).toBeGreaterThan(0);
    } finally {
      await dev.close();
    }
  });
});

describe("the shared block cache", () => {
  it("a second device on the same object fetches nothing; a damaged entry is refetched", async () => {
    const { dir, base, nginx } = await served();
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const purl = `${proxy.url}/base.raw`;
    const a = await open(purl, dir);
    await readsLikeFile(a, base, 40);
    const whole = Buffer.alloc(a.size);
    await a.read(whole, 0);
    await a.close();
    const before = proxy.requests;
    const b = await open(purl, dir);
    await readsLikeFile(b, base, 40);
    expect(proxy.requests - before).toBe(1); // the probe at open only
    expect(b.stats.bytesFetched).toBe(0);
    // Damage a chunk of one cached block and cut another block file short: the
    // chunk's piece (64 KiB) and the whole block (its header is gone) are fetched again.
    const cacheDir = String(b.describe().details!.cacheDir);
    const blk = (i: number) => path.join(cacheDir, `${i}.blk`);
    const fd = fs.openSync(blk(3), "r+");
    fs.writeSync(fd, Buffer.from([0xff, 0x00, 0xff]), 0, 3, 5000);
    fs.closeSync(fd);
    fs.truncateSync(blk(7), 1000);
    fs.writeFileSync(path.join(cacheDir, "9.blk.123.abcd.tmp"), "leftover of a killed writer");
    await b.close();
    const c = await open(purl, dir);
    const local = fs.readFileSync(base);
    const buf = Buffer.alloc(c.size);
    await c.read(buf, 0);
    expect(buf.equals(local)).toBe(true);
    expect(c.stats.bytesFetched).toBe((256 << 10) + (64 << 10));
    await c.close();
  });
});
