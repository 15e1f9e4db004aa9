import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { createDisk } from "../../src/ops/create";
import { addcow } from "../helpers/cli";
import { MOUNT_BIN, cleanupAll, mountDisk, run } from "../helpers/mount";

// Child processes run the built helper: npm test builds before vitest.
const CHILD = path.resolve(__dirname, "../../dist/test/helpers/lock-child.js");

interface Opened {
  ok: boolean;
  pid?: number;
  message?: string;
}

const children = new Set<ChildProcess>();
let dir: string;
let disk: string;

beforeAll(() => {
  if (!fs.existsSync(CHILD)) throw new Error(`${CHILD} is missing: run npm run build first`);
});

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "addcow-locks-"));
  fs.writeFileSync(path.join(dir, "base.raw"), Buffer.alloc(1 << 20, 7));
  disk = path.join(dir, "disk.add-cow");
  await createDisk({ file: disk, backing: path.join(dir, "base.raw"), backingFormat: "raw" });
});

afterEach(async () => {
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) {
      c.kill("SIGKILL");
      await new Promise((r) => c.once("exit", r));
    }
  }
  children.clear();
  fs.rmSync(dir, { recursive: true, force: true });
});

/** Starts a process that opens `file`; resolves with what it reported. */
function openIn(file: string, mode: "read" | "write"): Promise<Opened & { child: ChildProcess }> {
  const child = spawn(process.execPath, [CHILD, file, mode], { stdio: ["pipe", "pipe", "pipe"] });
  children.add(child);
  return new Promise((resolve, reject) => {
    let out = "";
    let err = "";
    child.stderr!.on("data", (d: Buffer) => (err += d.toString()));
    child.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      const nl = out.indexOf("\n");
      if (nl >= 0) resolve({ ...(JSON.parse(out.slice(0, nl)) as Opened), child });
    });
    child.on("exit", (code) => {
      if (!out.includes("\n")) reject(new Error(`lock child exited ${code}: ${err}`));
    });
  });
}

function killHard(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    child.once("exit", () => resolve());
    child.kill("SIGKILL");
  });
}

describe("exclusive access across processes", () => {
  it("refuses a second writer and names the pid that holds the disk", async () => {
    const first = await openIn(disk, "write");
    expect(first.ok).toBe(true);
    const second = await openIn(disk, "write");
    expect(second.ok).toBe(false);
    expect(second.message).toContain(`process ${first.child.pid}`);
    expect(second.message).toContain(disk);
    expect(second.message).not.toContain("\n");
  });

  it("releases the lock when the holder is killed with SIGKILL", async () => {
    const first = await openIn(disk, "write");
    expect(first.ok).toBe(true);
    await killHard(first.child);
    const second = await openIn(disk, "write");
    expect(second.ok).toBe(true);
  });

  it("lets readers share, and keeps writers and readers apart", async () => {
    const r1 = await openIn(disk, "read");
    const r2 = await openIn(disk, "read");
    expect(r1.ok && r2.ok).toBe(true);
    const w = await openIn(disk, "write");
    expect(w.ok).toBe(false);
    expect(w.message).toMatch(/in use by process \d+/);
    await killHard(r1.child);
    await killHard(r2.child);

    const writer = await openIn(disk, "write");
    expect(writer.ok).toBe(true);
    const reader = await openIn(disk, "read");
    expect(reader.ok).toBe(false);
    expect(reader.message).toContain(`process ${writer.child.pid}`);
  });

  it("locks the image file too: two .add-cow files naming one image cannot both write", async () => {
    const other = path.join(dir, "other.add-cow");
    await createDisk({
      file: other,
      image: path.join(dir, "disk.raw"),
      backing: path.join(dir, "base.raw"),
      backingFormat: "raw",
    });
    const first = await openIn(disk, "write");
    expect(first.ok).toBe(true);
    const second = await openIn(other, "write");
    expect(second.ok).toBe(false);
    expect(second.message).toContain("disk.raw");
    expect(second.message).toContain(`process ${first.child.pid}`);
  });

  it("does not lock the backing file against other readers or other overlays", async () => {
    const other = path.join(dir, "other.add-cow");
    await createDisk({ file: other, backing: path.join(dir, "base.raw"), backingFormat: "raw" });
    const a = await openIn(disk, "write");
    const b = await openIn(other, "write");
    expect(a.ok && b.ok).toBe(true);
  });
});

describe("exclusive access with the mount daemon", () => {
  afterEach(cleanupAll);

  it("a mounted disk refuses a second mount, writers and `addcow info`; SIGKILL frees it", async () => {
    const m = await mountDisk(disk, path.join(dir, "mnt"));
    const writer = await openIn(disk, "write");
    expect(writer.ok).toBe(false);
    expect(writer.message).toContain(`process ${m.pid}`);

    // Said in the terms a user acts on: where it is mounted, how to unmount, and -U.
    const info = addcow(dir, "info", disk);
    expect(info.code).toBe(1);
    expect(info.stderr).toContain(
      `${disk} is mounted at ${m.dir} (addcow-mount, pid ${m.pid}): unmount it first (fusermount -u ${m.dir}); or add -U to read it without locks`,
    );
    expect(info.stderr.trim().split("\n")).toHaveLength(1);
    expect(addcow(dir, "info", "-U", disk).code).toBe(0);

    const again = await run(process.execPath, [MOUNT_BIN, disk, path.join(dir, "mnt2")]);
    expect(again.code).not.toBe(0);
    expect(again.stderr).toContain(`is mounted at ${m.dir} (addcow-mount, pid ${m.pid})`);
    expect(again.stderr).not.toContain("-U");

    await m.kill("SIGKILL");
    await run("fusermount", ["-uz", m.dir]);
    const after = await openIn(disk, "write");
    expect(after.ok).toBe(true);
  });
});
