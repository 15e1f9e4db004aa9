/**
 * What a remote object is, as far as we can tell: a changed object changes at
 * least one of these (S3 and web servers change the ETag and Last-Modified of
 * a replaced file; a server without either still reports the size).
 */
export interface ObjectIdentity {
  size: number;
  etag: string | null;
  lastModified: string | null;
}

/** The bytes of one range request and who answered it. */
export interface RangeAnswer {
  data: Buffer;
  identity: ObjectIdentity;
}

/**
 * A protocol's view of one remote object: its identity, and byte ranges of it.
 * Implementations make one attempt per call (the device retries) and throw
 * {@link RemoteFailure} for anything but a good answer.
 */
export interface RangeSource {
  /** The URL without credentials, for messages. */
  readonly name: string;
  /**
   * Everything besides the object's identity that decides which bytes come
   * back (the URL; for S3 the endpoint, region, addressing, bucket and key):
   * part of the block cache key, so two servers never share entries.
   */
  readonly cacheKey: string;
  probe(signal: AbortSignal): Promise<ObjectIdentity>;
  /** Bytes [start, end) of the object. */
  fetch(start: number, end: number, signal: AbortSignal): Promise<RangeAnswer>;
  close(): Promise<void>;
}

/** One failed attempt: why (one line for a user) and whether trying again may help. */
export class RemoteFailure extends Error {
  constructor(
    message: string,
    readonly retryable: boolean,
    /** The object is not the one the disk was opened on (changed, shrunk). */
    readonly changed = false,
    /** errno-style code for an open that fails: ENOENT (404), EACCES (401/403), else EIO. */
    readonly code = "EIO",
  ) {
    super(message);
    this.name = "RemoteFailure";
  }
}

/** Same object? Fields a server did not send on both sides are not compared. */
export function sameIdentity(a: ObjectIdentity, b: ObjectIdentity): boolean {
  if (a.size !== b.size) return false;
  if (a.etag !== null && b.etag !== null && a.etag !== b.etag) return false;
  if (a.lastModified !== null && b.lastModified !== null && a.lastModified !== b.lastModified) {
    return false;
  }
  return true;
}

export function describeIdentity(id: ObjectIdentity): string {
  const parts = [`${id.size} bytes`];
  if (id.etag !== null) parts.push(`ETag ${id.etag}`);
  if (id.lastModified !== null) parts.push(`Last-Modified ${id.lastModified}`);
  return parts.join(", ");
}

/** Parses a Content-Range value (bytes START-END/TOTAL, or a star for the range); null when malformed. */
export function parseContentRange(
  value: string | undefined | null,
): { start: number | null; end: number | null; total: number | null } | null {
  if (!value) return null;
  const m = /^bytes\s+(?:(\d+)-(\d+)|\*)\/(\d+|\*)$/i.exec(value.trim());
  if (!m) return null;
  return {
    start: m[1] === undefined ? null : Number(m[1]),
    end: m[2] === undefined ? null : Number(m[2]) + 1,
    total: m[3] === "*" ? null : Number(m[3]),
  };
}

/** Network errors worth another attempt (the server or the path may come back). */
const TRANSIENT_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "ECONNABORTED",
  "EPIPE",
  "ETIMEDOUT",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EAI_AGAIN",
  "UND_ERR_SOCKET",
  "UND_ERR_CLOSED",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
  "UND_ERR_CONNECT_TIMEOUT",
  "ERR_STREAM_PREMATURE_CLOSE",
]);

/** The errno-ish code of an error or of its cause chain. */
export function networkCode(err: unknown): string | undefined {
  for (let e: unknown = err, depth = 0; e && depth < 5; depth++) {
    if (typeof e === "object" && "code" in e && typeof e.code === "string") return e.code;
    e = typeof e === "object" && "cause" in e ? e.cause : undefined;
  }
  return undefined;
}

/** Turns a thrown network error into a RemoteFailure with words a user understands. */
export function networkFailure(err: unknown, name: string, signal: AbortSignal): RemoteFailure {
  if (err instanceof RemoteFailure) return err;
  if (signal.aborted) return new RemoteFailure(`${name}: no answer within the timeout`, true);
  const code = networkCode(err);
  const text = err instanceof Error ? err.message.split("\n")[0] : String(err);
  if (code === "ENOTFOUND") {
    return new RemoteFailure(
      `${name}: the host name cannot be resolved (DNS)`,
      false,
      false,
      "ENOENT",
    );
  }
  if (code !== undefined && /CERT|SELF_SIGNED|UNABLE_TO_VERIFY|ALTNAME/.test(code)) {
    return new RemoteFailure(
      `${name}: TLS failed (${code}): the server's certificate is not trusted; give its CA with ADDCOW_CA_FILE (or NODE_EXTRA_CA_CERTS)`,
      false,
    );
  }
  if (code !== undefined && /TLS|SSL/.test(code)) {
    return new RemoteFailure(
      `${name}: TLS handshake failed (${code}): is it an https server?`,
      false,
    );
  }
  if (code === "ECONNREFUSED") {
    return new RemoteFailure(`${name}: connection refused (is the server running?)`, true);
  }
  if (code !== undefined && TRANSIENT_CODES.has(code)) {
    return new RemoteFailure(`${name}: ${code} (${text})`, true);
  }
  return new RemoteFailure(`${name}: ${text}${code ? ` (${code})` : ""}`, false);
}

/** What an HTTP status means for a range request; null for the good ones. */
export function statusFailure(status: number, name: string, auth: string): RemoteFailure {
  if (status === 401 || status === 403) {
    return new RemoteFailure(
      `${name}: access denied (HTTP ${status}); ${auth}`,
      false,
      false,
      "EACCES",
    );
  }
  if (status === 404)
    return new RemoteFailure(`${name}: not found (HTTP 404)`, false, false, "ENOENT");
  if (status === 412) {
    return new RemoteFailure(`${name}: the object changed (HTTP 412)`, false, true);
  }
  if (status === 416) {
    return new RemoteFailure(`${name}: the object is shorter than before (HTTP 416)`, false, true);
  }
  if (status === 408 || status === 429 || status >= 500) {
    return new RemoteFailure(`${name}: the server answered HTTP ${status}`, true);
  }
  return new RemoteFailure(`${name}: unexpected answer HTTP ${status}`, false);
}
