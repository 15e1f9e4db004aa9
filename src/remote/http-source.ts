import * as fs from "node:fs";
import { Agent, request } from "undici";
import {
  type ObjectIdentity,
  type RangeAnswer,
  type RangeSource,
  RemoteFailure,
  networkFailure,
  parseContentRange,
  statusFailure,
} from "./source";
import { HTTP_AUTH_HELP, HttpCredentials } from "./http-auth";
import { AddCowError } from "../util/errors";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";

/** Connections kept open to one server (several range requests in flight). */
const CONNECTIONS = 8;
/** Redirects one request may follow (curl's default is 50, browsers about 20). */
export const MAX_REDIRECTS = 10;
const REDIRECT = new Set([301, 302, 303, 307, 308]);
const PERMANENT = new Set([301, 308]);

type Headers = Record<string, string | string[] | undefined>;

function one(h: Headers, name: string): string | null {
  const v = h[name];
  return Array.isArray(v) ? (v[0] ?? null) : (v ?? null);
}

/** A redirect target as it may be printed: a presigned URL's query is a credential. */
function shown(url: URL): string {
  return `${url.origin}${url.pathname}${url.search ? "?..." : ""}`;
}

/** One answer at the end of a redirect chain. */
interface Answer {
  status: number;
  headers: Headers;
  body: Buffer;
  /** The object's name for messages: the disk's URL, and where it was redirected to. */
  where: string;
}

/**
 * http(s) range requests through one keep-alive undici Agent. Redirects
 * (301, 302, 303, 307, 308) are followed for every request, up to
 * MAX_REDIRECTS hops; identity and ranges are judged on the final answer.
 * Credentials go only to the disk's own origin: a hop to another origin gets
 * no Authorization header (a presigned URL carries its own), and https never
 * redirects to plain http. Permanent redirects (301, 308) from the start are
 * remembered for later requests; temporary ones are asked again every time.
 * Every hop is first asked of the access the chain decided (a tenant's disk:
 * allowed origins, no internal addresses), which also says whether the
 * operator's credentials may go there.
 */
export class HttpSource implements RangeSource {
  private readonly agent: Agent;
  private readonly credentials: HttpCredentials;
  /** What the chain allowed for this disk's URL: every hop is asked (remote/access.ts). */
  private readonly access: RemoteAccess;
  /** Where requests start: the disk's URL, or where its permanent redirects led. */
  private start: URL;
  readonly cacheKey: string;

  constructor(
    private readonly url: URL,
    readonly name: string,
    env: NodeJS.ProcessEnv = process.env,
    access: RemoteAccess = OPERATOR_ACCESS,
  ) {
    const ca = env.ADDCOW_CA_FILE ? readCaFile(env.ADDCOW_CA_FILE) : null;
    // Every connection resolves its host through the access's checked lookup, when it has one.
    const connect = {
      ...(ca ? { ca: [ca] } : {}),
      ...(access.lookup ? { lookup: access.lookup } : {}),
    };
    this.agent = new Agent({ connections: CONNECTIONS, keepAliveTimeout: 30_000, connect });
    this.access = access;
    this.credentials = HttpCredentials.fromEnv(env);
    this.start = url;
    this.cacheKey = JSON.stringify(["http", url.toString()]);
  }

  /** A one-byte range request: proves range support and gives size and identity in one round trip. */
  async probe(signal: AbortSignal): Promise<ObjectIdentity> {
    const { status, headers, where } = await this.get("bytes=0-0", signal);
    if (status === 416) {
      const cr = parseContentRange(one(headers, "content-range"));
      if (cr?.total === 0) return { ...identityOf(headers), size: 0 };
    }
    if (status === 200) {
      throw new RemoteFailure(
        `${where}: the server does not support range requests (it answered 200 with the whole file); serve the image from a server that does`,
        false,
      );
    }
    if (status !== 206) throw statusFailure(status, where, HTTP_AUTH_HELP);
    const cr = parseContentRange(one(headers, "content-range"));
    if (cr === null || cr.total === null) {
      throw new RemoteFailure(`${where}: the server sent no usable Content-Range`, false);
    }
    return { ...identityOf(headers), size: cr.total };
  }

