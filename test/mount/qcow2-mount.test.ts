/**
 * A qcow2 base through a real mount, driven the way a user drives it: `addcow
 * create -b IMG.qcow2 -F qcow2`, `addcow-mount`, cmp against `qemu-img
 * convert -O raw`, dd writes compared with the same dd on a plain copy, info
 * and map through the qcow2 layer, and the qcow2 files untouched.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { addcow } from "../helpers/cli";
import { cleanupAll, mountDisk, sh, tempDir } from "../helpers/mount";
import {
  convertToRaw,
  mixedContent,
  qemuImg,
  qemuIo,
  scatteredWrites,
  sha256,
  compressToQcow2,
  createQcow2,
} from "../helpers/qcow2-images";

afterEach(cleanupAll);

const MiB = 1 << 20;

/** The same dd writes on the mounted file and on the reference copy. */
async function ddWrites(target: string, seedFile: string): Promise<void> {
  for (const [seek, count, bs] of [
    [0, 3, 4096],
    [777, 5, 512],
    [100, 2, 65536],
    [3000, 40, 4096],
    [1, 1, 1 << 20],
  ] as const) {
    await sh("dd", [
      `if=${seedFile}`,
      `of=${target}`,
      `bs=${bs}`,
      `seek=${seek}`,
      `count=${count}`,
      "conv=notrunc,fsync",
      "status=none",
    ]);
  }
}

async function checkThroughMount(dir: string, top: string, files: string[], extra: number) {
  const sums = files.map(sha256);
  const reference = path.join(dir, "reference.raw");
  await convertToRaw(top, reference);
  const qcowSize = fs.statSync(reference).size;
  fs.truncateSync(reference, qcowSize + extra);

  const made = addcow(
    dir,
    "create",
    "-b",
    path.basename(top),
    "-F",
    "qcow2",
    "vm.add-cow",
    `${qcowSize + extra}`,
  );
  expect(made.stderr).toBe("");
  expect(made.code).toBe(0);

  const info = addcow(dir, "info", "--backing-chain", "vm.add-cow");
  expect(info.code).toBe(0);
  expect(info.stdout).toMatch(/backing file format: qcow2/);
  expect(info.stdout).toMatch(/file format: qcow2/);
  const json = JSON.parse(addcow(dir, "info", "--json", "--backing-chain", "vm.add-cow").stdout);
  expect(json.backingChain[0]).toMatchObject({ format: "qcow2", virtualSize: qcowSize });

  const m = await mountDisk(path.join(dir, "vm.add-cow"), path.join(dir, "mnt"));
  await sh("cmp", [m.file, reference]);

  const seed = path.join(dir, "seed.bin");
  fs.writeFileSync(seed, mixedContent(2 * MiB, 99));
  await ddWrites(m.file, seed);
  await ddWrites(reference, seed);
  await sh("cmp", [m.file, reference]);
  await m.unmount();

  // After the daemon is gone: the same bytes from a fresh mount, map through the qcow2 layer.
  const again = await mountDisk(path.join(dir, "vm.add-cow"), path.join(dir, "mnt"), {
    options: "ro",
  });
  await sh("cmp", [again.file, reference]);
  await again.unmount();
  const map = addcow(dir, "map", "--json", "vm.add-cow");
  expect(map.code).toBe(0);
  const extents = JSON.parse(map.stdout) as Array<{ length: number; file: string | null }>;
  expect(extents.reduce((n, e) => n + e.length, 0)).toBe(qcowSize + extra);
  expect(extents.some((e) => e.file?.endsWith(".qcow2"))).toBe(true);

  // stream copies the whole chain, qcow2 layers included, into the image file: it stands alone.
  const streamed = addcow(dir, "stream", "vm.add-cow");
  expect(streamed.code, streamed.stderr).toBe(0);
  await sh("cmp", [path.join(dir, "vm.raw"), reference]);

  expect(files.map(sha256)).toEqual(sums);
}

