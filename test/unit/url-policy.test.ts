/**
 * The URL rules (chain/url-policy.ts) on their own: origins, addresses, the
 * checked lookup every connection of a tenant's URL goes through (DNS
 * rebinding), the options that spell the rules, and the fixed line for an
 * origin allowed by the wildcard only.
 */
import type * as dns from "node:dns";
import * as net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import {
  NO_URL_RULES,
  TenantAccess,
  type UrlRules,
  isInternalAddress,
  judgeUrl,
  originOf,
  parseOrigins,
  urlRulesCover,
} from "../../src/chain/url-policy";
import { openRemoteBacking } from "../../src/chain/open-remote";
import { OPERATOR_ACCESS } from "../../src/remote/access";
import { spellBareAllowUrl, trustFromFlags } from "../../src/cli/confine-options";
import { cleanupAll } from "../helpers/mount";
import { closedPort, standIn } from "../helpers/stand-ins";

afterEach(cleanupAll);

const rules = (r: Partial<UrlRules>): UrlRules => ({ ...NO_URL_RULES, ...r });

/** A resolver that answers each call with the next list of addresses. */
function resolverOf(...answers: string[][]) {
  const calls: string[] = [];
  const resolve = (
    host: string,
    _opts: dns.LookupAllOptions,
    cb: (err: NodeJS.ErrnoException | null, a: dns.LookupAddress[]) => void,
  ) => {
    calls.push(host);
    const next = answers.shift() ?? [];
    cb(
      null,
      next.map((address) => ({ address, family: net.isIP(address) })),
    );
  };
  return { resolve, calls };
}

function lookup(access: TenantAccess, host: string, all = false) {
  return new Promise<{ err: NodeJS.ErrnoException | null; address: unknown }>((resolve) =>
    access.lookup(host, { all }, (err, address) => resolve({ err, address })),
  );
}

describe("origins and addresses", () => {
  it("origins are compared as scheme, host and port (default port dropped), s3 by bucket", () => {
    expect(originOf("HTTPS://Images.Example.com:443/a/b?c")).toBe("https://images.example.com");
    expect(originOf("http://127.0.0.2:8080/x")).toBe("http://127.0.0.2:8080");
    expect(originOf("s3://Golden/base.raw")).toBe("s3://golden");
    expect(
      parseOrigins("https://a.example, s3://golden,http://127.0.0.2:80/", "--allow-url"),
    ).toEqual(["https://a.example", "s3://golden", "http://127.0.0.2"]);
    expect(() => parseOrigins("https://a.example/images", "--allow-url")).toThrow(
      /an origin has no path/,
    );
  });

  it("loopback, link-local and unspecified addresses, in every spelling, are internal", () => {
    for (const a of [
      "127.0.0.1",
      "127.9.9.9",
      "::1",
      "169.254.169.254",
      "fe80::1",
      "0.0.0.0",
      "::",
      "::ffff:127.0.0.1",
      "::ffff:169.254.1.1",
      "[::1]",
    ]) {
      expect(isInternalAddress(a), a).toBe(true);
    }
    for (const a of ["10.0.0.1", "192.168.1.1", "8.8.8.8", "2001:db8::1", "example.com"]) {
      expect(isInternalAddress(a), a).toBe(false);
    }
  });
});

