/**
 * Host daemons (addcow-mount --serve NAME): one process serving many mounts,
 * attached at run time with `addcow-mount -o host=NAME`. Each mount must
 * behave like a daemon of its own: unmounting one detaches only it, live
 * jobs reach its disk, one disk's failure leaves the others alone, and
 * nothing is left behind.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  MOUNT_BIN,
  cleanupAll,
  deferCleanup,
  makeOverlay,
  processAlive,
  run,
  sh,
  tempDir,
  trackMount,
  waitFor,
  writePatternFile,
} from "../helpers/mount";
import { FAULTY_MOUNT, syscall } from "../helpers/faulty-mount";
import { servedBase } from "../helpers/remote-servers";
import type { FaultRule } from "../helpers/fault-io";
import type { HelloResponse } from "../../src/control/protocol";

afterEach(cleanupAll);

const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");
const MiB = 1 << 20;

interface Host {
  name: string;
  pid: number;
  env: NodeJS.ProcessEnv;
  runtimeDir: string;
  setFaults(rules: FaultRule[]): void;
  attach(file: string, dir: string, options?: string): Promise<void>;
  /** The mount directories the host reports serving (hello on its socket). */
  mounts(): Promise<string[]>;
}

function pidOfHost(name: string): number | null {
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const args = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0");
      if (args.includes("--serve") && args.includes(name) && processAlive(Number(entry))) {
        return Number(entry);
      }
    } catch {
      // Gone meanwhile.
    }
  }
  return null;
}

/** A host daemon started like a user would (background), through the fault-injecting launcher. */
async function startHost(dir: string, extraEnv: NodeJS.ProcessEnv = {}): Promise<Host> {
  const name = `test-${process.pid}-${path.basename(dir)}`;
  const runtimeDir = path.join(dir, "run");
  const control = path.join(dir, "faults.json");
  const setFaults = (rules: FaultRule[]) => {
    fs.writeFileSync(control + ".tmp", JSON.stringify(rules));
    fs.renameSync(control + ".tmp", control);
  };
  setFaults([]);
  const env = {
    ...process.env,
    ADDCOW_RUNTIME_DIR: runtimeDir,
    ADDCOW_CACHE_DIR: "none",
    ADDCOW_TEST_FAULTS: control,
    ...extraEnv,
  };
  // Stopped after the mounts are gone (cleanupAll unmounts tracked mounts first).
  deferCleanup(async () => {
    const pid = pidOfHost(name);
    if (pid === null) return;
    process.kill(pid, "SIGTERM");
    try {
      await waitFor(`host ${name} to stop`, () => !processAlive(pid), 20_000);
    } catch {
      process.kill(pid, "SIGKILL");
    }
  });
  const r = await run(process.execPath, [FAULTY_MOUNT, "--serve", name, "-o", "log=stderr"], {
    env,
  });
  expect(r.code, r.stderr).toBe(0);
  const pid = pidOfHost(name);
  expect(pid).not.toBeNull();
  return {
    name,
    pid: pid!,
    env,
    runtimeDir,
    setFaults,
    async attach(file, mnt, options) {
      trackMount(mnt);
      const o = options ? `host=${name},${options}` : `host=${name}`;
      await sh(process.execPath, [MOUNT_BIN, "-o", o, file, mnt], { env });
    },
    async mounts() {
      const { ControlClient } = await import("../../src/control/client");
      const client = new ControlClient(path.join(runtimeDir, `host-${name}.ctl`));
      const hello = await client.call<HelloResponse>({ op: "hello" });
      return (hello.host?.mounts ?? []).map((m) => m.mountDir).sort();
    },
  };
}

function mountedAt(dir: string): boolean {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .some((l) => l.split(" ")[4] === dir);
}

/** The first `bytes` of a mounted disk, read with dd (a process of its own, O_DIRECT). */
async function head(file: string, bytes: number): Promise<Buffer> {
  const out = `${file.replace(/\//g, "_")}.head`;
  const copy = path.join(tempDir(), out);
  await sh("dd", [`if=${file}`, `of=${copy}`, "bs=64K", `count=${bytes / 65536}`, "iflag=direct"]);
  return fs.readFileSync(copy);
}

