import * as crypto from "node:crypto";
import { AddCowError } from "../util/errors";
import { log } from "../util/log";
import type { FoundManifest } from "./manifest";

/**
 * Whether blocks of a remote base are checked against a manifest
 * (docs/remote.md, "Verified blocks"): `auto` (the default) checks them when
 * the disk pinned a manifest; `required` also looks for one at `URL.manifest`
 * when none is pinned, and refuses to open the base without one. Set by
 * `-o verify=` at mount, by ADDCOW_VERIFY for every command.
 */
export type VerifyMode = "auto" | "required";

export function parseVerifyMode(value: string, where: string): VerifyMode {
  if (value === "auto" || value === "required") return value;
  throw new AddCowError(
    `invalid ${where}${value}: use verify=required (refuse a remote base without a manifest) or verify=auto (check blocks when the disk pinned a manifest; the default)`,
    { code: "EINVAL", reason: "invalid" },
  );
}

/** Mismatches said in the log, block by block, before the rest are only traced. */
const SAID = 16;

function short(digest: Buffer): string {
  return `${digest.toString("hex").slice(0, 16)}...`;
}

/**
 * Checks fetched bytes of a remote object against its manifest before they
 * are used or cached. The device fetches whole manifest blocks (its pieces
 * are at least a block and a multiple of it), so every range it checks is
 * made of whole blocks; a block that does not match is an EIO for the reads
 * of that block and one line in the log (the first time, per block).
 */
export class BlockVerifier {
  private readonly said = new Set<number>();

  constructor(
    readonly found: FoundManifest,
    /** The base's URL, for messages. */
    private readonly name: string,
    private readonly warn: (message: string) => void,
  ) {}

  get blockSize(): number {
    return this.found.manifest.blockSize;
  }

  /** The manifest must describe an object of this size (else every block is suspect). */
  checkSize(size: number): void {
    const m = this.found.manifest;
    if (m.size === size) return;
    throw new AddCowError(
      `remote backing ${this.name} has ${size} bytes, but its manifest ${this.found.location} describes a base of ${m.size}: the manifest belongs to another version of the base; publish the base's own (addcow manifest ${this.name})`,
      { code: "EINVAL", reason: "remote", file: this.found.location },
    );
  }

  /**
   * Checks bytes [start, start + data.length) of the object: whole manifest
   * blocks, the last one possibly the short tail of the object. Returns the
   * error for the reader of the first block that does not match, or null.
   */
  check(start: number, data: Buffer): AddCowError | null {
    const m = this.found.manifest;
    const bs = m.blockSize;
    if (start % bs !== 0 || (data.length % bs !== 0 && start + data.length !== m.size)) {
      throw new Error(`[${start}, +${data.length}) is not made of whole manifest blocks of ${bs}`);
    }
    for (let at = 0; at < data.length; at += bs) {
      const n = (start + at) / bs;
      const [from, to] = m.blockRange(n);
      const got = crypto
        .createHash("sha256")
        .update(data.subarray(at, at + to - from))
        .digest();
      if (!got.equals(m.digestOf(n))) return this.mismatch(n, from, to, got);
    }
    return null;
  }

  private mismatch(n: number, from: number, to: number, got: Buffer): AddCowError {
    const err = new AddCowError(
      `remote backing ${this.name}: block ${n} (bytes ${from}-${to - 1}) does not match its manifest ${this.found.location}: sha256 expected ${short(this.found.manifest.digestOf(n))}, got ${short(got)}; the server, or a proxy or mirror on the way, sent other bytes than the manifest says (the read fails with EIO, nothing of the block is kept)`,
      { code: "EIO", reason: "remote", file: this.name },
    );
    log.remote("%s", err.message);
    if (!this.said.has(n) && this.said.size < SAID) {
      this.said.add(n);
      this.warn(err.message);
      if (this.said.size === SAID) {
        this.warn(
          `remote backing ${this.name}: ${SAID} blocks did not match its manifest; further mismatches are not logged (DEBUG=addcow:remote traces them)`,
        );
      }
    }
    return err;
  }
}
