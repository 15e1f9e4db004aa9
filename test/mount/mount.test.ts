import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { headerSizeFor } from "../../src/addcow/header";
import {
  MOUNT_BIN,
  attachLoop,
  cleanupAll,
  daemonPid,
  detachLoop,
  makeOverlay,
  mountArgs,
  mountDisk,
  mountDisks,
  processAlive,
  run,
  sh,
  tempDir,
  trackMount,
  waitFor,
} from "../helpers/mount";

afterEach(cleanupAll);

const MiB = 1 << 20;
const CLI_BIN = MOUNT_BIN.replace(/addcow-mount\.js$/, "addcow.js");

function sha(file: string): string {
  return require("node:crypto").createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

/** The same pwrite on the mounted file and on a plain copy. */
function writeBoth(files: string[], data: Buffer, offset: number): void {
  for (const f of files) {
    const fd = fs.openSync(f, "r+");
    try {
      expect(fs.writeSync(fd, data, 0, data.length, offset)).toBe(data.length);
    } finally {
      fs.closeSync(fd);
    }
  }
}

function mounted(dir: string): boolean {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .some((l) => l.split(" ")[4] === dir);
}

describe("addcow-mount: data through the mounted file", () => {
  it("equals the backing file, then a plain copy given the same odd writes; backing unchanged", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: 8 * MiB + 3 * 4096 });
    const backingSum = sha(o.backing!);
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"));
    expect(m.file).toBe(path.join(dir, "mnt", "disk"));
    expect(fs.statSync(m.file).size).toBe(8 * MiB + 3 * 4096);
    await sh("cmp", [m.file, o.backing!]);

    const copy = path.join(dir, "copy.raw");
    fs.copyFileSync(o.backing!, copy);
    const writes: Array<[number, number]> = [
      [1, 1],
      [65535, 3], // across a cluster boundary
      [1_000_003, 70_001], // several clusters, odd edges
      [3 * MiB - 17, 200_000],
      [8 * MiB + 3 * 4096 - 5, 5], // the last bytes
      [4096, 4096],
    ];
    let seed = 1;
    for (const [off, len] of writes) {
      const data = Buffer.alloc(len, (seed++ * 37) & 0xff);
      writeBoth([m.file, copy], data, off);
    }
    // dd in the middle too, without truncating.
    await sh("dd", [
      `if=${o.backing}`,
      `of=${m.file}`,
      "bs=4k",
      "count=5",
      "seek=300",
      "skip=7",
      "conv=notrunc",
      "status=none",
    ]);
    await sh("dd", [
      `if=${o.backing}`,
      `of=${copy}`,
      "bs=4k",
      "count=5",
      "seek=300",
      "skip=7",
      "conv=notrunc",
      "status=none",
    ]);
    await sh("cmp", [m.file, copy]);
    const out = path.join(dir, "out.raw");
    await sh("dd", [`if=${m.file}`, `of=${out}`, "bs=1M", "status=none"]);
    await sh("cmp", [out, copy]);
    expect(sha(o.backing!)).toBe(backingSum);

    // The data survives an unmount and a fresh daemon.
    await m.unmount();
    const m2 = await mountDisk(o.addcow, path.join(dir, "mnt"));
    await sh("cmp", [m2.file, copy]);
    expect(sha(o.backing!)).toBe(backingSum);
  });

  it("reads short at the end, refuses writes past it and size changes, ignores O_TRUNC", async () => {
    const dir = tempDir();
    const size = 1 * MiB + 512;
    const o = await makeOverlay(dir, "d", { backingBytes: size });
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"));
    const fd = fs.openSync(m.file, "r+");
    try {
      const buf = Buffer.alloc(4096);
      expect(fs.readSync(fd, buf, 0, 4096, size - 100)).toBe(100);
      expect(fs.readSync(fd, buf, 0, 4096, size)).toBe(0);
      // Straddling the end: short; at the end: ENOSPC, like a block device.
      expect(fs.writeSync(fd, Buffer.alloc(300, 1), 0, 300, size - 100)).toBe(100);
      expect(() => fs.writeSync(fd, Buffer.alloc(10, 1), 0, 10, size)).toThrow(/ENOSPC/);
      expect(() => fs.ftruncateSync(fd, 4096)).toThrow(/EPERM/);
      fs.ftruncateSync(fd, size); // its own size: fine
    } finally {
      fs.closeSync(fd);
    }
    expect(fs.statSync(m.file).size).toBe(size);
    // open(O_TRUNC) as in `dd of=FILE` without conv=notrunc changes nothing.
    fs.closeSync(fs.openSync(m.file, "w"));
    expect(fs.statSync(m.file).size).toBe(size);
    const tail = Buffer.alloc(100);
    const rfd = fs.openSync(m.file, "r");
    fs.readSync(rfd, tail, 0, 100, size - 100);
    fs.closeSync(rfd);
    expect(tail.equals(Buffer.alloc(100, 1))).toBe(true);
  });

  it("st_blocks follows the image file's allocation; fsync and writethrough work", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "d", { backingBytes: 4 * MiB });
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"), { options: "cache=writethrough" });
    const before = fs.statSync(m.file).blocks;
    await sh("dd", [
      "if=/dev/zero",
      `of=${m.file}`,
      "bs=1M",
      "count=2",
      "conv=notrunc,fsync",
      "status=none",
    ]);
    const after = fs.statSync(m.file).blocks;
    expect(after - before).toBeGreaterThanOrEqual((2 * MiB) / 512);
    expect(after).toBe(fs.statSync(o.image).blocks);
  });
});