describe("an add-cow disk over a qcow2 base, mounted", () => {
  it("zstd-compressed base under a qcow2 overlay with subclusters (a chain of two qcow2)", async () => {
    const dir = tempDir();
    const src = path.join(dir, "src.raw");
    fs.writeFileSync(src, mixedContent(24 * MiB, 7));
    const base = path.join(dir, "cloud.qcow2");
    await compressToQcow2(src, base, "compression_type=zstd");
    fs.rmSync(src);
    const top = path.join(dir, "golden.qcow2");
    await createQcow2(top, {
      options: "extended_l2=on,cluster_size=128k",
      backing: "cloud.qcow2",
      backingFormat: "qcow2",
    });
    await qemuIo(top, "qcow2", [
      ...scatteredWrites(24 * MiB, 80, 3),
      "write -z 5M 8k",
      "discard 9M 4k",
    ]);
    await checkThroughMount(dir, top, [top, base], 4 * MiB);
  });

  it("v2 zlib-compressed image over a smaller raw file, virtual size past the backing", async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, "base.raw"), mixedContent(5 * MiB + 3 * 512, 8));
    const top = path.join(dir, "v2.qcow2");
    await qemuImg([
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "compat=0.10,cluster_size=4k",
      "-b",
      "base.raw",
      "-F",
      "raw",
      top,
      "12M",
    ]);
    await qemuIo(top, "qcow2", [
      ...scatteredWrites(12 * MiB, 60, 4),
      "write -c -P 0x77 7M 4k",
      "write -c -P 0x78 8M 4k",
      "write -z 1M 64k",
    ]);
    await checkThroughMount(dir, top, [top, path.join(dir, "base.raw")], 0);
  });
});

describe("addcow CLI with qcow2 backings: one-line refusals, nothing left behind", () => {
  it("create -F qcow2 on a raw file, a qcow2 without a backing format, commit into a qcow2", async () => {
    const dir = tempDir();
    fs.writeFileSync(path.join(dir, "plain.raw"), Buffer.alloc(1 << 20, 1));
    const notQcow2 = addcow(dir, "create", "-b", "plain.raw", "-F", "qcow2", "a.add-cow");
    expect(notQcow2.code).toBe(1);
    expect(notQcow2.stderr).toMatch(
      /^addcow: plain\.raw: qcow2 magic is missing: not a qcow2 image; check the file and -F\n$/,
    );

    await createQcow2(path.join(dir, "img.qcow2"), { backing: "plain.raw", backingFormat: "raw" });
    const b = fs.readFileSync(path.join(dir, "img.qcow2"));
    b.writeUInt32BE(0x12345678, b.readUInt32BE(100)); // hide the backing format extension
    fs.writeFileSync(path.join(dir, "img.qcow2"), b);
    const noFormat = addcow(dir, "create", "-b", "img.qcow2", "-F", "qcow2", "b.add-cow");
    expect(noFormat.code).toBe(1);
    expect(noFormat.stderr.trim().split("\n")).toHaveLength(1);
    expect(noFormat.stderr).toMatch(/records no backing format \(formats are never guessed\)/);
    expect(fs.readdirSync(dir).sort()).toEqual(["img.qcow2", "plain.raw"]);

    await createQcow2(path.join(dir, "base.qcow2"), { size: "1M" });
    expect(addcow(dir, "create", "-q", "-b", "base.qcow2", "-F", "qcow2", "c.add-cow").code).toBe(
      0,
    );
    const before = sha256(path.join(dir, "base.qcow2"));
    const commit = addcow(dir, "commit", "c.add-cow");
    expect(commit.code).toBe(1);
    expect(commit.stderr).toMatch(
      /is a qcow2 image, which addcow opens read-only: it cannot be written/,
    );
    expect(sha256(path.join(dir, "base.qcow2"))).toBe(before);
  });
});
