import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { AddCowError } from "../util/errors";

/**
 * Credentials for http(s) backings. Never stored in a disk's files: they come
 * from the environment or from an auth file (docs/remote.md):
 *   ADDCOW_HTTP_TOKEN                      bearer token for the disk's URL
 *   ADDCOW_HTTP_USER, ADDCOW_HTTP_PASSWORD basic auth for the disk's URL
 *   ADDCOW_HTTP_AUTH_FILE                  JSON { "URL prefix": { "token" } | { "user", "password" } }
 *                                          default $XDG_CONFIG_HOME/addcow/http-auth.json
 * The environment wins; in the file the longest matching prefix wins. A prefix
 * matches its exact origin (scheme, host and port) and paths below it on `/`
 * boundaries: `http://127.0.0.2` is not `http://127.0.0.20`, `/a` is not `/ab`.
 * Whoever sends requests asks {@link HttpCredentials.headerFor} per URL, and
 * only for the origin the disk names (a redirect elsewhere gets nothing).
 */
export const HTTP_AUTH_HELP =
  "set ADDCOW_HTTP_TOKEN (bearer) or ADDCOW_HTTP_USER and ADDCOW_HTTP_PASSWORD, or add the URL to the auth file (docs/remote.md)";

type AuthEntry = { token: string } | { user: string; password: string };

/** One auth-file entry: where it applies and what it sends. */
interface Scoped {
  origin: string;
  /** A path without a trailing slash ("" for the whole origin). */
  path: string;
  entry: AuthEntry;
}

export function defaultAuthFile(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CONFIG_HOME || path.join(os.homedir(), ".config");
  return path.join(base, "addcow", "http-auth.json");
}

function header(entry: AuthEntry): string {
  if ("token" in entry) return `Bearer ${entry.token}`;
  return `Basic ${Buffer.from(`${entry.user}:${entry.password}`).toString("base64")}`;
}

function badFile(file: string, why: string): AddCowError {
  return new AddCowError(`auth file ${file}: ${why}; see docs/remote.md`, {
    file,
    reason: "remote",
    code: "EINVAL",
  });
}

/** An entry's URL prefix as origin and path; throws for anything but an http(s) URL. */
function scopeOf(file: string, prefix: string): Omit<Scoped, "entry"> {
  let url: URL;
  try {
    url = new URL(prefix);
  } catch {
    throw badFile(file, `entry "${prefix}" is not a URL (give http(s)://HOST[:PORT][/PATH])`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw badFile(file, `entry "${prefix}" is not an http(s) URL`);
  }
  if (url.username !== "" || url.password !== "" || url.search !== "" || url.hash !== "") {
    throw badFile(
      file,
      `entry "${prefix}" has credentials, a query or a fragment: give an origin and a path only`,
    );
  }
  return { origin: url.origin, path: url.pathname.replace(/\/+$/, "") };
}

function readAuthFile(file: string): Scoped[] {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch {
    return [];
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw badFile(file, "it is not valid JSON");
  }
  if (!parsed || typeof parsed !== "object") return [];
  const out: Scoped[] = [];
  for (const [prefix, v] of Object.entries(parsed as Record<string, unknown>)) {
    if (!v || typeof v !== "object") continue;
    const e = v as Record<string, unknown>;
    let entry: AuthEntry | null = null;
    if (typeof e.token === "string") entry = { token: e.token };
    else if (typeof e.user === "string" && typeof e.password === "string") {
      entry = { user: e.user, password: e.password };
    }
    if (entry) out.push({ ...scopeOf(file, prefix), entry });
  }
  return out;
}

/** True when `url` lies under the scope: same origin, and the path is the scope's or below it. */
function covers(scope: Omit<Scoped, "entry">, url: URL): boolean {
  if (url.origin !== scope.origin) return false;
  return (
    scope.path === "" || url.pathname === scope.path || url.pathname.startsWith(`${scope.path}/`)
  );
}

/** The credentials one process may send, read once (environment and auth file). */
export class HttpCredentials {
  private constructor(
    private readonly everywhere: AuthEntry | null,
    private readonly scoped: Scoped[],
  ) {}

  static fromEnv(env: NodeJS.ProcessEnv = process.env): HttpCredentials {
    if (env.ADDCOW_HTTP_TOKEN) return new HttpCredentials({ token: env.ADDCOW_HTTP_TOKEN }, []);
    if (env.ADDCOW_HTTP_USER !== undefined && env.ADDCOW_HTTP_PASSWORD !== undefined) {
      return new HttpCredentials(
        { user: env.ADDCOW_HTTP_USER, password: env.ADDCOW_HTTP_PASSWORD },
        [],
      );
    }
    return new HttpCredentials(
      null,
      readAuthFile(env.ADDCOW_HTTP_AUTH_FILE || defaultAuthFile(env)),
    );
  }

  /** The Authorization header for a request to url, or null for none. */
  headerFor(url: URL): string | null {
    if (this.everywhere) return header(this.everywhere);
    let best: Scoped | null = null;
    for (const s of this.scoped) {
      if (covers(s, url) && (best === null || s.path.length > best.path.length)) best = s;
    }
    return best === null ? null : header(best.entry);
  }
}
