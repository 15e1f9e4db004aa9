/**
 * The backing pin (docs/specs/add-cow.md, "The backing pin"): a disk remembers
 * what its backing was when it was made, and refuses, in one line, a backing
 * that changed since; `rebase -u -b SAME` accepts the change on purpose.
 * Resize, rebase, commit and snapshot keep or renew it; check verifies it;
 * info shows it; older addcow versions ignore it.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { createDisk } from "../../src/ops/create";
import { openDisk } from "../../src/chain/open-chain";
import { AddCowError } from "../../src/util/errors";
import { encodeHeader, headerSizeFor, bitmapBytes } from "../../src/addcow/header";
import {
  PIN_AREA_SIZE,
  decodeSlot,
  encodeSlot,
  pinRecord,
  readPinState,
} from "../../src/addcow/pin";
import { openPosixFile } from "../../src/block/file-io";
import { readHeader } from "../../src/addcow/open-addcow";
import type { DiskInfo } from "../../src/ops/info";
import { addcow, addcowEnv } from "../helpers/cli";
import { KiB, MiB, pattern, readDisk, tempDir, withDisk, writeRaw } from "../helpers/jobs";
import { qemuImg, qemuIo } from "../helpers/qcow2-images";

const SIZE = 4 * MiB;

async function pinOf(file: string) {
  const io = await openPosixFile(file, "read");
  try {
    return await readPinState(io, await readHeader(io, file), await io.size());
  } finally {
    await io.close();
  }
}

/** An error's one line, from the engine. */
async function refusal(fn: () => Promise<unknown>): Promise<AddCowError> {
  try {
    await fn();
  } catch (err) {
    if (err instanceof AddCowError) return err;
    throw err;
  }
  throw new Error("expected a refusal");
}

/** A raw base, an overlay on it with some guest writes; what the disk reads. */
async function overlayOnRaw(dir: string) {
  const base = path.join(dir, "base.raw");
  writeRaw(base, pattern(SIZE, 1));
  const disk = path.join(dir, "vm.add-cow");
  await createDisk({ file: disk, backing: base, backingFormat: "raw" });
  await withDisk(disk, { writable: true }, async (dev) => {
    await dev.write(pattern(100 * KiB, 2), 300 * KiB);
  });
  return { base, disk, before: await readDisk(disk) };
}

describe("the pin's slots", () => {
  const identity = { kind: "add-cow", size: 4096, disk: null } as const;
  const record = pinRecord({ backingName: "b.add-cow", backingFormat: "add-cow" }, identity);

  it("round-trips, and any flipped byte makes a slot invalid", () => {
    const slot = encodeSlot(record, 7n);
    expect(decodeSlot(slot)).toEqual({ record, generation: 7n });
    for (const at of [0, 9, 16, 30, 60, 100, 4095]) {
      const bad = Buffer.from(slot);
      bad[at] = bad[at]! ^ 0x40;
      expect(typeof decodeSlot(bad), `byte ${at}`).toBe("string");
    }
  });
});