describe("host daemon: many mounts in one process", () => {
  it("attaches and detaches at run time; an unmounted disk, a live job and a failed disk leave the others serving", async () => {
    const dir = tempDir("addcow-host-");
    const base = path.join(dir, "base.raw");
    writePatternFile(base, 8 * MiB, 3);
    const baseBytes = fs.readFileSync(base);
    const host = await startHost(dir);
    const N = 10;
    const disk = (i: number) => path.join(dir, `vm${i}.add-cow`);
    const mnt = (i: number) => path.join(dir, `mnt${i}`);
    const file = (i: number) => path.join(mnt(i), `vm${i}`);
    for (let i = 0; i < N; i++) {
      await makeOverlay(dir, `vm${i}`, { backing: base, clusterSize: 65536 });
      await host.attach(disk(i), mnt(i), i === 9 ? "ro" : undefined);
    }
    expect(await host.mounts()).toEqual([...Array(N).keys()].map(mnt).sort());
    // Each is a mount of its own: its .add-cow file as the source, its own options.
    const table = await sh("findmnt", ["-rn", "-t", "fuse.addcow", "-o", "TARGET,SOURCE,OPTIONS"]);
    for (let i = 0; i < N; i++) {
      const line = table.stdout.split("\n").find((l) => l.startsWith(mnt(i) + " "));
      expect(line, mnt(i)).toContain(` ${disk(i)} `);
      expect(line!.split(" ")[2]!.startsWith(i === 9 ? "ro," : "rw,")).toBe(true);
    }
    // Every disk reads as the base; each gets data of its own.
    for (let i = 0; i < N; i++) {
      expect((await head(file(i), MiB)).equals(baseBytes.subarray(0, MiB)), file(i)).toBe(true);
    }
    const own = (i: number) => Buffer.alloc(65536, 0x40 + i);
    for (let i = 0; i < 9; i++) {
      fs.writeFileSync(path.join(dir, `own${i}`), own(i));
      await sh("dd", [
        `if=${path.join(dir, `own${i}`)}`,
        `of=${file(i)}`,
        "bs=64K",
        "seek=2",
        "conv=notrunc,fsync",
      ]);
    }
    expect(syscall(() => fs.openSync(file(9), "r+"))).toBe("EROFS");

    // fusermount -u of one: only that disk is flushed and detached; its lock is released.
    await sh("fusermount", ["-u", mnt(3)]);
    await waitFor("the host to let go of vm3", async () => !(await host.mounts()).includes(mnt(3)));
    // Its control socket went with it: the host's own and the nine others' remain.
    expect(fs.readdirSync(host.runtimeDir).filter((n) => n.endsWith(".ctl")).length).toBe(N);
    const info = await sh(process.execPath, [ADDCOW, "map", "--json", disk(3)], { env: host.env });
    const extents = JSON.parse(info.stdout) as Array<{ start: number; source: string }>;
    expect(extents.find((e) => e.start === 2 * 65536)?.source).toBe("image");
    for (const i of [0, 4, 8]) {
      expect((await head(file(i), 4 * 65536)).subarray(2 * 65536, 3 * 65536).equals(own(i))).toBe(
        true,
      );
    }
    // Attached again at run time.
    await host.attach(disk(3), mnt(3));
    expect((await head(file(3), 4 * 65536)).subarray(2 * 65536, 3 * 65536).equals(own(3))).toBe(
      true,
    );

    // A live job on one disk, found through the disk's own control socket.
    const stream = await sh(process.execPath, [ADDCOW, "stream", "--json", disk(5)], {
      env: host.env,
    });
    expect(stream.stdout).toContain('"state":"completed"');
    const jobs = await sh(process.execPath, [ADDCOW, "jobs", "--json"], { env: host.env });
    expect(JSON.parse(jobs.stdout)).toEqual([
      expect.objectContaining({ kind: "stream", state: "completed", pid: host.pid }),
    ]);
    expect(
      (await head(file(5), MiB)).subarray(0, 2 * 65536).equals(baseBytes.subarray(0, 2 * 65536)),
    ).toBe(true);

    // One disk's failed data sync: its fsyncs fail from then on; the others' work; the host serves on.
    host.setFaults([{ file: "vm7.raw", op: "sync", code: "EIO", times: 1 }]);
    const fd7 = fs.openSync(file(7), "r+");
    try {
      fs.writeSync(fd7, Buffer.alloc(4096, 0x99), 0, 4096, 6 * 65536);
      expect(syscall(() => fs.fdatasyncSync(fd7))).toBe("EIO");
      expect(syscall(() => fs.fdatasyncSync(fd7))).toBe("EIO");
    } finally {
      syscall(() => fs.closeSync(fd7));
    }
    await sh("dd", [
      `if=${path.join(dir, "own8")}`,
      `of=${file(8)}`,
      "bs=64K",
      "seek=5",
      "conv=notrunc,fsync",
    ]);
    // Reads go on (a close reports the failure, as every fsync does).
    const fd = fs.openSync(file(7), "r");
    const got = Buffer.alloc(65536);
    fs.readSync(fd, got, 0, got.length, 0);
    expect(syscall(() => fs.closeSync(fd))).toBe("EIO");
    expect(got.equals(baseBytes.subarray(0, 65536))).toBe(true);
    expect(processAlive(host.pid)).toBe(true);
    expect((await host.mounts()).length).toBe(N);

    // SIGTERM: every mount flushed and unmounted, every socket gone, the process gone.
    process.kill(host.pid, "SIGTERM");
    await waitFor("the host to stop", () => !processAlive(host.pid), 30_000);
    for (let i = 0; i < N; i++) expect(mountedAt(mnt(i)), mnt(i)).toBe(false);
    expect(fs.readdirSync(host.runtimeDir).filter((n) => n.endsWith(".ctl"))).toEqual([]);
    // What was fsynced is on disk (vm8's second write), and vm7 kept its acknowledged base reads.
    const m8 = await sh(process.execPath, [ADDCOW, "map", "--json", disk(8)], { env: host.env });
    const e8 = JSON.parse(m8.stdout) as Array<{ start: number; length: number; source: string }>;
    expect(
      e8.some(
        (e) => e.source === "image" && e.start <= 5 * 65536 && e.start + e.length > 5 * 65536,
      ),
    ).toBe(true);
  });

  it("refuses what a direct mount refuses, in one line, and a second host of the same name", async () => {
    const dir = tempDir("addcow-host-");
    const host = await startHost(dir);
    await makeOverlay(dir, "a", { backingBytes: MiB });
    const bad = await run(
      process.execPath,
      [MOUNT_BIN, "-o", `host=${host.name},cache=fast`, `${dir}/a.add-cow`, `${dir}/m`],
      {
        env: host.env,
      },
    );
    expect(bad.code).toBe(1);
    expect(bad.stderr.trim().split("\n")).toEqual([
      expect.stringMatching(/^addcow-mount: invalid -o cache=fast/),
    ]);
    trackMount(`${dir}/m`);
    const missing = await run(
      process.execPath,
      [MOUNT_BIN, "-o", `host=${host.name}`, `${dir}/nope.add-cow`, `${dir}/m`],
      {
        env: host.env,
      },
    );
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/nope\.add-cow does not exist/);
    expect(mountedAt(`${dir}/m`)).toBe(false);
    expect(fs.existsSync(`${dir}/m`)).toBe(false);
    const again = await run(process.execPath, [MOUNT_BIN, "--serve", host.name], { env: host.env });
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/is already running \(pid \d+\)/);
    const none = await run(
      process.execPath,
      [MOUNT_BIN, "-o", "host=nobody-here", `${dir}/a.add-cow`, `${dir}/m`],
      {
        env: host.env,
      },
    );
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/no host daemon nobody-here is running/);
    // A disk served by the host is locked as any mount: a second mount says where it is.
    await host.attach(`${dir}/a.add-cow`, `${dir}/m`);
    const twice = await run(process.execPath, [MOUNT_BIN, `${dir}/a.add-cow`, `${dir}/m2`], {
      env: host.env,
    });
    trackMount(`${dir}/m2`);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toMatch(/is mounted at .*\/m \(addcow-mount, pid \d+\): unmount it first/);
  });

  it("overlays of one remote base share its device: each block is fetched once", async () => {
    const { dir, base, nginx, url } = await servedBase(4 * MiB, 9);
    const baseBytes = fs.readFileSync(base);
    const host = await startHost(dir, { ADDCOW_REMOTE_READAHEAD: "0" });
    for (let i = 0; i < 3; i++) {
      const file = path.join(dir, `r${i}.add-cow`);
      await sh(process.execPath, [ADDCOW, "create", "-q", "-b", url, "-F", "raw", file], {
        env: host.env,
      });
      await host.attach(file, path.join(dir, `rm${i}`));
    }
    const fetches = () => nginx.requests().filter((l) => !l.includes('"bytes=0-0"')).length;
    const before = fetches();
    const first = await head(path.join(dir, "rm0", "r0"), MiB);
    expect(first.equals(baseBytes.subarray(0, MiB))).toBe(true);
    const byFirst = fetches() - before;
    expect(byFirst).toBeGreaterThan(0);
    for (let i = 1; i < 3; i++) {
      const got = await head(path.join(dir, `rm${i}`, `r${i}`), MiB);
      expect(got.equals(baseBytes.subarray(0, MiB))).toBe(true);
    }
    // The first disk's reads fetched the first MiB; the other two read it from the shared memory.
    expect(fetches() - before).toBe(byFirst);
  });
});