describe("a tenant's URL", () => {
  const writers = [{ uid: 65534, owns: "/t/disk.add-cow" }];
  const how = { writers, confined: false, role: "backing file", namedIn: "/t/disk.add-cow" };

  it("the operator's own URL is fetched as before; a tenant's needs its origin allowed", async () => {
    const own = await judgeUrl(NO_URL_RULES, "http://127.0.0.2/x", { ...how, writers: [] });
    expect(own.access).toBe(OPERATOR_ACCESS);
    await expect(judgeUrl(NO_URL_RULES, "https://evil.example/x", how)).rejects.toThrow(
      /is refused: it is a URL in a disk of uid 65534, who owns \/t\/disk\.add-cow, and another user's disk may name only the origins the operator allows .*https:\/\/evil\.example is not one/,
    );
    await expect(
      judgeUrl(NO_URL_RULES, "https://evil.example/x", { ...how, writers: [], confined: true }),
    ).rejects.toThrow(/a confined disk may use URL backings only with --allow-url/);
  });

  it("credentials go only to origins lent; literal internal addresses only when listed", async () => {
    const r = rules({
      any: true,
      origins: ["http://127.0.0.2:8080"],
      auth: ["https://lent.example"],
    });
    const a = new TenantAccess(r, "https://lent.example");
    expect(a.signed).toBe(true);
    expect(a.hop(new URL("https://lent.example/x"))).toEqual({ allowed: true, credentials: true });
    expect(a.hop(new URL("https://other.example/x"))).toEqual({
      allowed: true,
      credentials: false,
    });
    expect(a.hop(new URL("http://127.0.0.2:8080/x"))).toEqual({
      allowed: true,
      credentials: false,
    });
    // Redirect hops are judged the same way: another port of a listed host is not listed.
    expect(a.hop(new URL("http://127.0.0.2:22/x")).allowed).toBe(false);
    expect(a.hop(new URL("http://[::ffff:169.254.169.254]/x")).allowed).toBe(false);
    expect(new TenantAccess(r, "s3://golden").signed).toBe(false);
  });

  it("every address of a name is checked, on every connection (DNS rebinding)", async () => {
    const r = rules({ any: true });
    // The first answer is public, the second adds the metadata service, the third is loopback only.
    const { resolve, calls } = resolverOf(
      ["203.0.113.7"],
      ["203.0.113.7", "169.254.169.254"],
      ["127.0.0.1"],
    );
    const a = new TenantAccess(r, "https://rebind.example", resolve);
    const first = await lookup(a, "rebind.example");
    expect(first.err).toBe(null);
    expect(first.address).toBe("203.0.113.7");
    const second = await lookup(a, "rebind.example", true);
    expect(second.err?.code).toBe("EADDRNOTALLOWED");
    expect(second.err?.message).toMatch(/rebind\.example resolves to 169\.254\.169\.254/);
    expect((await lookup(a, "rebind.example")).err?.code).toBe("EADDRNOTALLOWED");
    expect(calls).toEqual(["rebind.example", "rebind.example", "rebind.example"]);
    // A listed host name may have internal addresses.
    const listed = new TenantAccess(
      rules({ origins: ["http://localhost:8080"] }),
      "http://localhost:8080",
      resolverOf(["127.0.0.1", "::1"]).resolve,
    );
    expect((await lookup(listed, "localhost", true)).address).toEqual([
      { address: "127.0.0.1", family: 4 },
      { address: "::1", family: 6 },
    ]);
  });

  it("with the wildcard only, what the server answered is one fixed line", async () => {
    const whole = await standIn("127.0.0.2", Buffer.alloc(4096), "whole");
    const closed = await closedPort("127.0.0.2");
    const decision = { access: OPERATOR_ACCESS, quiet: true };
    const settings = {
      device: { retries: 0, timeoutMs: 3000, blockSize: 65536 },
      cache: null,
      env: {},
    };
    const lines: string[] = [];
    for (const url of [`${whole.origin}/x.raw`, `http://127.0.0.2:${closed}/x.raw`]) {
      const err = await openRemoteBacking(
        url,
        "raw",
        false,
        "/t/d.add-cow",
        settings,
        decision,
      ).catch((e: Error) => e);
      lines.push((err as Error).message.replace(url, "URL"));
    }
    expect(lines[0]).toBe(lines[1]);
    expect(lines[0]).toMatch(
      /^remote backing URL \(named in \/t\/d\.add-cow\) cannot be used; what its server answered is not shown/,
    );
    // Listed, the answer is told (the operator named that server).
    const told = await openRemoteBacking(
      `${whole.origin}/x.raw`,
      "raw",
      false,
      undefined,
      settings,
      {
        access: OPERATOR_ACCESS,
        quiet: false,
      },
    ).catch((e: Error) => e);
    expect((told as Error).message).toMatch(/does not support range requests/);
  });

  it("a live job's URL rules must cover the mount's", () => {
    expect(urlRulesCover(NO_URL_RULES, rules({ origins: ["s3://golden"] }))).toBe(true);
    expect(urlRulesCover(rules({ any: true }), rules({ origins: ["s3://golden"] }))).toBe(false);
    expect(
      urlRulesCover(rules({ auth: ["s3://golden"] }), rules({ origins: ["s3://golden"] })),
    ).toBe(false);
  });
});

describe("the options", () => {
  it("a bare --allow-url keeps its old meaning (any origin, confined) and never eats the disk's name", () => {
    expect(spellBareAllowUrl(["info", "--allow-url", "d.add-cow"])).toEqual([
      "info",
      "--allow-url=*",
      "d.add-cow",
    ]);
    expect(spellBareAllowUrl(["info", "--allow-url", "https://a.example", "d.add-cow"])).toEqual([
      "info",
      "--allow-url",
      "https://a.example",
      "d.add-cow",
    ]);
    expect(spellBareAllowUrl(["info", "d.add-cow", "--allow-url"])).toEqual([
      "info",
      "d.add-cow",
      "--allow-url=*",
    ]);
    expect(trustFromFlags({ allowUrl: ["*"] })).toEqual({
      confine: { allowDirs: [], allowUrls: true },
      urls: { any: true, origins: [], auth: [] },
    });
    expect(trustFromFlags({ allowUrl: ["https://a.example,s3://g"], urlAuth: ["s3://g"] })).toEqual(
      {
        confine: null,
        urls: { any: false, origins: ["https://a.example", "s3://g"], auth: ["s3://g"] },
      },
    );
  });
});
