import { AddCowError } from "../util/errors";

/** Where a remote backing lives, parsed from its stored name. */
export type RemoteLocation =
  | { scheme: "http" | "https"; url: URL; name: string }
  | { scheme: "s3"; bucket: string; key: string; name: string };

const REMOTE_NAME = /^(https?|s3):\/\//i;

/**
 * True for a backing name that is an absolute URL (http://, https://, s3://).
 * Such a name is never resolved as a path; anything else is a path, never a URL
 * (a file called "http:" in the disk's directory stays reachable as ./http:...).
 */
export function isRemoteName(name: string): boolean {
  return REMOTE_NAME.test(name);
}

/**
 * Parses a remote backing name. Credentials never belong in it (it is stored
 * in the .add-cow file): a URL with user:password@ is refused, and `name` is
 * the form shown in messages, logs and cache keys.
 */
export function parseRemoteName(stored: string): RemoteLocation {
  let url: URL;
  try {
    url = new URL(stored);
  } catch {
    throw invalid(displayName(stored), "it is not a valid URL");
  }
  if (url.username !== "" || url.password !== "") {
    throw invalid(
      stripCredentials(url),
      "it contains credentials (user:password@); give them through the environment or the auth file instead (docs/remote.md)",
    );
  }
  const scheme = url.protocol.slice(0, -1).toLowerCase();
  if (scheme === "http" || scheme === "https") {
    if (url.hostname === "") throw invalid(stored, "it names no host");
    url.hash = "";
    return { scheme, url, name: url.toString() };
  }
  if (scheme === "s3") {
    const bucket = url.hostname;
    const key = decodeURIComponent(url.pathname.replace(/^\//, ""));
    if (bucket === "" || key === "") throw invalid(stored, "use s3://BUCKET/KEY");
    return { scheme, bucket, key, name: `s3://${bucket}/${key}` };
  }
  throw invalid(displayName(stored), "use http://, https:// or s3://");
}

/** The URL without any user:password@ part, safe to print. */
export function stripCredentials(url: URL): string {
  const copy = new URL(url.toString());
  copy.username = "";
  copy.password = "";
  return copy.toString();
}

/** A stored name as it may be shown: URLs lose any credentials, paths are unchanged. */
export function displayName(stored: string): string {
  if (!isRemoteName(stored)) return stored;
  try {
    return stripCredentials(new URL(stored));
  } catch {
    return stored.replace(/\/\/[^/@]*@/, "//");
  }
}

function invalid(name: string, why: string): AddCowError {
  return new AddCowError(`remote backing ${name} cannot be used: ${why}`, {
    reason: "remote",
    file: name,
    code: "EINVAL",
  });
}
