import * as crypto from "node:crypto";

/**
 * What a backing layer is, as far as can be told cheaply at every open: an
 * overlay records its backing's identity when it is made (its "pin",
 * docs/specs/add-cow.md) and compares it each time the backing is opened,
 * so an overlay is never silently put on another base.
 */
export type LayerIdentity = FileIdentity | RemoteIdentity | AddCowIdentity;

/** A local raw or qcow2 file: its size and a fingerprint of sampled bytes (fingerprint.ts). */
export interface FileIdentity {
  kind: "file";
  format: "raw" | "qcow2";
  /** Virtual size (a raw file's length, a qcow2 image's disk size). */
  size: number;
  /** Length of the file itself. */
  fileSize: number;
  /** SHA-256 (hex) of the sampled bytes, see fingerprint.ts. */
  fingerprint: string;
}

/** A manifest of per-block digests published beside a remote base (remote/manifest.ts). */
export interface PinnedManifest {
  /** Where it is; null: the default, the base's URL with ".manifest" appended. */
  location: string | null;
  /** SHA-256 (hex) of the manifest file's bytes. */
  sha256: string;
}

/** A remote object: size and the server's validators, and the manifest it was pinned with. */
export interface RemoteIdentity {
  kind: "remote";
  size: number;
  etag: string | null;
  lastModified: string | null;
  /** s3: the endpoint the object was read through (shown, not compared); null for http(s). */
  endpoint: string | null;
  manifest: PinnedManifest | null;
}

/** An add-cow layer: its size and the random id its own pin gives it (null: it has none). */
export interface AddCowIdentity {
  kind: "add-cow";
  size: number;
  disk: string | null;
}

/** Longest text kept as it is in a pin; longer server-chosen text is kept as its digest. */
const MAX_PINNED_TEXT = 200;

/** A server's validator as it is pinned: short text as it is, long text as "sha256:HEX". */
export function pinnableText(text: string | null): string | null {
  if (text === null || text.length <= MAX_PINNED_TEXT) return text;
  return `sha256:${crypto.createHash("sha256").update(text).digest("hex")}`;
}

function short(hex: string): string {
  return hex.length > 16 ? `${hex.slice(0, 16)}...` : hex;
}

function what(id: LayerIdentity): string {
  if (id.kind === "file") return `a local ${id.format} file`;
  if (id.kind === "remote") return "a remote object";
  return "an add-cow disk";
}

/**
 * How `now` differs from the `pinned` identity, one phrase per change
 * ("ETag was "a", now "b""); empty when it is the same layer. A remote object
 * is compared the way HTTP validators are: the ETag when both sides have one,
 * else Last-Modified; a server that stops sending both cannot be told apart
 * and counts as changed. The S3 endpoint alone is not a change (a replica
 * with the same ETag holds the same bytes).
 */
export function identityChanges(pinned: LayerIdentity, now: LayerIdentity): string[] {
  if (pinned.kind !== now.kind) return [`was ${what(pinned)}, now ${what(now)}`];
  const out: string[] = [];
  if (pinned.size !== now.size) out.push(`size was ${pinned.size} bytes, now ${now.size}`);
  if (pinned.kind === "file" && now.kind === "file") {
    if (pinned.format !== now.format) out.push(`format was ${pinned.format}, now ${now.format}`);
    if (pinned.fileSize !== now.fileSize) {
      out.push(`file size was ${pinned.fileSize} bytes, now ${now.fileSize}`);
    }
    if (pinned.fingerprint !== now.fingerprint) {
      out.push(`fingerprint was ${short(pinned.fingerprint)}, now ${short(now.fingerprint)}`);
    }
  } else if (pinned.kind === "remote" && now.kind === "remote") {
    out.push(...validatorChanges(pinned, now));
    const a = pinned.manifest?.sha256 ?? null;
    const b = now.manifest?.sha256 ?? null;
    if (a !== b) {
      out.push(
        `manifest was ${a === null ? "none" : short(a)}, now ${b === null ? "none" : short(b)}`,
      );
    }
  } else if (pinned.kind === "add-cow" && now.kind === "add-cow") {
    if (pinned.disk !== now.disk) {
      out.push(`disk id was ${pinned.disk ?? "none"}, now ${now.disk ?? "none"}`);
    }
  }
  return out;
}