describe("addcow-mount: cache=writeback", () => {
  it("writes the bitmap to the .add-cow file within a few seconds without fsync", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"));
    const bitmapByte = () => {
      const fd = fs.openSync(o.addcow, "r");
      try {
        const b = Buffer.alloc(1);
        fs.readSync(fd, b, 0, 1, headerSizeFor(16));
        return b[0]!;
      } finally {
        fs.closeSync(fd);
      }
    };
    // Kept open: a close would flush (FUSE flush), which is not what is tested here.
    const fd = fs.openSync(m.file, "r+");
    try {
      fs.writeSync(fd, Buffer.alloc(100, 7), 0, 100, 5 * 65536 + 10); // cluster 5
      const start = Date.now();
      expect(bitmapByte() & (1 << 5)).toBe(0); // not yet durable
      await waitFor("the periodic write-back", () => (bitmapByte() & (1 << 5)) !== 0, 12_000);
      expect(Date.now() - start).toBeLessThan(7_000);
      expect(bitmapByte()).toBe(1 << 5); // only that cluster
    } finally {
      fs.closeSync(fd);
    }
  });
});

describe("addcow-mount: lifecycle", () => {
  it("SIGTERM while a loop device holds the file: flushes, detaches the mount lazily and exits", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"));
    const loop = await attachLoop(m.file);
    const fd = fs.openSync(loop, "r+");
    fs.writeSync(fd, Buffer.from("through the loop device"), 0, 23, 4096);
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    await m.kill("SIGTERM");
    expect(mounted(m.dir)).toBe(false);
    await detachLoop(loop);
    const m2 = await mountDisk(o.addcow, path.join(dir, "mnt"));
    const got = Buffer.alloc(23);
    const rfd = fs.openSync(m2.file, "r");
    fs.readSync(rfd, got, 0, 23, 4096);
    fs.closeSync(rfd);
    expect(got.toString()).toBe("through the loop device");
  });

  it("goes to the background once ready and stops on fusermount -u", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    const mnt = path.join(dir, "new", "mnt"); // created when missing
    trackMount(mnt);
    const r = await run(process.execPath, [MOUNT_BIN, o.addcow, mnt]);
    expect(r).toMatchObject({ code: 0, stderr: "" });
    // Usable on the next line.
    expect(fs.readdirSync(mnt)).toEqual(["disk"]);
    await sh("cmp", [path.join(mnt, "disk"), o.backing!]);
    const m = await mountDisk(o.addcow, mnt).catch((e: Error) => e);
    expect(String(m)).toMatch(/already a mount point/);
    const pid = daemonPid(mnt)!;
    expect(pid).toBeGreaterThan(0);
    await sh("fusermount", ["-u", mnt]);
    await waitFor("daemon exit after external unmount", () => !processAlive(pid));
    expect(mounted(mnt)).toBe(false);

    // Unmount and mount again at once: the new daemon waits for the old one to let go.
    const again = await run(process.execPath, [MOUNT_BIN, o.addcow, mnt]);
    expect(again).toMatchObject({ code: 0, stderr: "" });
    const pid2 = daemonPid(mnt)!;
    await sh("fusermount", ["-u", mnt]);
    const third = await run(process.execPath, [MOUNT_BIN, o.addcow, mnt]);
    expect(third).toMatchObject({ code: 0, stderr: "" });
    expect(processAlive(pid2)).toBe(false);

    // addcow info right after the unmount waits for the daemon's last flush too.
    const pid3 = daemonPid(mnt)!;
    const fd = fs.openSync(path.join(mnt, "disk"), "r+");
    fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 3 * 65536);
    fs.closeSync(fd);
    await sh("fusermount", ["-u", mnt]);
    const info = await run(process.execPath, [CLI_BIN, "info", "--json", o.addcow]);
    expect(info).toMatchObject({ code: 0, stderr: "" });
    expect(JSON.parse(info.stdout)).toMatchObject({ allocatedClusters: 1 });
    expect(processAlive(pid3)).toBe(false);
  });

  it("a MOUNTDIR reached through a symlink stays mounted", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    fs.mkdirSync(path.join(dir, "real"));
    fs.symlinkSync("real", path.join(dir, "link"));
    trackMount(path.join(dir, "real"));
    const r = await run(process.execPath, [MOUNT_BIN, o.addcow, path.join(dir, "link")]);
    expect(r).toMatchObject({ code: 0, stderr: "" });
    const pid = daemonPid(path.join(dir, "link"))!;
    expect(pid).toBeGreaterThan(0);
    await new Promise((resolve) => setTimeout(resolve, 800)); // several mount-table polls
    expect(processAlive(pid)).toBe(true);
    expect(mounted(path.join(dir, "real"))).toBe(true);
    await sh("fusermount", ["-u", path.join(dir, "real")]);
    await waitFor("daemon exit", () => !processAlive(pid));
  });

  it("foreground: SIGTERM and SIGINT flush, unmount and exit 0", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    for (const sig of ["SIGTERM", "SIGINT"] as const) {
      const { spawn } = await import("node:child_process");
      const mnt = path.join(dir, "mnt");
      const child = spawn(
        process.execPath,
        [MOUNT_BIN, ...mountArgs([o.addcow], mnt, { foreground: true })],
        {
          stdio: "ignore",
        },
      );
      try {
        await waitFor("mount", () => mounted(mnt));
        writeBoth([path.join(mnt, "disk")], Buffer.from(sig), 100);
        const exited = new Promise<number | null>((resolve) => child.on("exit", (c) => resolve(c)));
        child.kill(sig);
        expect(await exited).toBe(0);
        expect(mounted(mnt)).toBe(false);
      } finally {
        if (child.exitCode === null) child.kill("SIGKILL");
      }
    }
    // The last write survived the stop (reopened by a new daemon).
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"));
    expect(fs.readFileSync(m.file).subarray(100, 105).toString()).toBe("SIGIN");
  });

  it("refuses a second mount of the same disk, naming the pid, and leaves nothing behind", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    const m = await mountDisk(o.addcow, path.join(dir, "a"));
    const r = await run(process.execPath, [MOUNT_BIN, o.addcow, path.join(dir, "b")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      `${o.addcow} is mounted at ${m.dir} (addcow-mount, pid ${m.pid}): unmount it first`,
    );
    expect(r.stderr.trim().split("\n")).toHaveLength(1);
    expect(fs.existsSync(path.join(dir, "b"))).toBe(false);
    expect(mounted(path.join(dir, "b"))).toBe(false);
  });

  it("refuses a non-empty mount directory, bad options and missing disks with one line", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    const cases: Array<[string[], RegExp]> = [
      [[o.addcow, dir], /is not empty/],
      [["-o", "bogus", o.addcow, path.join(dir, "m1")], /unknown mount option -o bogus/],
      [["-o", "cache=fast", o.addcow, path.join(dir, "m2")], /cache=writeback/],
      [[path.join(dir, "nope.add-cow"), path.join(dir, "m3")], /does not exist/],
      [[o.addcow], /at least one FILE.add-cow and a MOUNTDIR/],
    ];
    for (const [args, pattern] of cases) {
      const r = await run(process.execPath, [MOUNT_BIN, ...args]);
      expect(r.code, args.join(" ")).toBe(1);
      expect(r.stderr).toMatch(pattern);
      expect(r.stderr.trim().split("\n")).toHaveLength(1);
    }
    expect(fs.existsSync(path.join(dir, "m3"))).toBe(false);
  });

  it("ro: read-only file mode, writes refused, image file untouched", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: MiB });
    const imageSum = sha(o.image);
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"), { options: "ro,umask=027" });
    const st = fs.statSync(m.file);
    expect(st.mode & 0o777).toBe(0o440);
    expect(() => fs.openSync(m.file, "r+")).toThrow(/EROFS|EACCES/);
    await sh("cmp", [m.file, o.backing!]);
    // A read-only mount shares the disk with another read-only user.
    const m2 = await mountDisk(o.addcow, path.join(dir, "mnt2"), { options: "ro" });
    await sh("cmp", [m2.file, o.backing!]);
    await m.unmount();
    await m2.unmount();
    expect(sha(o.image)).toBe(imageSum);
  });

  it("several disks in one directory, --name, uid/gid", async () => {
    const dir = tempDir();
    const a = await makeOverlay(dir, "a", { backingBytes: MiB });
    const b = await makeOverlay(dir, "b", { backingBytes: 2 * MiB });
    const m = await mountDisks([a.addcow, b.addcow], path.join(dir, "mnt"), {
      options: "uid=1234,gid=2345",
    });
    expect(fs.readdirSync(m.dir).sort()).toEqual(["a", "b"]);
    expect(fs.statSync(path.join(m.dir, "b")).size).toBe(2 * MiB);
    expect(fs.statSync(path.join(m.dir, "a"))).toMatchObject({ uid: 1234, gid: 2345 });
    await m.unmount();
    const n = await mountDisk(a.addcow, path.join(dir, "mnt"), { name: "vda" });
    expect(fs.readdirSync(n.dir)).toEqual(["vda"]);
    const r = await run(process.execPath, [
      MOUNT_BIN,
      "--name",
      "x",
      a.addcow,
      b.addcow,
      path.join(dir, "m"),
    ]);
    expect(r.stderr).toMatch(/--name applies to a single disk/);
  });
});
