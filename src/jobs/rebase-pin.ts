import type { AddCowLayer } from "../addcow/addcow-layer";
import type { LayerIdentity } from "../block/layer-identity";
import { identityChanges } from "../block/layer-identity";
import { type ManifestChoice, AUTO_MANIFEST } from "../ops/backing-identity";

/**
 * Which manifest a rebase pins for its new backing: the one the disk is
 * pinned with when it stays on the same backing name (a re-pin), else
 * whatever is published at `URL.manifest`.
 */
export function manifestForRebase(dev: AddCowLayer, sameName: boolean): ManifestChoice {
  const p = dev.pin;
  if (!sameName || p.kind !== "pinned" || p.record.identity.kind !== "remote") return AUTO_MANIFEST;
  const m = p.record.identity.manifest;
  return m?.location ? { kind: "at", location: m.location } : AUTO_MANIFEST;
}

/**
 * `rebase -u` pins the backing it is given as it is now; when the disk was
 * pinned to something else, it says so first: the guest's clusters were
 * written over the old bytes, and nothing was compared or copied.
 */
export function repinWarning(
  dev: AddCowLayer,
  path: string,
  identity: LayerIdentity | null,
): string | null {
  const p = dev.pin;
  if (p.kind === "unreadable") {
    return `${dev.path}: its old pin could not be read (${p.why}); ${path} is pinned now as it is: guest data written over the old base may not match it`;
  }
  if (p.kind !== "pinned" || identity === null) return null;
  const changes = identityChanges(p.record.identity, identity);
  if (changes.length === 0) return null;
  return `${dev.path} was pinned to another base than ${path} is now (${changes.join("; ")}): guest data written over the old base may not match the new one; pinning it as asked (-u copies nothing)`;
}

export function warnOnStderr(message: string): void {
  process.stderr.write(`addcow: warning: ${message}\n`);
}
