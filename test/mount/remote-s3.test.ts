/**
 * S3 specifics against s3rver (SigV4) behind the fault proxy: S3's error codes
 * named in the messages (at open, at create and in the daemon's log) with what
 * to do, SlowDown retried; and the block cache keyed by the endpoint, so two
 * endpoints serving the same bucket/key with the same ETag, Last-Modified and
 * size never share a cached block.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { ADDCOW } from "../helpers/cli";
import { cleanupAll, mountDisk, run, tempDir, writePatternFile } from "../helpers/mount";
import { startProxy, startS3 } from "../helpers/remote-servers";
import { openDevice, refused } from "../helpers/remote-devices";

afterEach(cleanupAll);

const SIZE = 3 * (1 << 20) + 4096;
const URL = "s3://golden/base.raw";

function s3Error(code: string, message: string, extra = ""): string {
  return `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code><Message>${message}</Message>${extra}<RequestId>4442587FB7D0A2F9</RequestId><HostId>h</HostId></Error>`;
}

const INVALID_TOKEN = {
  kind: "status" as const,
  status: 400,
  body: s3Error(
    "InvalidToken",
    "The provided token is malformed or otherwise invalid.",
    "<Token-0>x</Token-0>",
  ),
};
const WRONG_REGION = {
  kind: "status" as const,
  status: 400,
  body: s3Error(
    "AuthorizationHeaderMalformed",
    "The authorization header is malformed; the region 'us-east-1' is wrong; expecting 'eu-west-1'",
    "<Region>eu-west-1</Region>",
  ),
};
const slowDown = (times?: number) => ({
  kind: "status" as const,
  status: 503,
  body: s3Error("SlowDown", "Please reduce your request rate."),
  ...(times !== undefined ? { times } : {}),
});

/** s3rver with golden/base.raw (pattern `seed`), behind a fault proxy; env points at the proxy. */
async function store(seed: number) {
  const dir = tempDir();
  const base = path.join(dir, "base.raw");
  writePatternFile(base, SIZE, seed);
  const s3 = await startS3(path.join(dir, "s3"), ["golden"]);
  await s3.put("golden", "base.raw", base);
  const proxy = await startProxy(s3.endpoint);
  const env = { ...s3.env, ADDCOW_S3_ENDPOINT: proxy.url };
  return { dir, base, s3, proxy, env };
}

function open(env: NodeJS.ProcessEnv, extra: NodeJS.ProcessEnv = {}) {
  return openDevice(URL, {
    ADDCOW_CACHE_DIR: "none",
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "2",
    ...env,
    ...extra,
  });
}

