/**
 * Redirects of a tenant's URL obey the operator's decision for it
 * (chain/url-policy.ts): every hop is asked, a hop to an origin the operator
 * did not allow is refused before it is contacted, and the operator's
 * credentials go only where they were lent. Stand-in servers on 127.0.0.x
 * record what reached them.
 */
import * as fs from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll } from "../helpers/mount";
import { servedBase, startRedirector } from "../helpers/remote-servers";
import { refused } from "../helpers/remote-devices";
import { type UrlRules, judgeUrl } from "../../src/chain/url-policy";
import { openRemoteDevice } from "../../src/remote/open-remote-device";
import { remoteSettingsFromEnv } from "../../src/remote/options";

afterEach(cleanupAll);

const BASE = 1 << 20;
const TENANT = [{ uid: 65534, owns: "/home/tenant/vm.add-cow" }];

async function tenantOpen(url: string, rules: UrlRules) {
  const decision = await judgeUrl(rules, url, {
    writers: TENANT,
    confined: false,
    role: "backing file",
  });
  const settings = remoteSettingsFromEnv({
    ADDCOW_CACHE_DIR: "none",
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "0",
    ADDCOW_HTTP_TOKEN: "operator-secret",
  });
  settings.device = { ...settings.device, warn: () => undefined };
  return openRemoteDevice(url, settings, { access: decision.access });
}

describe("a tenant's URL that redirects", () => {
  it("a hop to an origin the operator did not allow is refused and never contacted", async () => {
    const { url } = await servedBase(BASE, 3);
    const other = await startRedirector("127.0.0.3", () => ({ status: 302, location: url }));
    const a = await startRedirector("127.0.0.2", () => ({
      status: 302,
      location: `${other.origin}/base.raw`,
    }));
    const rules: UrlRules = { any: false, origins: [a.origin], auth: [] };
    const err = await refused(tenantOpen(`${a.origin}/base.raw`, rules));
    expect(err.message).toMatch(/HTTP 302 to http:\/\/127\.0\.0\.3:\d+\/base\.raw: /);
    expect(a.seen.length).toBeGreaterThan(0);
    expect(other.seen).toHaveLength(0);
  });

  it("credentials go only to the origin they were lent to, and not at all when none were", async () => {
    const { base, url } = await servedBase(BASE, 4);
    // B passes requests on to nginx and records their headers.
    const b = await startRedirector("127.0.0.3", () => "pass", url);
    const a = await startRedirector("127.0.0.2", (p) =>
      p === "/base.raw" ? { status: 302, location: `${b.origin}/base.raw` } : { status: 404 },
    );
    const lent: UrlRules = { any: false, origins: [a.origin, b.origin], auth: [a.origin] };
    const dev = await tenantOpen(`${a.origin}/base.raw`, lent);
    try {
      const buf = Buffer.alloc(4096);
      await dev.read(buf, 4096);
      expect(buf.equals(fs.readFileSync(base).subarray(4096, 8192))).toBe(true);
    } finally {
      await dev.close();
    }
    expect(a.seen.every((r) => r.authorization === "Bearer operator-secret")).toBe(true);
    expect(b.seen.length).toBeGreaterThan(0);
    expect(b.seen.every((r) => r.authorization === null)).toBe(true);

    a.seen.length = 0;
    b.seen.length = 0;
    const notLent: UrlRules = { any: false, origins: [a.origin, b.origin], auth: [] };
    const again = await tenantOpen(`${a.origin}/base.raw`, notLent);
    await again.close();
    expect(a.seen.length).toBeGreaterThan(0);
    expect(a.seen.every((r) => r.authorization === null)).toBe(true);
  });
});