describe("a changed base is refused", () => {
  it("a raw base replaced by other bytes of the same size: refused in one line; rebase -u accepts it", async () => {
    const dir = tempDir("pin-raw");
    const { base, disk, before } = await overlayOnRaw(dir);
    expect((await pinOf(disk)).kind).toBe("pinned");
    // Same size, other bytes (another build of the image).
    const other = pattern(SIZE, 99);
    writeRaw(base, other);
    const err = await refusal(() => openDisk(disk));
    expect(err.reason).toBe("changed-backing");
    expect(err.message).not.toMatch(/\n/);
    expect(err.message).toMatch(
      /vm\.add-cow: backing file .*base\.raw is not the one this disk was made on \(fingerprint was [0-9a-f]{16}\.\.\., now [0-9a-f]{16}\.\.\.\).*addcow rebase -u -b .*base\.raw -F raw .*vm\.add-cow$/,
    );
    // The command line says the same, and changes nothing.
    const metaBefore = fs.readFileSync(disk);
    const r = addcow(dir, "info", "vm.add-cow");
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(r.stderr).toMatch(/is not the one this disk was made on/);
    expect(fs.readFileSync(disk).equals(metaBefore)).toBe(true);
    const checked = addcow(dir, "check", "vm.add-cow");
    expect(checked.code).toBe(2);
    expect(checked.stdout).toMatch(/corruption: backing pin .*fingerprint was/);

    // Accepted on purpose: a warning, then the disk opens on the new bytes.
    const u = addcow(dir, "rebase", "-u", "-b", "base.raw", "-F", "raw", "vm.add-cow");
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toMatch(
      /^addcow: warning: .*vm\.add-cow was pinned to another base .*fingerprint was.*guest data written over the old base may not match the new one/,
    );
    const now = await readDisk(disk);
    // The guest's own clusters are kept; the rest reads the new base.
    expect(now.subarray(0, 256 * KiB).equals(other.subarray(0, 256 * KiB))).toBe(true);
    expect(now.subarray(300 * KiB, 400 * KiB).equals(before.subarray(300 * KiB, 400 * KiB))).toBe(
      true,
    );
    expect(addcow(dir, "check", "vm.add-cow").code).toBe(0);
  });

  it("a change the samples see: a file system's superblock at 1 MiB, the last block, the length", async () => {
    const dir = tempDir("pin-samples");
    const { base, disk } = await overlayOnRaw(dir);
    for (const [what, change] of [
      ["1 MiB + 1 KiB", (fd: number) => fs.writeSync(fd, Buffer.from("mounted"), 0, 7, MiB + 1024)],
      ["the last byte", (fd: number) => fs.writeSync(fd, Buffer.from([1]), 0, 1, SIZE - 1)],
      ["the length", (fd: number) => fs.ftruncateSync(fd, SIZE + 4096)],
    ] as const) {
      const saved = fs.readFileSync(base);
      const fd = fs.openSync(base, "r+");
      change(fd);
      fs.closeSync(fd);
      const err = await refusal(() => openDisk(disk));
      expect(err.reason, what).toBe("changed-backing");
      fs.writeFileSync(base, saved);
      await withDisk(disk, {}, async () => undefined);
    }
  });

  it("a qcow2 base replaced by another image of the same size", async () => {
    const dir = tempDir("pin-qcow2");
    const base = path.join(dir, "base.qcow2");
    await qemuImg(["create", "-q", "-f", "qcow2", base, "4M"]);
    await qemuIo(base, "qcow2", ["write -P 0x11 0 1M", "write -P 0x22 2M 64k"]);
    const disk = path.join(dir, "vm.add-cow");
    await createDisk({ file: disk, backing: base, backingFormat: "qcow2" });
    expect(await pinOf(disk)).toMatchObject({
      kind: "pinned",
      record: { identity: { kind: "file", format: "qcow2", size: SIZE } },
    });
    // The same layout with other bytes: header and L1 alike, the data differs.
    fs.rmSync(base);
    await qemuImg(["create", "-q", "-f", "qcow2", base, "4M"]);
    await qemuIo(base, "qcow2", ["write -P 0x33 0 1M", "write -P 0x22 2M 64k"]);
    const err = await refusal(() => openDisk(disk));
    expect(err.message).toMatch(
      /base\.qcow2 is not the one this disk was made on \(fingerprint was/,
    );
    const u = addcow(dir, "rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", "vm.add-cow");
    expect(u.code, u.stderr).toBe(0);
    expect((await readDisk(disk))[0]).toBe(0x33);
  });

  it("an add-cow backing replaced by another disk: its id is pinned", async () => {
    const dir = tempDir("pin-addcow");
    const { disk } = await overlayOnRaw(dir);
    const top = path.join(dir, "top.add-cow");
    expect(addcow(dir, "snapshot", "vm.add-cow", "top.add-cow").code).toBe(0);
    const lower = await pinOf(disk);
    expect(await pinOf(top)).toMatchObject({
      record: {
        identity: {
          kind: "add-cow",
          size: SIZE,
          disk: lower.kind === "pinned" ? lower.record.disk : "",
        },
      },
    });
    await withDisk(top, {}, async () => undefined);
    // vm.add-cow made again the same way: same names, same size, another disk.
    fs.rmSync(disk);
    fs.rmSync(path.join(dir, "vm.raw"));
    await createDisk({ file: disk, backing: path.join(dir, "base.raw"), backingFormat: "raw" });
    const err = await refusal(() => openDisk(top));
    expect(err.message).toMatch(
      /vm\.add-cow is not the one this disk was made on \(disk id was [0-9a-f]{32}, now [0-9a-f]{32}\)/,
    );
  });
});

describe("the pin through the operations that change a disk", () => {
  it("resize grow and shrink keep it; check stays clean", async () => {
    const dir = tempDir("pin-resize");
    const { disk, before } = await overlayOnRaw(dir);
    const pinned = await pinOf(disk);
    for (const size of ["8M", "5M", "4M"]) {
      const extra = size === "4M" || size === "5M" ? ["--shrink"] : [];
      const r = addcow(dir, "resize", ...extra, "vm.add-cow", size);
      expect(r.code, r.stderr).toBe(0);
      const now = await pinOf(disk);
      expect(now).toMatchObject({
        kind: "pinned",
        record: pinned.kind === "pinned" ? pinned.record : {},
      });
      expect(fs.statSync(disk).size % 4096).toBe(0);
      const c = addcow(dir, "check", "vm.add-cow");
      expect(c.code, c.stdout).toBe(0);
    }
    expect((await readDisk(disk)).equals(before)).toBe(true);
  });

  it("commit re-pins the disk on what it wrote into the backing; another overlay on that base is refused", async () => {
    const dir = tempDir("pin-commit");
    const { disk, before } = await overlayOnRaw(dir);
    const sibling = path.join(dir, "other.add-cow");
    await createDisk({ file: sibling, backing: path.join(dir, "base.raw"), backingFormat: "raw" });
    // The guest writes land where the fingerprint samples (the first 64 KiB).
    await withDisk(disk, { writable: true }, async (dev) => {
      await dev.write(pattern(8 * KiB, 5), 4 * KiB);
    });
    const expected = await readDisk(disk);
    expect(expected.equals(before)).toBe(false);
    const r = addcow(dir, "commit", "vm.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect(await pinOf(disk)).toMatchObject({ record: { status: "pinned" } });
    expect((await readDisk(disk)).equals(expected)).toBe(true);
    // The base changed under the other overlay: exactly what its pin is for.
    const err = await refusal(() => openDisk(sibling));
    expect(err.reason).toBe("changed-backing");
  });

  it("safe rebase pins the new backing; rebase -b '' drops the pin", async () => {
    const dir = tempDir("pin-rebase");
    const { disk, before } = await overlayOnRaw(dir);
    const base2 = path.join(dir, "base2.raw");
    const b2 = pattern(SIZE, 1);
    b2.fill(7, 0, 64 * KiB);
    writeRaw(base2, b2);
    expect(addcow(dir, "rebase", "-b", "base2.raw", "-F", "raw", "vm.add-cow").code).toBe(0);
    expect((await readDisk(disk)).equals(before)).toBe(true);
    const p = await pinOf(disk);
    expect(p).toMatchObject({
      kind: "pinned",
      record: { identity: { kind: "file", fileSize: SIZE } },
    });
    // A change to base2 is caught, base.raw is no longer what it is pinned to.
    writeRaw(path.join(dir, "base.raw"), pattern(SIZE, 3));
    await withDisk(disk, {}, async () => undefined);
    const r = addcow(dir, "rebase", "-b", "", "vm.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect((await pinOf(disk)).kind).toBe("none");
    expect(addcow(dir, "check", "vm.add-cow").code).toBe(0);
  });

  it("a disk made before pins opens as before, says so, and rebase -u pins it", async () => {
    const dir = tempDir("pin-old");
    const base = path.join(dir, "base.raw");
    writeRaw(base, pattern(SIZE, 1));
    const disk = path.join(dir, "old.add-cow");
    // As addcow 0.1 wrote it: header and bitmap, no pin.
    const headerSize = headerSizeFor(16);
    const header = encodeHeader({
      clusterBits: 16,
      headerSize,
      incompatibleFeatures: 0n,
      compatibleFeatures: 0n,
      backingName: "base.raw",
      backingFormat: "raw",
      imageName: "old.raw",
      imageFormat: "raw",
    });
    const meta = Buffer.alloc(headerSize + bitmapBytes(SIZE / 65536, 16).padded);
    header.copy(meta);
    fs.writeFileSync(disk, meta);
    fs.writeFileSync(path.join(dir, "old.raw"), Buffer.alloc(0));
    fs.truncateSync(path.join(dir, "old.raw"), SIZE);
    const info = JSON.parse(addcow(dir, "info", "--json", "old.add-cow").stdout) as DiskInfo;
    expect(info.pin).toEqual({ state: "none" });
    expect(addcow(dir, "info", "old.add-cow").stdout).toMatch(/^backing pin: not pinned/m);
    const u = addcow(dir, "rebase", "-u", "-b", "base.raw", "-F", "raw", "old.add-cow");
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toBe("");
    const now = JSON.parse(addcow(dir, "info", "--json", "old.add-cow").stdout) as DiskInfo;
    expect(now.pin).toMatchObject({
      state: "pinned",
      identity: { kind: "file", format: "raw", size: SIZE },
    });
    expect(now.features.compatibleBits).toEqual([1]);
    expect(fs.statSync(disk).size).toBe(meta.length + PIN_AREA_SIZE);
  });

  it("a pin that cannot be read (an older addcow's resize zeroed it) refuses the disk until re-pinned", async () => {
    const dir = tempDir("pin-zeroed");
    const { disk } = await overlayOnRaw(dir);
    const size = fs.statSync(disk).size;
    const fd = fs.openSync(disk, "r+");
    fs.writeSync(fd, Buffer.alloc(PIN_AREA_SIZE), 0, PIN_AREA_SIZE, size - PIN_AREA_SIZE);
    fs.closeSync(fd);
    const err = await refusal(() => openDisk(disk));
    expect(err.message).toMatch(
      /the pin of backing file .*base\.raw \(compatible feature bit 1\) cannot be read: slot 0: .*; slot 1: .*rebase -u/,
    );
    // Read-only opens that do not read the backing still work (rebase -u needs that).
    const u = addcow(dir, "rebase", "-u", "-b", "base.raw", "-F", "raw", "vm.add-cow");
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toMatch(/old pin could not be read/);
    await withDisk(disk, {}, async () => undefined);
  });
});

describe("info shows the pin", () => {
  it("text and JSON", async () => {
    const dir = tempDir("pin-info");
    await overlayOnRaw(dir);
    const text = addcow(dir, "info", "vm.add-cow").stdout;
    expect(text).toMatch(
      /^backing pin: 4194304 bytes, raw file of 4194304 bytes, fingerprint [0-9a-f]{64} \(pinned \d{4}-/m,
    );
    const info = JSON.parse(addcow(dir, "info", "--json", "vm.add-cow").stdout) as DiskInfo;
    expect(info.pin).toMatchObject({
      state: "pinned",
      disk: expect.stringMatching(/^[0-9a-f]{32}$/),
      identity: { kind: "file", format: "raw", size: SIZE, fileSize: SIZE },
    });
    expect(info.features.compatibleBits).toEqual([1]);
    expect(addcowEnv(dir, {}, "check", "vm.add-cow").code).toBe(0);
  });
});
