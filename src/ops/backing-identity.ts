import type { BlockDevice } from "../block/block-device";
import type { LayerIdentity } from "../block/layer-identity";
import { AddCowError } from "../util/errors";
import { isRemoteName } from "../remote/url";

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
  return {
    ...identity,
    manifest: found === null ? null : { location, sha256: found.sha256 },
  };
}
