import * as dns from "node:dns";
import * as net from "node:net";
import { AddCowError } from "../util/errors";
import { type HopDecision, OPERATOR_ACCESS, type RemoteAccess } from "../remote/access";

/**
 * URLs and credentials are capabilities of the operator, not of the disk
 * file (docs/security.md). A URL backing name written by someone other than
 * the user running addcow (a tenant's disk, or a layer of one, or a disk
 * reached through a tenant's directory or link), or found in a confined
 * disk, is the tenant's URL:
 *
 * - its origin must be one the operator allows (--allow-url ORIGIN,...,
 *   -o allow_url=ORIGIN,...; the old bare --allow-url / -o allow_url allows
 *   any origin, and implies confinement as it always did); otherwise it is
 *   refused before anything is resolved or contacted;
 * - the operator's credentials (ADDCOW_HTTP_TOKEN, basic auth, the auth
 *   file's entry, AWS keys) go with its requests only to origins the
 *   operator lends them to (--url-auth ORIGIN,..., -o url_auth=ORIGIN,...,
 *   which allows the origin too); otherwise requests are anonymous and S3
 *   requests unsigned;
 * - loopback, link-local and unspecified addresses are refused unless the
 *   origin is listed by name (a wildcard does not list them), checked for a
 *   literal address before connecting and for every address a host name has
 *   on every connection (the connection uses the addresses checked);
 * - with a wildcard only, what the server answered is not told (one fixed
 *   line), so a tenant cannot probe servers from root's position.
 *
 * The operator's own URLs (root's disk in root's directories, unconfined, or
 * a URL on the command line) are fetched as before.
 */

export interface UrlRules {
  /** Any origin (bare --allow-url): loopback and link-local addresses still need listing. */
  any: boolean;
  /** Origins the operator allows (--allow-url ORIGIN,...). */
  origins: string[];
  /** Origins the operator lends its credentials to (--url-auth ORIGIN,...); allowed too. */
  auth: string[];
}

export const NO_URL_RULES: UrlRules = { any: false, origins: [], auth: [] };

/** An origin as the rules compare them: http(s)://host[:port] (default port dropped), s3://bucket. */
export function originOf(url: string | URL): string {
  const u = typeof url === "string" ? new URL(url) : url;
  if (u.protocol === "s3:") return `s3://${u.hostname.toLowerCase()}`;
  return u.origin;
}

/** Parses a comma-separated list of origins given to an option; one line for a bad entry. */
export function parseOrigins(text: string, option: string): string[] {
  const out: string[] = [];
  for (const entry of text.split(",").map((e) => e.trim())) {
    if (entry === "") continue;
    const bad = (why: string) =>
      new AddCowError(
        `invalid ${option} ${JSON.stringify(entry)}: ${why}; give origins such as https://images.example.com, http://127.0.0.2:8080 or s3://golden`,
        { code: "EINVAL" },
      );
    let u: URL;
    try {
      u = new URL(entry);
    } catch {
      throw bad("it is not a URL");
    }
    if (!["http:", "https:", "s3:"].includes(u.protocol))
      throw bad("use http://, https:// or s3://");
    if (u.hostname === "") throw bad("it names no host (or bucket)");
    if (u.username !== "" || u.password !== "") throw bad("credentials do not belong in it");
    if ((u.pathname !== "" && u.pathname !== "/") || u.search !== "" || u.hash !== "") {
      throw bad("an origin has no path, query or fragment");
    }
    out.push(originOf(u));
  }
  return out;
}

/** Adds origins to rules (for `auth`, to both lists). */
export function withOrigins(rules: UrlRules, origins: string[], auth = false): UrlRules {
  const add = (list: string[]) => [...new Set([...list, ...origins])];
  return auth
    ? { ...rules, origins: add(rules.origins), auth: add(rules.auth) }
    : { ...rules, origins: add(rules.origins) };
}

/**
 * Whether a mount's URL rules are no wider than a live job asks for (the job
 * runs under the mount's rules).
 */
export function urlRulesCover(applied: UrlRules, wanted: UrlRules): boolean {
  if (applied.any && !wanted.any) return false;
  return (
    applied.origins.every((o) => wanted.origins.includes(o)) &&
    applied.auth.every((o) => wanted.auth.includes(o))
  );
}

/** Loopback, link-local and unspecified: the machine itself and its neighbours' metadata services. */
const INTERNAL = new net.BlockList();
INTERNAL.addSubnet("127.0.0.0", 8, "ipv4");
INTERNAL.addSubnet("169.254.0.0", 16, "ipv4");
INTERNAL.addSubnet("0.0.0.0", 8, "ipv4");
INTERNAL.addAddress("::1", "ipv6");
INTERNAL.addAddress("::", "ipv6");
INTERNAL.addSubnet("fe80::", 10, "ipv6");

/** True for a loopback, link-local or unspecified address (IPv4, IPv6, IPv4-mapped IPv6). */
export function isInternalAddress(address: string): boolean {
  const bare = address.replace(/^\[|\]$/g, "");
  const family = net.isIP(bare.replace(/%.*$/, ""));
  if (family === 0) return false;
  return INTERNAL.check(bare, family === 6 ? "ipv6" : "ipv4");
}

function internalWhy(address: string, host: string): string {
  const subject = host === address ? address : `${host} resolves to ${address}, which`;
  return `${subject} is a loopback, link-local or unspecified address, which another user's (or a confined) disk may reach only when the operator lists its origin by name (--allow-url ORIGIN)`;
}

