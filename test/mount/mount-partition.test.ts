import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  attachLoop,
  cleanupAll,
  detachLoop,
  makeOverlay,
  mountBlock,
  mountDisk,
  run,
  sh,
  tempDir,
  umountBlock,
  waitFor,
  writePatternFile,
} from "../helpers/mount";

// A partitioned disk inside the mounted file: losetup -P, ext4, e2fsck.
afterEach(cleanupAll);

const MiB = 1 << 20;

function sha(file: string): string {
  return crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

async function partition(loop: string, n: number): Promise<string> {
  const dev = `${loop}p${n}`;
  await waitFor(`${dev} to appear`, () => fs.existsSync(dev), 10_000);
  return dev;
}

describe("addcow-mount: partitioned disk", () => {
  it("losetup -P, ext4 on a partition, e2fsck clean, files there after a remount; backing unchanged", async () => {
    const dir = tempDir();
    // The backing disk: an MBR with two partitions, ext4 on the first holding one file.
    const base = path.join(dir, "base.raw");
    fs.writeFileSync(base, "");
    fs.truncateSync(base, 40 * MiB);
    const table = "label: dos\nstart=2048, size=49152, type=83\nstart=51200, type=83\n";
    const sf = await run("sfdisk", ["--quiet", base], { input: table });
    expect(sf.code, sf.stderr).toBe(0);
    const baseLoop = await attachLoop(base, { partitions: true });
    const baseP1 = await partition(baseLoop, 1);
    await sh("mkfs.ext4", ["-q", "-F", baseP1]);
    const fsDir = path.join(dir, "fs");
    await mountBlock(baseP1, fsDir);
    fs.writeFileSync(path.join(fsDir, "from-base.txt"), "written into the backing disk\n");
    await umountBlock(fsDir);
    await detachLoop(baseLoop);
    const baseSum = sha(base);

    // The overlay, mounted, used as a partitioned disk.
    const o = await makeOverlay(dir, "disk", { backing: base });
    const mnt = path.join(dir, "mnt");
    const m = await mountDisk(o.addcow, mnt);
    const loop = await attachLoop(m.file, { partitions: true });
    const p1 = await partition(loop, 1);
    await partition(loop, 2);
    await mountBlock(p1, fsDir);
    expect(fs.readFileSync(path.join(fsDir, "from-base.txt"), "utf8")).toBe(
      "written into the backing disk\n",
    );
    writePatternFile(path.join(fsDir, "big.bin"), 5 * MiB + 123, 42);
    fs.mkdirSync(path.join(fsDir, "sub"));
    for (let i = 0; i < 20; i++) fs.writeFileSync(path.join(fsDir, "sub", `f${i}`), `file ${i}\n`);
    const bigSum = sha(path.join(fsDir, "big.bin"));
    await umountBlock(fsDir);
    const fsck = await run("e2fsck", ["-fn", p1]);
    expect(fsck.code, fsck.stdout + fsck.stderr).toBe(0);
    await detachLoop(loop);
    await m.unmount();
    expect(sha(base)).toBe(baseSum);

    // A fresh daemon: everything is there and the filesystem is still clean.
    const m2 = await mountDisk(o.addcow, mnt, { options: "ro" });
    const loop2 = await attachLoop(m2.file, { partitions: true });
    const p1b = await partition(loop2, 1);
    const fsck2 = await run("e2fsck", ["-fn", p1b]);
    expect(fsck2.code, fsck2.stdout + fsck2.stderr).toBe(0);
    await mountBlock(p1b, fsDir, "ro,noload");
    expect(sha(path.join(fsDir, "big.bin"))).toBe(bigSum);
    expect(fs.readdirSync(path.join(fsDir, "sub"))).toHaveLength(20);
    expect(fs.readFileSync(path.join(fsDir, "sub", "f7"), "utf8")).toBe("file 7\n");
    expect(fs.readFileSync(path.join(fsDir, "from-base.txt"), "utf8")).toBe(
      "written into the backing disk\n",
    );
    await umountBlock(fsDir);
    await detachLoop(loop2);
    await m2.unmount();
    expect(sha(base)).toBe(baseSum);
  });
});
