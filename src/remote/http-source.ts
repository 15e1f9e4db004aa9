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
import { HTTP_AUTH_HELP, authorizationFor } from "./http-auth";
import { AddCowError } from "../util/errors";
import { OPERATOR_ACCESS, type RemoteAccess } from "./access";

/** Connections kept open to one server (several range requests in flight). */
const CONNECTIONS = 8;

type Headers = Record<string, string | string[] | undefined>;

function one(h: Headers, name: string): string | null {
  const v = h[name];
  return Array.isArray(v) ? (v[0] ?? null) : (v ?? null);
}

/** http(s) range requests through one keep-alive undici Agent. */
export class HttpSource implements RangeSource {
  private readonly agent: Agent;
  private readonly authorization: string | null;

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
    const hop = access.hop(url);
    this.authorization =
      hop.allowed && hop.credentials ? authorizationFor(url.toString(), env) : null;
  }

  /** A one-byte range request: proves range support and gives size and identity in one round trip. */
  async probe(signal: AbortSignal): Promise<ObjectIdentity> {
    const { status, headers } = await this.get("bytes=0-0", signal);
    if (status === 416) {
      const cr = parseContentRange(one(headers, "content-range"));
      if (cr?.total === 0) return { ...identityOf(headers), size: 0 };
    }
    if (status === 200) {
      throw new RemoteFailure(
        `${this.name}: the server does not support range requests (it answered 200 with the whole file); serve the image from a server that does`,
        false,
      );
    }
    if (status !== 206) throw statusFailure(status, this.name, HTTP_AUTH_HELP);
    const cr = parseContentRange(one(headers, "content-range"));
    if (cr === null || cr.total === null) {
      throw new RemoteFailure(`${this.name}: the server sent no usable Content-Range`, false);
    }
    return { ...identityOf(headers), size: cr.total };
  }

  async fetch(start: number, end: number, signal: AbortSignal): Promise<RangeAnswer> {
    const { status, headers, body } = await this.get(`bytes=${start}-${end - 1}`, signal);
    if (status !== 206) {
      if (status === 200) {
        throw new RemoteFailure(
          `${this.name}: the server stopped honouring range requests (answered 200)`,
          false,
        );
      }
      throw statusFailure(status, this.name, HTTP_AUTH_HELP);
    }
    const cr = parseContentRange(one(headers, "content-range"));
    if (!cr || cr.start !== start || cr.end !== end || cr.total === null) {
      throw new RemoteFailure(
        `${this.name}: asked for bytes [${start}, ${end}), the server answered ${one(headers, "content-range") ?? "no Content-Range"}`,
        false,
        // Ranges asked for lie inside the object: another range back means another object.
        cr !== null && cr.total !== null,
      );
    }
    if (body.length !== end - start) {
      throw new RemoteFailure(
        `${this.name}: the answer for [${start}, ${end}) ended after ${body.length} bytes`,
        true,
      );
    }
    return { data: body, identity: { ...identityOf(headers), size: cr.total } };
  }

  /** One GET with a Range header; the body is read whole (it is at most a few blocks). */
  private async get(
    range: string,
    signal: AbortSignal,
  ): Promise<{ status: number; headers: Headers; body: Buffer }> {
    try {
      const res = await request(this.url, {
        method: "GET",
        dispatcher: this.agent,
        signal,
        headers: {
          range,
          "accept-encoding": "identity",
          ...(this.authorization ? { authorization: this.authorization } : {}),
        },
      });
      if (res.statusCode !== 206) {
        // Never read a whole image that came back instead of a range.
        await res.body.dump({ limit: 65536 }).catch(() => undefined);
        return { status: res.statusCode, headers: res.headers, body: Buffer.alloc(0) };
      }
      const body = Buffer.from(await res.body.arrayBuffer());
      return { status: res.statusCode, headers: res.headers, body };
    } catch (err) {
      throw networkFailure(err, this.name, signal);
    }
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
