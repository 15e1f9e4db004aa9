import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { cleanupAll, makeOverlay, mountDisk, run, tempDir } from "../helpers/mount";
import { readAll, withDisk } from "../helpers/jobs";

/**
 * Live snapshot and live commit reopen layers of a mounted disk: they must
 * open them with the mount's own options (copy-on-read, confinement), and a
 * layer that becomes a backing must stop changing.
 */
const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");
const MiB = 1 << 20;
const CLUSTER = 64 * 1024;
let runtime = "";
const savedRuntime = process.env.ADDCOW_RUNTIME_DIR;

beforeAll(() => {
  runtime = tempDir("addcow-live-opts-run-");
  process.env.ADDCOW_RUNTIME_DIR = runtime;
});
afterAll(() => {
  fs.rmSync(runtime, { recursive: true, force: true });
  if (savedRuntime === undefined) delete process.env.ADDCOW_RUNTIME_DIR;
  else process.env.ADDCOW_RUNTIME_DIR = savedRuntime;
});
afterEach(async () => {
  await cleanupAll();
});

function addcow(...args: string[]) {
  return run(process.execPath, [ADDCOW, ...args]);
}

function sha(file: string): string {
  return crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

/**
 * Reads [offset, offset + length) of the mounted file with O_DIRECT: exactly
 * those clusters reach the daemon (no page cache, no readahead).
 */
async function readThrough(file: string, offset: number, length: number): Promise<Buffer> {
  const out = path.join(tempDir("addcow-live-opts-read-"), "out");
  const r = await run("dd", [
    `if=${file}`,
    `of=${out}`,
    "bs=64K",
    `skip=${offset / CLUSTER}`,
    `count=${length / CLUSTER}`,
    "iflag=direct",
    "status=none",
  ]);
  expect(r.code, r.stderr).toBe(0);
  return fs.readFileSync(out);
}

async function allocated(file: string): Promise<number> {
  return withDisk(file, {}, (dev) => dev.countAllocated());
}

describe("live jobs keep the mount's options", () => {
  it("live snapshot under -o copy-on-read: the new top copies on read, the old layer is unchanged byte for byte", async () => {
    const dir = tempDir("addcow-live-cor-snap-");
    const ov = await makeOverlay(dir, "a", { backingBytes: 8 * MiB });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"), { options: "copy-on-read" });
    // Before the snapshot, reads land in a (copy-on-read at work).
    await readThrough(m.file, 0, MiB);
    const snap = path.join(dir, "b.add-cow");
    const s = await addcow("snapshot", ov.addcow, snap);
    expect(s.code, s.stderr).toBe(0);
    const aMeta = sha(ov.addcow);
    const aImage = sha(ov.image);
    // After it, reads of other clusters must land in b, never in a.
    const read = await readThrough(m.file, 2 * MiB, 2 * MiB);
    expect(read.equals(fs.readFileSync(ov.backing!).subarray(2 * MiB, 4 * MiB))).toBe(true);
    await m.unmount();
    expect(sha(ov.addcow), "a.add-cow changed after it became a backing").toBe(aMeta);
    expect(sha(ov.image), "a.raw changed after it became a backing").toBe(aImage);
    expect(await allocated(ov.addcow)).toBe(MiB / CLUSTER);
    expect(await allocated(snap)).toBe((2 * MiB) / CLUSTER);
    await withDisk(snap, {}, async (top) => {
      expect((await readAll(top)).equals(fs.readFileSync(ov.backing!))).toBe(true);
    });
  });

  it("live commit under -o copy-on-read: the reopened disk still copies on read", async () => {
    const dir = tempDir("addcow-live-cor-commit-");
    const ov = await makeOverlay(dir, "a", { backingBytes: 8 * MiB });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"), { options: "copy-on-read" });
    const data = Buffer.alloc(MiB, 0x5a);
    const fd = fs.openSync(m.file, "r+");
    try {
      fs.writeSync(fd, data, 0, data.length, 0);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    const c = await addcow("commit", ov.addcow);
    expect(c.code, c.stderr).toBe(0);
    await readThrough(m.file, 4 * MiB, 2 * MiB);
    await m.unmount();
    // The commit emptied the overlay; the reads after it were copied into it again.
    expect(await allocated(ov.addcow)).toBe((2 * MiB) / CLUSTER);
    expect(fs.readFileSync(ov.backing!).subarray(0, MiB).equals(data)).toBe(true);
  });

  it("live snapshot and commit under -o confine: the new layer is judged like the mount, and both work inside", async () => {
    const dir = tempDir("addcow-live-confine-");
    const outside = tempDir("addcow-live-confine-out-");
    const ov = await makeOverlay(dir, "a", { backingBytes: 4 * MiB });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"), { options: "confine" });
    // A new layer whose image file lies outside the disk's directory is refused, nothing switches.
    const refused = await addcow(
      "snapshot",
      "-i",
      path.join(outside, "b.raw"),
      ov.addcow,
      path.join(dir, "b.add-cow"),
    );
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/outside/);
    expect(fs.existsSync(path.join(dir, "b.add-cow"))).toBe(false);
    // Inside, it works; then a commit of the new top into a, reopened confined too.
    const snap = path.join(dir, "b.add-cow");
    expect((await addcow("snapshot", ov.addcow, snap)).code).toBe(0);
    const data = Buffer.alloc(MiB, 0x33);
    const fd = fs.openSync(m.file, "r+");
    try {
      fs.writeSync(fd, data, 0, data.length, MiB);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    const c = await addcow("commit", snap);
    expect(c.code, c.stderr).toBe(0);
    await m.unmount();
    await withDisk(ov.addcow, {}, async (dev) => {
      const all = await readAll(dev);
      expect(all.subarray(MiB, 2 * MiB).equals(data)).toBe(true);
    });
  });
});
