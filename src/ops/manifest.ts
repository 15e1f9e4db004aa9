import * as fs from "node:fs";
import * as path from "node:path";
import { AddCowError, errnoCode } from "../util/errors";
import { openBacking } from "../chain/open-chain";
import { isRemoteName, parseRemoteName } from "../remote/url";
import {
  Manifest,
  buildManifest,
  defaultManifestBlock,
  defaultManifestLocation,
} from "../remote/manifest";

export interface ManifestRequest {
  /** A local raw file or a URL (http, https, s3). */
  base: string;
  /** Where to write it; default BASE.manifest (for a URL: its last path part + .manifest, here). */
  output?: string;
  blockSize?: number;
}

export interface ManifestResult {
  output: string;
  size: number;
  blockSize: number;
  blocks: number;
  /** SHA-256 of the manifest file: what overlays made with it pin. */
  sha256: string;
  /** For a URL: where to publish it so that create finds it. */
  publishAt: string | null;
}

/** The default output file for a base. */
export function defaultManifestFile(base: string): string {
  if (!isRemoteName(base)) return `${base}.manifest`;
  const loc = parseRemoteName(base);
  const last = (loc.scheme === "s3" ? loc.key : loc.url.pathname).split("/").pop() || "base";
  return `${decodeURIComponent(last)}.manifest`;
}

/**
 * The device that serves a base (a raw file, a URL), to be read once block by
 * block. A remote base is read from its server, never from the block cache:
 * the manifest vouches for what the server serves.
 */
async function openBase(base: string) {
  if (!isRemoteName(base)) return openBacking(path.resolve(base), "raw");
  const { remoteSettingsFromEnv } = await import("../remote/options");
  // Not checked against a manifest: this makes one (the old one may be of another version).
  const remote = { ...remoteSettingsFromEnv(), cache: null, verify: "auto" as const };
  return openBacking(base, "raw", { remote });
}

/**
 * `addcow manifest BASE`: the SHA-256 of each block of BASE, written to a
 * file aside and renamed into place (a reader sees the old manifest or the
 * new one, whole).
 */
export async function makeManifest(req: ManifestRequest): Promise<ManifestResult> {
  const output = req.output ?? defaultManifestFile(req.base);
  const dev = await openBase(req.base);
  let bytes: Buffer;
  let blockSize: number;
  try {
    blockSize = req.blockSize ?? defaultManifestBlock(dev.size);
    bytes = await buildManifest(dev.size, blockSize, (buf, at) => dev.read(buf, at));
  } finally {
    await dev.close();
  }
  const manifest = Manifest.parse(bytes, output);
  writeAside(output, bytes);
  return {
    output,
    size: manifest.size,
    blockSize,
    blocks: manifest.blocks,
    sha256: manifest.sha256,
    publishAt: isRemoteName(req.base)
      ? defaultManifestLocation(parseRemoteName(req.base).name)
      : null,
  };
}

function writeAside(output: string, bytes: Buffer): void {
  const dir = path.dirname(path.resolve(output));
  const tmp = path.join(dir, `.${path.basename(output)}.${process.pid}.tmp`);
  try {
    const fd = fs.openSync(tmp, "wx", 0o644);
    try {
      fs.writeSync(fd, bytes, 0, bytes.length, 0);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, output);
    const dirFd = fs.openSync(dir, "r");
    try {
      fs.fsyncSync(dirFd);
    } finally {
      fs.closeSync(dirFd);
    }
  } catch (err) {
    fs.rmSync(tmp, { force: true });
    throw new AddCowError(`cannot write manifest ${output}: ${(err as Error).message}`, {
      file: output,
      code: errnoCode(err),
    });
  }
}

export function describeManifest(r: ManifestResult): string {
  const where = r.publishAt ? `; publish it at ${r.publishAt} (addcow create finds it there)` : "";
  return `wrote ${r.output}: ${r.blocks} blocks of ${r.blockSize} bytes over ${r.size} bytes, sha256 ${r.sha256}${where}`;
}
