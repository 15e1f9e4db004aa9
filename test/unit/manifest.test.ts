/**
 * `addcow manifest`: per-block SHA-256 digests of a base, checked here against
 * an independent computation (dd of each block into sha256sum), and the
 * codec the remote fetch path verifies blocks with (src/remote/manifest.ts).
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { execFileSync } from "node:child_process";
import { describe, expect, it } from "vitest";
import { Manifest, defaultManifestBlock } from "../../src/remote/manifest";
import { AddCowError } from "../../src/util/errors";
import { addcow, tempDir } from "../helpers/cli";
import { pattern, writeRaw } from "../helpers/jobs";

const KiB = 1024;

/** sha256sum of bytes [n * bs, (n + 1) * bs) of a file, read by dd. */
function ddDigest(file: string, bs: number, n: number): string {
  const bytes = execFileSync("dd", [
    `if=${file}`,
    `bs=${bs}`,
    `skip=${n}`,
    "count=1",
    "status=none",
  ]);
  return execFileSync("sha256sum", { input: bytes }).toString().split(" ")[0]!;
}

describe("addcow manifest", () => {
  it.each([
    [1024 * KiB, 5 * 1024 * KiB + 3000],
    [64 * KiB, 700 * KiB],
  ])(
    "block size %i over %i bytes: each digest is the block's sha256sum, the last one of its short tail",
    (bs, size) => {
      const dir = tempDir("addcow-manifest-");
      const base = path.join(dir, "base.raw");
      writeRaw(base, pattern(size, 3));
      // 64 KiB is the default block size.
      const args = bs === 64 * KiB ? [] : ["--block-size", `${bs / KiB}K`];
      const r = addcow(dir, "manifest", ...args, "base.raw");
      expect(r.code, r.stderr).toBe(0);
      const blocks = Math.ceil(size / bs);
      expect(r.stdout).toMatch(
        new RegExp(
          `^wrote base\\.raw\\.manifest: ${blocks} blocks of ${bs} bytes over ${size} bytes, sha256 [0-9a-f]{64}\\n$`,
        ),
      );
      const bytes = fs.readFileSync(path.join(dir, "base.raw.manifest"));
      // The documented layout, read by hand.
      expect(bytes.subarray(0, 8).toString("latin1")).toBe("ACOWMAN1");
      expect(Number(bytes.readBigUInt64LE(8))).toBe(size);
      expect(bytes.readUInt32LE(16)).toBe(bs);
      expect(Number(bytes.readBigUInt64LE(24))).toBe(blocks);
      expect(bytes.length).toBe(32 + 32 * blocks + 32);
      for (let n = 0; n < blocks; n++) {
        expect(bytes.subarray(32 + 32 * n, 64 + 32 * n).toString("hex"), `block ${n}`).toBe(
          ddDigest(base, bs, n),
        );
      }
      const body = bytes.subarray(0, bytes.length - 32);
      expect(bytes.subarray(body.length).toString("hex")).toBe(
        crypto.createHash("sha256").update(body).digest("hex"),
      );
      // The codec agrees, and verifies blocks.
      const m = Manifest.parse(bytes, "base.raw.manifest");
      expect(m.blocks).toBe(blocks);
      const data = fs.readFileSync(base);
      const [s, e] = m.blockRange(blocks - 1);
      expect(m.verify(blocks - 1, data.subarray(s, e))).toBe(true);
      const wrong = Buffer.from(data.subarray(0, bs));
      wrong[17] = wrong[17]! ^ 1;
      expect(m.verify(0, wrong)).toBe(false);
      expect(m.verify(0, data.subarray(0, bs - 1))).toBe(false);
    },
  );

  it("the default block size is 64 KiB, larger for bases over 32 GiB so the manifest stays within 16 MiB", () => {
    const GiB = 1024 * 1024 * KiB;
    expect(defaultManifestBlock(0)).toBe(64 * KiB);
    expect(defaultManifestBlock(8 * GiB)).toBe(64 * KiB); // 131072 digests, 4 MiB
    expect(defaultManifestBlock(32 * GiB)).toBe(64 * KiB);
    expect(defaultManifestBlock(32 * GiB + 1)).toBe(128 * KiB);
    expect(defaultManifestBlock(1024 * GiB)).toBe(2048 * KiB);
    for (const size of [8 * GiB, 33 * GiB, 1024 * GiB, 16 * 1024 * GiB]) {
      expect(32 + 32 * Math.ceil(size / defaultManifestBlock(size)) + 32).toBeLessThanOrEqual(
        16 * 1024 * KiB + 64,
      );
    }
  });

  it("a manifest with any flipped byte is refused by its own checksum, in one line", () => {
    const dir = tempDir("addcow-manifest-");
    writeRaw(path.join(dir, "base.raw"), pattern(300 * KiB, 4));
    expect(addcow(dir, "manifest", "-q", "--block-size", "64K", "base.raw", "-o", "m").code).toBe(
      0,
    );
    const good = fs.readFileSync(path.join(dir, "m"));
    for (let at = 0; at < good.length; at += 7) {
      const bad = Buffer.from(good);
      bad[at] = bad[at]! ^ 0x10;
      let err: unknown;
      try {
        Manifest.parse(bad, "m");
      } catch (e) {
        err = e;
      }
      expect(err, `byte ${at}`).toBeInstanceOf(AddCowError);
      expect((err as Error).message).toMatch(/^manifest m: .*; rebuild it with addcow manifest/);
      expect((err as Error).message).not.toMatch(/\n/);
    }
    // A digest flipped: caught by the checksum in particular.
    const flipped = Buffer.from(good);
    flipped[40] = flipped[40]! ^ 1;
    expect(() => Manifest.parse(flipped, "m")).toThrow(/its checksum does not match/);
  });

  it("bad arguments get one line and write nothing", () => {
    const dir = tempDir("addcow-manifest-");
    writeRaw(path.join(dir, "base.raw"), pattern(64 * KiB, 4));
    const r = addcow(dir, "manifest", "--block-size", "3K", "base.raw");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/^addcow: invalid manifest block size 3072: give a power of two/);
    const missing = addcow(dir, "manifest", "nope.raw");
    expect(missing.code).toBe(1);
    expect(missing.stderr.trim().split("\n")).toHaveLength(1);
    expect(fs.readdirSync(dir).sort()).toEqual(["base.raw"]);
  });
});
