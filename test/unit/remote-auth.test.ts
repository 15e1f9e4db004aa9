/**
 * Which credentials go to which URL: auth-file entries match their exact
 * origin (scheme, host, port) and paths below them on `/` boundaries; the
 * longest match wins; a bad entry is one clear line.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { HttpCredentials } from "../../src/remote/http-auth";
import { AddCowError } from "../../src/util/errors";
import { cleanupAll, tempDir } from "../helpers/mount";

afterEach(cleanupAll);

function withFile(entries: Record<string, unknown>): HttpCredentials {
  const file = path.join(tempDir(), "http-auth.json");
  fs.writeFileSync(file, JSON.stringify(entries));
  return HttpCredentials.fromEnv({ ADDCOW_HTTP_AUTH_FILE: file });
}

const token = (t: string) => `Bearer ${t}`;

describe("auth file entries", () => {
  it("match the exact origin: another host, port or scheme gets nothing", () => {
    const c = withFile({
      "http://127.0.0.2": { token: "two" },
      "https://h.example:8443": { token: "tls" },
    });
    expect(c.headerFor(new URL("http://127.0.0.2/base.raw"))).toBe(token("two"));
    expect(c.headerFor(new URL("http://127.0.0.2:80/base.raw"))).toBe(token("two"));
    expect(c.headerFor(new URL("http://127.0.0.20/base.raw"))).toBeNull();
    expect(c.headerFor(new URL("http://127.0.0.2:8080/base.raw"))).toBeNull();
    expect(c.headerFor(new URL("https://127.0.0.2/base.raw"))).toBeNull();
    expect(c.headerFor(new URL("https://h.example:8443/x"))).toBe(token("tls"));
    expect(c.headerFor(new URL("https://H.EXAMPLE:8443/x"))).toBe(token("tls"));
    expect(c.headerFor(new URL("https://h.example/x"))).toBeNull();
    expect(c.headerFor(new URL("https://h.example.evil:8443/x"))).toBeNull();
  });

  it("match paths on / boundaries; the longest prefix wins", () => {
    const c = withFile({
      "http://h/a": { token: "a" },
      "http://h/a/b/": { user: "u", password: "p" },
    });
    expect(c.headerFor(new URL("http://h/a"))).toBe(token("a"));
    expect(c.headerFor(new URL("http://h/a/base.raw"))).toBe(token("a"));
    expect(c.headerFor(new URL("http://h/ab"))).toBeNull();
    expect(c.headerFor(new URL("http://h/ab/base.raw"))).toBeNull();
    expect(c.headerFor(new URL("http://h/"))).toBeNull();
    expect(c.headerFor(new URL("http://h/a/b/c.raw"))).toBe(
      `Basic ${Buffer.from("u:p").toString("base64")}`,
    );
    expect(c.headerFor(new URL("http://h/a/bc.raw"))).toBe(token("a"));
  });

  it("the environment's token applies to the disk's URL, whatever the file says", () => {
    const c = HttpCredentials.fromEnv({ ADDCOW_HTTP_TOKEN: "env" });
    expect(c.headerFor(new URL("http://anything/x"))).toBe(token("env"));
    expect(
      HttpCredentials.fromEnv({ ADDCOW_HTTP_AUTH_FILE: "/nonexistent/x.json" }).headerFor(
        new URL("http://h/"),
      ),
    ).toBeNull();
  });

  it("an entry that is not an origin and path is refused in one line", () => {
    for (const [key, why] of [
      ["127.0.0.2", /entry "127\.0\.0\.2" is not a URL/],
      ["ftp://h/x", /is not an http\(s\) URL/],
      ["http://u:p@h/", /credentials, a query or a fragment/],
      ["http://h/x?sig=1", /credentials, a query or a fragment/],
    ] as const) {
      let err: unknown = null;
      try {
        withFile({ [key]: { token: "t" } });
      } catch (e) {
        err = e;
      }
      expect(err).toBeInstanceOf(AddCowError);
      expect((err as Error).message).toMatch(why);
      expect((err as Error).message).toMatch(
        /^auth file .*http-auth\.json: .*; see docs\/remote\.md$/,
      );
    }
  });
});