  async fetch(start: number, end: number, signal: AbortSignal): Promise<RangeAnswer> {
    const { status, headers, body, where } = await this.get(`bytes=${start}-${end - 1}`, signal);
    if (status !== 206) {
      if (status === 200) {
        throw new RemoteFailure(
          `${where}: the server stopped honouring range requests (answered 200)`,
          false,
        );
      }
      throw statusFailure(status, where, HTTP_AUTH_HELP);
    }
    const cr = parseContentRange(one(headers, "content-range"));
    if (!cr || cr.start !== start || cr.end !== end || cr.total === null) {
      throw new RemoteFailure(
        `${where}: asked for bytes [${start}, ${end}), the server answered ${one(headers, "content-range") ?? "no Content-Range"}`,
        false,
        // Ranges asked for lie inside the object: another range back means another object.
        cr !== null && cr.total !== null,
      );
    }
    if (body.length !== end - start) {
      throw new RemoteFailure(
        `${where}: the answer for [${start}, ${end}) ended after ${body.length} bytes`,
        true,
      );
    }
    return { data: body, identity: { ...identityOf(headers), size: cr.total } };
  }

  /** One GET with a Range header, following redirects; the body is read whole (a few MiB at most). */
  private async get(range: string, signal: AbortSignal): Promise<Answer> {
    let url = this.start;
    let where = this.name;
    let permanent = true;
    const seen = [url.href];
    for (;;) {
      let res: Awaited<ReturnType<typeof request>>;
      try {
        res = await request(url, {
          method: "GET",
          dispatcher: this.agent,
          signal,
          headers: { range, "accept-encoding": "identity", ...this.authorization(url) },
        });
      } catch (err) {
        throw networkFailure(err, where, signal);
      }
      try {
        if (res.statusCode === 206) {
          const body = Buffer.from(await res.body.arrayBuffer());
          return { status: res.statusCode, headers: res.headers, body, where };
        }
        // Never read a whole image that came back instead of a range.
        await res.body.dump({ limit: 65536 }).catch(() => undefined);
      } catch (err) {
        throw networkFailure(err, where, signal);
      }
      if (!REDIRECT.has(res.statusCode)) {
        return { status: res.statusCode, headers: res.headers, body: Buffer.alloc(0), where };
      }
      url = this.redirectTarget(url, one(res.headers, "location"), res.statusCode, seen, where);
      seen.push(url.href);
      where = `${this.name} (redirected to ${shown(url)})`;
      permanent &&= PERMANENT.has(res.statusCode);
      if (permanent) this.start = url;
    }
  }

  /** Where a redirect leads, or a failure saying why it is not followed. */
  private redirectTarget(
    from: URL,
    location: string | null,
    status: number,
    seen: string[],
    where: string,
  ): URL {
    const refuse = (why: string) => new RemoteFailure(`${where}: ${why}`, false);
    if (location === null) throw refuse(`HTTP ${status} without a Location`);
    let next: URL;
    try {
      next = new URL(location, from);
    } catch {
      throw refuse(`HTTP ${status} to an invalid Location`);
    }
    next.hash = "";
    if (next.protocol !== "http:" && next.protocol !== "https:") {
      throw refuse(`HTTP ${status} to a ${next.protocol} URL, not http(s): not followed`);
    }
    if (from.protocol === "https:" && next.protocol === "http:") {
      throw refuse(`HTTP ${status} from https to plain http (${shown(next)}): not followed`);
    }
    if (next.username !== "" || next.password !== "") {
      throw refuse(`HTTP ${status} to a URL with credentials in it: not followed`);
    }
    if (seen.includes(next.href)) {
      throw refuse(
        `redirect loop (${[...seen, next.href].map((u) => shown(new URL(u))).join(" -> ")})`,
      );
    }
    if (seen.length > MAX_REDIRECTS) {
      throw refuse(`more than ${MAX_REDIRECTS} redirects: not followed further`);
    }
    const hop = this.access.hop(next);
    if (!hop.allowed) throw refuse(`HTTP ${status} to ${shown(next)}: ${hop.why}`);
    return next;
  }

  /**
   * Credentials for the disk's own origin only (a redirect elsewhere carries
   * none), and only where the access lends them.
   */
  private authorization(url: URL): { authorization?: string } {
    if (url.origin !== this.url.origin) return {};
    const hop = this.access.hop(url);
    if (!hop.allowed || !hop.credentials) return {};
    const value = this.credentials.headerFor(url);
    return value === null ? {} : { authorization: value };
  }

  async close(): Promise<void> {
    // Requests still running are abandoned (close() would wait for them, up to the timeout).
    await this.agent.destroy();
  }
}

function readCaFile(file: string): string {
  try {
    return fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new AddCowError(
      `ADDCOW_CA_FILE ${file} cannot be read: ${(err as Error).message}; give a PEM file of CA certificates`,
      { reason: "remote", file, code: "EINVAL" },
    );
  }
}

function identityOf(h: Headers): Omit<ObjectIdentity, "size"> {
  return { etag: one(h, "etag"), lastModified: one(h, "last-modified") };
}