describe("S3 error codes", () => {
  it("InvalidToken and AuthorizationHeaderMalformed are named, with what to do, at open", async () => {
    const { proxy, env } = await store(1);
    proxy.mode = INVALID_TOKEN;
    const token = await refused(open(env));
    expect(token).toMatchObject({ reason: "remote", code: "EACCES" });
    expect(token.message).toMatch(
      /session token is malformed or not valid \(S3 InvalidToken\); check AWS_SESSION_TOKEN/,
    );
    proxy.mode = WRONG_REGION;
    const region = await refused(open(env));
    expect(region.code).toBe("EINVAL");
    expect(region.message).toMatch(
      /bucket is in region eu-west-1, .*\(S3 AuthorizationHeaderMalformed\); set AWS_REGION=eu-west-1$/,
    );
    // Any other code is named too, with the store's words on one line.
    proxy.mode = {
      kind: "status",
      status: 403,
      body: s3Error("AccountProblem", "There is a problem\nwith your account."),
    };
    const other = await refused(open(env));
    expect(other.message).toMatch(
      /access denied \(HTTP 403, S3 AccountProblem: There is a problem with your account\.\)/,
    );
  });

  it("SlowDown is retried, at open and on reads; when it does not pass, the read's EIO names it", async () => {
    const { base, proxy, env } = await store(2);
    proxy.mode = slowDown(2);
    const dev = await open(env);
    try {
      proxy.mode = slowDown(2);
      const buf = Buffer.alloc(100_000);
      await dev.read(buf, 1 << 20);
      expect(buf.equals(fs.readFileSync(base).subarray(1 << 20, (1 << 20) + 100_000))).toBe(true);
      expect(dev.stats.retries).toBe(2);
      proxy.mode = slowDown();
      const err = await refused(dev.read(Buffer.alloc(4096), 2 << 20));
      expect(err.code).toBe("EIO");
      expect(err.message).toMatch(/the store asks to slow down \(S3 SlowDown, HTTP 503\)/);
    } finally {
      await dev.close();
    }
  });

  it("at create and in the daemon's log", async () => {
    const { dir, proxy, env } = await store(3);
    const fullEnv = {
      ...process.env,
      ...env,
      ADDCOW_CACHE_DIR: "none",
      ADDCOW_REMOTE_RETRIES: "0",
    };
    const disk = path.join(dir, "vm.add-cow");
    proxy.mode = INVALID_TOKEN;
    const bad = await run(process.execPath, [ADDCOW, "create", "-b", URL, "-F", "raw", disk], {
      env: fullEnv,
    });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr.trim().split("\n")).toHaveLength(1);
    expect(bad.stderr).toMatch(/S3 InvalidToken.*AWS_SESSION_TOKEN/);
    expect(fs.existsSync(disk)).toBe(false);
    proxy.mode = WRONG_REGION;
    const wrong = await run(process.execPath, [ADDCOW, "create", "-b", URL, "-F", "raw", disk], {
      env: fullEnv,
    });
    expect(wrong.stderr).toMatch(/set AWS_REGION=eu-west-1/);
    proxy.mode = { kind: "pass" };
    const ok = await run(process.execPath, [ADDCOW, "create", "-q", "-b", URL, "-F", "raw", disk], {
      env: fullEnv,
    });
    expect(ok.code, ok.stderr).toBe(0);
    const log = path.join(dir, "daemon.log");
    const m = await mountDisk(disk, path.join(dir, "m"), {
      env: { ...fullEnv, ADDCOW_MOUNT_LOG: log },
    });
    proxy.mode = INVALID_TOKEN;
    const r = await run("dd", [
      `if=${m.file}`,
      "of=/dev/null",
      "bs=64k",
      "count=1",
      "skip=20",
      "iflag=direct",
    ]);
    expect(r.stderr).toMatch(/Input\/output error/);
    await m.unmount();
    expect(fs.readFileSync(log, "utf8")).toMatch(/S3 InvalidToken.*\(the read fails with EIO\)/);
  }, 120_000);
});

describe("the block cache key", () => {
  it("two endpoints serve golden/base.raw with the same ETag, Last-Modified and size but other bytes: the second never reads the first's blocks", async () => {
    const one = await store(4);
    const two = await store(5);
    const same = {
      etag: '"0123456789abcdef0123456789abcdef"',
      "last-modified": "Mon, 30 Nov 2026 06:00:00 GMT",
    };
    one.proxy.rewrite = same;
    two.proxy.rewrite = same;
    const cache = { ADDCOW_CACHE_DIR: path.join(tempDir(), "cache") };
    const a = await open(one.env, cache);
    const b = await open(two.env, cache);
    try {
      // Identity alone cannot tell them apart.
      expect(b.objectIdentity).toEqual(a.objectIdentity);
      const all = Buffer.alloc(SIZE);
      await a.read(all, 0);
      expect(all.equals(fs.readFileSync(one.base))).toBe(true);
      expect(a.stats.bytesFetched).toBe(SIZE);
      const other = Buffer.alloc(SIZE);
      await b.read(other, 0);
      expect(other.equals(fs.readFileSync(two.base))).toBe(true);
      expect(b.stats.cacheHits).toBe(0);
      expect(b.stats.bytesFetched).toBe(SIZE);
    } finally {
      await a.close();
      await b.close();
    }
    // Each endpoint's own second device reads from the cache.
    const again = await open(two.env, cache);
    try {
      const buf = Buffer.alloc(SIZE);
      await again.read(buf, 0);
      expect(buf.equals(fs.readFileSync(two.base))).toBe(true);
      expect(again.stats.bytesFetched).toBe(0);
    } finally {
      await again.close();
    }
  });
});