type Resolve = (
  host: string,
  opts: dns.LookupAllOptions,
  cb: (err: NodeJS.ErrnoException | null, addresses: dns.LookupAddress[]) => void,
) => void;

/** The access of a tenant's URL (see the top of this file). */
export class TenantAccess implements RemoteAccess {
  readonly signed: boolean;
  readonly lookup: net.LookupFunction;
  private readonly listed: Set<string>;
  private readonly lent: Set<string>;
  /** Host names of listed origins: their internal addresses are allowed. */
  private readonly listedHosts: Set<string>;

  constructor(
    rules: UrlRules,
    origin: string,
    private readonly resolve: Resolve = dns.lookup as Resolve,
  ) {
    this.listed = new Set([...rules.origins, ...rules.auth]);
    this.lent = new Set(rules.auth);
    this.listedHosts = new Set(
      [...this.listed].filter((o) => !o.startsWith("s3:")).map((o) => new URL(o).hostname),
    );
    this.signed = this.lent.has(origin);
    this.lookup = (hostname, options, callback) => this.checkedLookup(hostname, options, callback);
  }

  /**
   * A host name checked before anything is fetched, for a clear refusal (the
   * lookup checks every connection again: the name may change its answer).
   */
  async checkName(url: URL): Promise<HopDecision> {
    const host = url.hostname;
    if (url.protocol === "s3:" || net.isIP(host.replace(/^\[|\]$/g, "")) !== 0) {
      return this.hop(url);
    }
    if (!this.listedHosts.has(host)) {
      const addresses = await new Promise<dns.LookupAddress[]>((resolve) =>
        this.resolve(host, { all: true }, (err, found) => resolve(err ? [] : found)),
      );
      const internal = addresses.find((a) => isInternalAddress(a.address));
      if (internal) return { allowed: false, why: internalWhy(internal.address, host) };
    }
    return this.hop(url);
  }

  hop(url: URL): HopDecision {
    const origin = originOf(url);
    if (url.protocol === "http:" || url.protocol === "https:") {
      const host = url.hostname.replace(/^\[|\]$/g, "");
      if (net.isIP(host) !== 0 && isInternalAddress(host) && !this.listed.has(origin)) {
        return { allowed: false, why: internalWhy(host, host) };
      }
    }
    return { allowed: true, credentials: this.lent.has(origin) };
  }

  /**
   * net.connect's lookup: every address of the name is checked and the
   * connection gets exactly those (all of them, or the first).
   */
  private checkedLookup(
    hostname: string,
    options: dns.LookupOptions,
    callback: (
      err: NodeJS.ErrnoException | null,
      address: string | dns.LookupAddress[],
      family?: number,
    ) => void,
  ): void {
    this.resolve(hostname, { ...options, all: true }, (err, addresses) => {
      if (err) return callback(err, "", 0);
      const internal = addresses.find((a) => isInternalAddress(a.address));
      if (internal && !this.listedHosts.has(hostname)) {
        const refusal: NodeJS.ErrnoException = new Error(internalWhy(internal.address, hostname));
        refusal.code = "EADDRNOTALLOWED";
        return callback(refusal, "", 0);
      }
      if (addresses.length === 0) {
        return callback(
          Object.assign(new Error(`${hostname}: no address`), { code: "ENOTFOUND" }),
          "",
          0,
        );
      }
      if (options.all) return callback(null, addresses);
      callback(null, addresses[0]!.address, addresses[0]!.family);
    });
  }
}

/** Who wrote a URL name, when it is not the operator: for messages. */
export interface UrlWriter {
  uid: number;
  owns: string;
}

export interface UrlDecision {
  access: RemoteAccess;
  /** Its origin is allowed by the wildcard only: what the server answers is not told. */
  quiet: boolean;
}

/**
 * Judges a URL backing name before anything is resolved or fetched.
 * `writers`: the users other than the runner whose words lead to it (empty:
 * the operator's); `confined`: the disk is opened under confinement.
 */
export async function judgeUrl(
  rules: UrlRules,
  url: string,
  how: { writers: readonly UrlWriter[]; confined: boolean; role: string; namedIn?: string },
): Promise<UrlDecision> {
  if (how.writers.length === 0 && !how.confined) return { access: OPERATOR_ACCESS, quiet: false };
  const origin = originOf(url);
  const listed = rules.origins.includes(origin) || rules.auth.includes(origin);
  const refuse = (why: string) =>
    new AddCowError(
      `${how.role} ${url}${how.namedIn ? ` (named in ${how.namedIn})` : ""} is refused: ${why}; see docs/security.md`,
      { reason: "forbidden", file: url, code: "EACCES", mode: "read" },
    );
  if (!listed && !rules.any) {
    const who = how.writers[0];
    if (!who) {
      throw refuse(
        `it is a URL, and a confined disk may use URL backings only with --allow-url (-o allow_url), and only from the origins it lists (${origin} is not one)`,
      );
    }
    throw refuse(
      `it is a URL in a disk of uid ${who.uid}, who owns ${who.owns}, and another user's disk may name only the origins the operator allows (--allow-url ORIGIN, -o allow_url=ORIGIN); ${origin} is not one`,
    );
  }
  const access = new TenantAccess(rules, origin);
  const first = await access.checkName(new URL(url));
  if (!first.allowed) throw refuse(first.why);
  return { access, quiet: !listed };
}
