import type { BlockDevice } from "../block/block-device";
import type { LayerIdentity } from "../block/layer-identity";
import { AddCowError } from "../util/errors";
import { isRemoteName } from "../remote/url";
import type { Manifest } from "../remote/manifest";

/**
 * Which manifest a remote base is pinned with: the one at `URL.manifest` if
 * there is one (auto), none, or the one at a given URL (which must exist).
 */
export type ManifestChoice = { kind: "auto" } | { kind: "none" } | { kind: "at"; location: string };

export const AUTO_MANIFEST: ManifestChoice = { kind: "auto" };

/** `-o manifest=URL|none`: a URL (a local file is refused: see docs/remote.md). */
export function parseManifestChoice(value: string): ManifestChoice {
  if (value === "none") return { kind: "none" };
  if (value === "auto") return AUTO_MANIFEST;
  if (!isRemoteName(value)) {
    throw new AddCowError(
      `-o manifest=${value}: give the URL where the manifest is published (http://, https:// or s3://), or none; a disk never names a local manifest: publish it beside the base (addcow manifest prints where)`,
      { reason: "invalid" },
    );
  }
  return { kind: "at", location: value };
}

/** `create -o KEY=VALUE[,KEY=VALUE]`: the options qemu-img-like create takes. */
export function parseCreateOptions(lists: string[]): { manifest?: ManifestChoice } {
  const out: { manifest?: ManifestChoice } = {};
  for (const item of lists.flatMap((l) => l.split(","))) {
    const eq = item.indexOf("=");
    const key = eq < 0 ? item : item.slice(0, eq);
    if (key !== "manifest" || eq < 0) {
      throw new AddCowError(`-o ${item}: unknown option (supported: manifest=URL, manifest=none)`, {
        reason: "invalid",
      });
    }
    out.manifest = parseManifestChoice(item.slice(eq + 1));
  }
  return out;
}

/**
 * What a new pin records of a backing just opened (create, rebase, snapshot):
 * its identity, and for a remote base the manifest chosen, whose size must
 * be the base's. The remote code is loaded only for a remote base.
 */
export async function identityToPin(
  backing: BlockDevice,
  name: string,
  manifest: ManifestChoice,
): Promise<LayerIdentity | null> {
  const identity = await backing.identity();
  if (manifest.kind === "at" && identity?.kind !== "remote") {
    throw new AddCowError(
      `-o manifest=${manifest.location}: a manifest is pinned for a remote base only (${name} is local)`,
      { reason: "invalid" },
    );
  }
  if (identity?.kind !== "remote" || manifest.kind === "none" || !isRemoteName(name)) {
    return identity;
  }
  const { findRemoteManifest } = await import("../remote/open-remote-device");
  const location = manifest.kind === "at" ? manifest.location : null;
  const found = await findRemoteManifest(name, location, identity.size);
  if (found === null && manifest.kind === "at") {
    throw new AddCowError(
      `manifest ${location} is not found (HTTP 404): publish it there first (addcow manifest ${name}), or leave -o manifest out`,
      { code: "ENOENT", reason: "remote", file: location ?? name },
    );
  }
  if (found !== null) await checkManifestSample(backing, found.manifest, found.location);
  return {
    ...identity,
    manifest: found === null ? null : { location, sha256: found.sha256 },
  };
}

/**
 * A manifest left from another version of the base (same size) is caught
 * before it is pinned: its first and last blocks must match the base.
 */
async function checkManifestSample(
  backing: BlockDevice,
  manifest: Manifest,
  where: string,
): Promise<void> {
  for (const n of new Set([0, manifest.blocks - 1])) {
    if (n < 0) continue;
    const [start, end] = manifest.blockRange(n);
    const data = Buffer.alloc(end - start);
    await backing.read(data, start);
    if (!manifest.verify(n, data)) {
      throw new AddCowError(
        `manifest ${where} does not match the base: block ${n} has another digest (it was made for another version of it); rebuild it with addcow manifest and publish it again (create -o manifest=none pins no manifest)`,
        { code: "EINVAL", reason: "remote", file: where },
      );
    }
  }
}
