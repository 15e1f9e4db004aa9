/**
 * Redirects in front of a remote base: small servers on 127.0.0.1 and
 * 127.0.0.2 that redirect (and record what reached them) in front of nginx.
 * Chains are followed for the probe and every read, loops and endless chains
 * are refused in one line, credentials never reach another origin (a
 * presigned-URL style 302), https never falls back to http.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll } from "../helpers/mount";
import { servedBase, startNginx, startRedirector } from "../helpers/remote-servers";
import { openDevice, refused } from "../helpers/remote-devices";
import type { RemoteDevice } from "../../src/remote/remote-device";

afterEach(cleanupAll);

const BASE = 3 * (1 << 20) + 777;

function open(url: string, env: NodeJS.ProcessEnv = {}): Promise<RemoteDevice> {
  return openDevice(url, {
    ADDCOW_CACHE_DIR: "none",
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "0",
    ...env,
  });
}

/** Reads spread over the object, compared with the file. */
async function readsLike(dev: RemoteDevice, file: string): Promise<void> {
  const local = fs.readFileSync(file);
  expect(dev.size).toBe(local.length);
  for (const [off, len] of [
    [0, 4096],
    [1 << 20, 300_000],
    [local.length - 5000, 5000],
  ] as const) {
    const buf = Buffer.alloc(len);
    await dev.read(buf, off);
    expect(buf.equals(local.subarray(off, off + len))).toBe(true);
  }
}

describe("redirects", () => {
  it("a chain of 302, 307 and 301 across two origins is followed; the identity is the final answer's", async () => {
    const { base, url } = await servedBase(BASE, 8);
    const b = await startRedirector("127.0.0.2", (p) =>
      p === "/c" ? { status: 301, location: url } : { status: 404 },
    );
    const a = await startRedirector("127.0.0.1", (p) => {
      if (p === "/chain/a") return { status: 302, location: "/chain/b" };
      if (p === "/chain/b") return { status: 307, location: `${b.origin}/c` };
      return { status: 404 };
    });
    const direct = await open(url);
    const dev = await open(`${a.origin}/chain/a`);
    try {
      expect(dev.objectIdentity).toEqual(direct.objectIdentity);
      await readsLike(dev, base);
      // Temporary redirects are asked again for every request.
      expect(a.seen.filter((r) => r.path === "/chain/a").length).toBeGreaterThanOrEqual(4);
      expect(dev.name).toBe(`${a.origin}/chain/a`);
    } finally {
      await dev.close();
      await direct.close();
    }
  });

  it("a permanent redirect is remembered: later requests go straight to its target", async () => {
    const { base, url } = await servedBase(BASE, 9);
    const a = await startRedirector("127.0.0.1", () => ({ status: 308, location: url }));
    const dev = await open(`${a.origin}/moved.raw`);
    try {
      await readsLike(dev, base);
      expect(a.seen).toHaveLength(1);
    } finally {
      await dev.close();
    }
  });

  it("a redirect loop and an endless chain are refused in one line each", async () => {
    const a = await startRedirector("127.0.0.1", (p) => {
      if (p === "/loop/x") return { status: 302, location: "/loop/y" };
      if (p === "/loop/y") return { status: 303, location: "/loop/x" };
      const n = /^\/n\/(\d+)$/.exec(p);
      if (n) return { status: 302, location: `/n/${Number(n[1]) + 1}` };
      if (p === "/nowhere") return { status: 302 };
      return { status: 404 };
    });
    const loop = await refused(open(`${a.origin}/loop/x`));
    expect(loop).toMatchObject({ reason: "remote" });
    expect(loop.message).toMatch(/redirect loop \(.*\/loop\/x -> .*\/loop\/y -> .*\/loop\/x\)/);
    const before = a.seen.length;
    const endless = await refused(open(`${a.origin}/n/0`));
    expect(endless.message).toMatch(/more than 10 redirects/);
    expect(a.seen.length - before).toBe(11); // the first request and 10 hops
    const bare = await refused(open(`${a.origin}/nowhere`));
    expect(bare.message).toMatch(/HTTP 302 without a Location/);
  });

  it("a presigned-URL style 302 to another origin: the token reaches only the disk's origin", async () => {
    const { base, url } = await servedBase(BASE, 10);
    let expired = false;
    const store = await startRedirector(
      "127.0.0.2",
      (_p, req) => {
        // Like S3: a query-signed request that also carries an Authorization header is refused.
        if (req.headers.authorization) return { status: 400 };
        return expired ? { status: 403 } : "pass";
      },
      url,
    );
    const presigned = `${store.origin}/bucket/base.raw?X-Amz-Signature=deadbeefcafe&X-Amz-Expires=60`;
    const front = await startRedirector("127.0.0.1", (_p, req) =>
      req.headers.authorization === "Bearer s3cr3t"
        ? { status: 302, location: presigned }
        : { status: 401 },
    );
    const dev = await open(`${front.origin}/images/base.raw`, { ADDCOW_HTTP_TOKEN: "s3cr3t" });
    try {
      await readsLike(dev, base);
      expect(front.seen.length).toBeGreaterThanOrEqual(4);
      expect(front.seen.every((r) => r.authorization === "Bearer s3cr3t")).toBe(true);
      expect(store.seen.length).toBe(front.seen.length);
      expect(store.seen.every((r) => r.authorization === null)).toBe(true);
      // An expired signature: EIO that names where it was sent, never the signature.
      expired = true;
      const err = await refused(dev.read(Buffer.alloc(4096), 2 << 20));
      expect(err.code).toBe("EIO");
      expect(err.message).toContain(`redirected to ${store.origin}/bucket/base.raw?...`);
      expect(err.message).not.toContain("deadbeef");
    } finally {
      await dev.close();
    }
    // The auth file's entry for the front origin is not sent to the store either.
    const authFile = path.join(path.dirname(base), "auth.json");
    fs.writeFileSync(authFile, JSON.stringify({ [front.origin]: { token: "s3cr3t" } }));
    expired = false;
    const byFile = await open(`${front.origin}/images/base.raw`, {
      ADDCOW_HTTP_AUTH_FILE: authFile,
    });
    try {
      await readsLike(byFile, base);
      expect(store.seen.every((r) => r.authorization === null)).toBe(true);
    } finally {
      await byFile.close();
    }
  });

  it("redirects that start after the disk was opened are followed too", async () => {
    const { base, url } = await servedBase(BASE, 11);
    let moved = false;
    const a = await startRedirector(
      "127.0.0.1",
      () => (moved ? { status: 302, location: url } : "pass"),
      url,
    );
    const dev = await open(`${a.origin}/base.raw`);
    try {
      await dev.read(Buffer.alloc(4096), 0);
      moved = true;
      await readsLike(dev, base);
    } finally {
      await dev.close();
    }
  });

  it("https never redirects to plain http", async () => {
    const { dir, url } = await servedBase(BASE, 12);
    const tls = await startNginx(path.join(dir, "tls-run"), path.join(dir, "www"), {
      tls: true,
      extra: `location /down { return 302 ${url}; }`,
    });
    const err = await refused(open(`${tls.baseUrl}down`, { ADDCOW_CA_FILE: tls.caFile! }));
    expect(err.message).toMatch(/HTTP 302 from https to plain http .*: not followed/);
  });
});