function validatorChanges(pinned: RemoteIdentity, now: RemoteIdentity): string[] {
  if (pinned.etag !== null && now.etag !== null) {
    return pinned.etag === now.etag ? [] : [`ETag was ${pinned.etag}, now ${now.etag}`];
  }
  if (pinned.lastModified !== null && now.lastModified !== null) {
    return pinned.lastModified === now.lastModified
      ? []
      : [`Last-Modified was ${pinned.lastModified}, now ${now.lastModified}`];
  }
  if (pinned.etag !== null || pinned.lastModified !== null) {
    const had =
      pinned.etag !== null ? `ETag ${pinned.etag}` : `Last-Modified ${pinned.lastModified}`;
    return [`it was pinned by ${had}, which the server no longer sends`];
  }
  return [];
}

/** One line about an identity, for info and messages. */
export function describeLayerIdentity(id: LayerIdentity): string {
  const parts = [`${id.size} bytes`];
  if (id.kind === "file") {
    parts.push(`${id.format} file of ${id.fileSize} bytes`, `fingerprint ${id.fingerprint}`);
  } else if (id.kind === "remote") {
    if (id.etag !== null) parts.push(`ETag ${id.etag}`);
    if (id.lastModified !== null) parts.push(`Last-Modified ${id.lastModified}`);
    if (id.etag === null && id.lastModified === null) parts.push("no ETag or Last-Modified");
    if (id.endpoint !== null) parts.push(`endpoint ${id.endpoint}`);
    if (id.manifest !== null) {
      parts.push(`manifest ${id.manifest.location ?? "URL.manifest"} sha256 ${id.manifest.sha256}`);
    }
  } else {
    parts.push(id.disk === null ? "an add-cow disk without a pin" : `disk id ${id.disk}`);
  }
  return parts.join(", ");
}

/** Reads an identity back from a pin's JSON; throws a short reason when it is not one. */
export function parseLayerIdentity(value: unknown): LayerIdentity {
  const o = object(value, "identity");
  const size = count(o.size, "identity.size");
  switch (o.kind) {
    case "file": {
      if (o.format !== "raw" && o.format !== "qcow2")
        throw new Error("identity.format is not raw or qcow2");
      return {
        kind: "file",
        format: o.format,
        size,
        fileSize: count(o.fileSize, "identity.fileSize"),
        fingerprint: hex(o.fingerprint, "identity.fingerprint", 64),
      };
    }
    case "remote": {
      let manifest: PinnedManifest | null = null;
      if (o.manifest !== null) {
        const m = object(o.manifest, "identity.manifest");
        manifest = {
          location: textOrNull(m.location, "identity.manifest.location", 4096),
          sha256: hex(m.sha256, "identity.manifest.sha256", 64),
        };
      }
      return {
        kind: "remote",
        size,
        etag: textOrNull(o.etag, "identity.etag"),
        lastModified: textOrNull(o.lastModified, "identity.lastModified"),
        endpoint: textOrNull(o.endpoint, "identity.endpoint"),
        manifest,
      };
    }
    case "add-cow":
      return {
        kind: "add-cow",
        size,
        disk: o.disk === null ? null : hex(o.disk, "identity.disk", 32),
      };
    default:
      throw new Error(`identity.kind is ${JSON.stringify(o.kind)}, not file, remote or add-cow`);
  }
}

function object(v: unknown, what: string): Record<string, unknown> {
  if (typeof v !== "object" || v === null || Array.isArray(v))
    throw new Error(`${what} is not an object`);
  return v as Record<string, unknown>;
}

function count(v: unknown, what: string): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
    throw new Error(`${what} is not a byte count`);
  }
  return v;
}

function hex(v: unknown, what: string, length: number): string {
  if (typeof v !== "string" || v.length !== length || !/^[0-9a-f]*$/.test(v)) {
    throw new Error(`${what} is not ${length} hex digits`);
  }
  return v;
}

function textOrNull(v: unknown, what: string, max = MAX_PINNED_TEXT + 71): string | null {
  if (v === null) return null;
  const control = (ch: string) => ch.charCodeAt(0) < 0x20 || ch === "\x7f";
  if (typeof v !== "string" || v.length > max || [...v].some(control)) {
    throw new Error(`${what} is not plain text`);
  }
  return v;
}
