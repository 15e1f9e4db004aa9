import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { AddCowError } from "../util/errors";

/**
 * Credentials for http(s) backings. Never stored in a disk's files: they come
 * from the environment or from an auth file (docs/remote.md):
 *   ADDCOW_HTTP_TOKEN                      bearer token for every URL
 *   ADDCOW_HTTP_USER, ADDCOW_HTTP_PASSWORD basic auth for every URL
 *   ADDCOW_HTTP_AUTH_FILE                  JSON { "URL prefix": { "token" } | { "user", "password" } }
 *                                          default $XDG_CONFIG_HOME/addcow/http-auth.json
 * The environment wins; in the file the longest matching prefix wins.
 */
export const HTTP_AUTH_HELP =
  "set ADDCOW_HTTP_TOKEN (bearer) or ADDCOW_HTTP_USER and ADDCOW_HTTP_PASSWORD, or add the URL to the auth file (docs/remote.md)";

type AuthEntry = { token: string } | { user: string; password: string };

export function defaultAuthFile(env: NodeJS.ProcessEnv = process.env): string {
  const base = env.XDG_CONFIG_HOME || path.join(os.homedir(), ".config");
  return path.join(base, "addcow", "http-auth.json");
}

function header(entry: AuthEntry): string {
  if ("token" in entry) return `Bearer ${entry.token}`;
  return `Basic ${Buffer.from(`${entry.user}:${entry.password}`).toString("base64")}`;
}

function readAuthFile(file: string): Record<string, AuthEntry> {
  let text: string;
  try {
    text = fs.readFileSync(file, "utf8");
  } catch {
    return {};
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    throw new AddCowError(`auth file ${file} is not valid JSON; see docs/remote.md`, {
      file,
      reason: "remote",
      code: "EINVAL",
    });
  }
  if (!parsed || typeof parsed !== "object") return {};
  const out: Record<string, AuthEntry> = {};
  for (const [prefix, v] of Object.entries(parsed as Record<string, unknown>)) {
    if (!v || typeof v !== "object") continue;
    const e = v as Record<string, unknown>;
    if (typeof e.token === "string") out[prefix] = { token: e.token };
    else if (typeof e.user === "string" && typeof e.password === "string") {
      out[prefix] = { user: e.user, password: e.password };
    }
  }
  return out;
}

/** The Authorization header for a URL, or null for none. */
export function authorizationFor(url: string, env: NodeJS.ProcessEnv = process.env): string | null {
  if (env.ADDCOW_HTTP_TOKEN) return header({ token: env.ADDCOW_HTTP_TOKEN });
  if (env.ADDCOW_HTTP_USER !== undefined && env.ADDCOW_HTTP_PASSWORD !== undefined) {
    return header({ user: env.ADDCOW_HTTP_USER, password: env.ADDCOW_HTTP_PASSWORD });
  }
  const entries = readAuthFile(env.ADDCOW_HTTP_AUTH_FILE || defaultAuthFile(env));
  let best: string | null = null;
  for (const prefix of Object.keys(entries)) {
    if (url.startsWith(prefix) && (best === null || prefix.length > best.length)) best = prefix;
  }
  return best === null ? null : header(entries[best]!);
}
