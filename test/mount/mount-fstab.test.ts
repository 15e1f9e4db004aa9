import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { spawn } from "node:child_process";
import {
  MOUNT_BIN,
  cleanupAll,
  makeOverlay,
  mountDisk,
  processAlive,
  run,
  tempDir,
  trackMount,
  waitFor,
} from "../helpers/mount";
import { inNamespace, sbinWithHelper } from "../helpers/namespace";
import { expectOwnRuntime, installCommands } from "../helpers/runtime";

afterEach(cleanupAll);

const DIST = path.resolve(__dirname, "../../dist/src/cli");
const MiB = 1 << 20;

/**
 * Real mount(8), umount and fstab handling in a private mount namespace
 * (helpers/namespace.ts): `over` is bound on `target` (a /usr/sbin with this
 * checkout's mount.fuse.addcow, or a /usr/local/sbin with its addcow), the
 * commands .ci/install-commands puts on the PATH. The script starts with the
 * bare environment systemd gives mount units (its default PATH, where the
 * machine's own node comes first); DEBUG=addcow:cli start lines, the
 * daemons' in ADDCOW_MOUNT_LOG, say which Node.js ran each program. The
 * daemons live in that namespace; cleanupAll finds them by command line.
 */
async function mountScript(prelude: string, script: string, cwd: string) {
  const daemonLog = path.join(cwd, `daemons-${Date.now()}.log`);
  fs.writeFileSync(daemonLog, "");
  const env: NodeJS.ProcessEnv = {
    PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ADDCOW: `${process.execPath} ${path.join(DIST, "addcow.js")}`,
    DEBUG: "addcow:cli",
    ADDCOW_MOUNT_LOG: daemonLog,
  };
  const r = await inNamespace(`${prelude}\n${script}`, { cwd, env, timeoutMs: 90_000 });
  return { ...r, started: `${r.stderr}\n${fs.readFileSync(daemonLog, "utf8")}` };
}

async function withHelper(dir: string): Promise<string> {
  const bin = await installCommands(dir);
  return sbinWithHelper(dir, path.join(bin, "mount.fuse.addcow")).prelude;
}

/** Waits (inside the script) until no daemon serves DIR any more. */
const WAIT_GONE = `wait_gone() { for i in $(seq 100); do pgrep -f "addcow-mount.js .*$1 --daemon-child" >/dev/null || return 0; sleep 0.1; done; echo "daemon for $1 still running" >&2; return 1; }`;

describe("mount(8), umount and fstab", () => {
  it("mount -t fuse.addcow SOURCE DIR -o ro,allow_other through /sbin/mount.fuse.addcow", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "vm1", { backingBytes: 4 * MiB });
    const mnt = path.join(dir, "mnt");
    trackMount(mnt);
    const r = await mountScript(
      await withHelper(dir),
      `${WAIT_GONE}
mount -t fuse.addcow ${o.addcow} ${mnt} -o ro,allow_other
findmnt -n -o SOURCE,FSTYPE,OPTIONS ${mnt}
grep " ${mnt} " /proc/mounts
df --output=source,size,used ${mnt} | tail -1
cmp ${mnt}/vm1 ${o.backing}
if dd if=/dev/zero of=${mnt}/vm1 bs=4k count=1 conv=notrunc 2>/dev/null; then echo WROTE; fi
$ADDCOW info ${o.addcow} 2>&1 || true
umount ${mnt}
# right after umount the daemon is still flushing: addcow waits for it
$ADDCOW info ${o.addcow} >/dev/null && echo INFO-AFTER-UMOUNT-OK
wait_gone ${mnt}
echo DONE`,
      dir,
    );
    expect(r.code, r.stderr + r.stdout).toBe(0);
    const [findmnt, procMounts, df] = r.stdout.split("\n");
    expect(findmnt).toMatch(new RegExp(`^${o.addcow} +fuse\\.addcow +ro,.*allow_other`));
    expect(procMounts).toMatch(new RegExp(`^${o.addcow} ${mnt} fuse\\.addcow ro,`));
    expect(df!.trim()).toMatch(new RegExp(`^${o.addcow} +4096 +\\d+$`));
    expect(r.stdout).not.toContain("WROTE");
    // A read-only mount shares the disk with readers.
    expect(r.stdout).toContain(`image: ${o.addcow}`);
    expect(r.stdout).toContain("INFO-AFTER-UMOUNT-OK");
    expect(r.stdout).toContain("DONE");
    // mount(8) -> mount.fuse.addcow -> addcow-mount -> its background child, all on one Node.js.
    expectOwnRuntime(r.started, ["mount.fuse.addcow", "addcow-mount"]);
    expect(r.started.match(/addcow:cli addcow-mount /g)?.length).toBe(2);
  });

  it("mount -a -T mount-examples/fstab.txt mounts its lines (generic options ignored, noauto skipped); data survives umount", async () => {
    const dir = tempDir();
    const vm1 = await makeOverlay(dir, "vm1", { backingBytes: 4 * MiB });
    const vm2 = await makeOverlay(dir, "vm2", { size: 4 * MiB });
    const mnt1 = path.join(dir, "mnt1");
    const mnt2 = path.join(dir, "mnt2");
    trackMount(mnt1);
    trackMount(mnt2);
    fs.mkdirSync(mnt1);
    fs.mkdirSync(mnt2);
    // The example, with this test's files in place of /var/lib/addcow and /mnt.
    const fstab = path.join(dir, "fstab");
    fs.writeFileSync(
      fstab,
      fs
        .readFileSync(path.join(__dirname, "../../mount-examples/fstab.txt"), "utf8")
        .replaceAll("/var/lib/addcow/vm1.add-cow", vm1.addcow)
        .replaceAll("/var/lib/addcow/vm2.add-cow", vm2.addcow)
        .replaceAll("/mnt/vm1", mnt1)
        .replaceAll("/mnt/vm2", mnt2),
    );
    const r = await mountScript(
      await withHelper(dir),
      `${WAIT_GONE}
mount -a -T ${fstab}
findmnt -n -o SOURCE,TARGET,FSTYPE ${mnt1}
findmnt -n ${mnt2} || echo NOAUTO-NOT-MOUNTED
dd if=/dev/urandom of=${dir}/data bs=64k count=3 status=none
dd if=${dir}/data of=${mnt1}/vm1 bs=64k seek=5 conv=notrunc,fsync status=none
$ADDCOW info ${vm1.addcow} 2>&1 || true
umount ${mnt1}
wait_gone ${mnt1}
mount -T ${fstab} -o ro ${mnt1}
cmp <(dd if=${mnt1}/vm1 bs=64k skip=5 count=3 status=none) ${dir}/data && echo DATA-KEPT
umount ${mnt1}
wait_gone ${mnt1}
# the noauto line, by its mount point: read-only, readable by others
mount -T ${fstab} ${mnt2}
findmnt -n -o OPTIONS ${mnt2}
stat -c %a ${mnt2}/vm2
umount ${mnt2}
wait_gone ${mnt2}
echo DONE`,
      dir,
    );
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout).toContain(`${vm1.addcow} ${mnt1} fuse.addcow`);
    expect(r.stdout).toContain("NOAUTO-NOT-MOUNTED");
    // A mounted disk's lock error names the mount point and what to do.
    expect(r.stdout).toContain(`addcow: ${vm1.addcow} is mounted at ${mnt1} (addcow-mount, pid `);
    expect(r.stdout).toContain(`unmount it first (fusermount -u ${mnt1}); or add -U`);
    expect(r.stdout).toContain("DATA-KEPT");
    expect(r.stdout).toMatch(/^ro,.*allow_other/m);
    expect(r.stdout).toMatch(/^444$/m);
    expect(r.stdout).toContain("DONE");
    expectOwnRuntime(r.started, ["mount.fuse.addcow", "addcow-mount"]);
  });

  it("without /sbin/mount.fuse.addcow, mount.fuse runs `addcow SOURCE DIR -o ...`, which mounts", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "vm1", { backingBytes: 2 * MiB });
    const mnt = path.join(dir, "mnt");
    trackMount(mnt);
    const bin = path.join(dir, "local-sbin");
    fs.mkdirSync(bin);
    fs.symlinkSync(path.join(await installCommands(dir), "addcow"), path.join(bin, "addcow"));
    // A /usr/sbin without any mount.fuse.addcow (the machine's own, if installed, too).
    const { prelude } = sbinWithHelper(dir);
    const r = await mountScript(
      `${prelude}\nmount --bind ${bin} /usr/local/sbin`,
      `${WAIT_GONE}
mount -t fuse.addcow ${o.addcow} ${mnt} -o ro,user
findmnt -n -o SOURCE,FSTYPE ${mnt}
cmp ${mnt}/vm1 ${o.backing} && echo SAME
# The daemon's executable (the pattern split so that it does not match this script).
daemon=$(pgrep -f "addcow-mount.js .*${mnt} --daemon"-child)
echo "DAEMON-EXE $(readlink /proc/$daemon/exe)"
umount ${mnt}
wait_gone ${mnt}`,
      dir,
    );
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout).toContain(`${o.addcow} fuse.addcow`);
    expect(r.stdout).toContain("SAME");
    expect(r.stdout).toContain(`DAEMON-EXE ${fs.realpathSync(process.execPath)}\n`);
    expectOwnRuntime(r.started, ["addcow", "addcow-mount"]);
  });

  it("the helper refuses bad options and a missing source in one line, mounting nothing", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "vm1", { size: MiB });
    const helper = path.join(DIST, "mount-fuse-addcow.js");
    const mnt = path.join(dir, "mnt");
    const bad = await run(process.execPath, [helper, o.addcow, mnt, "-o", "ro,bogus"]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/^mount\.fuse\.addcow: unknown mount option -o bogus[^\n]*\n$/);
    const missing = await run(process.execPath, [helper, path.join(dir, "no.add-cow"), mnt]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/no\.add-cow does not exist/);
    // -f (fake) checks and mounts nothing; -s (sloppy) drops what it does not know.
    const fake = await run(process.execPath, [helper, o.addcow, mnt, "-f", "-s", "-o", "bogus"]);
    expect(fake.code, fake.stderr).toBe(0);
    expect(fs.existsSync(mnt)).toBe(false);
  });
});

describe("addcow-mount -d, -o debug, -o auto_unmount", () => {
  it.each([["-o", "debug"], ["-d"]])(
    "%s %s stays in the foreground and traces every request",
    async (...flag) => {
      const dir = tempDir();
      const o = await makeOverlay(dir, "vm1", { size: MiB });
      const mnt = path.join(dir, "mnt");
      trackMount(mnt);
      const env = { ...process.env };
      delete env.DEBUG;
      const child = spawn(process.execPath, [MOUNT_BIN, ...flag, o.addcow, mnt], { env });
      let stderr = "";
      child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | null>((resolve) => child.on("exit", resolve));
      try {
        await waitFor("the mount", () => fs.existsSync(path.join(mnt, "vm1")));
        fs.readFileSync(path.join(mnt, "vm1"));
        await waitFor("a traced read", () => /addcow:fuse read vm1/.test(stderr));
        // Still this process: it did not go to the background.
        expect(child.exitCode).toBe(null);
        await run("fusermount", ["-u", mnt]);
        expect(await exited).toBe(0);
      } finally {
        if (child.exitCode === null) child.kill("SIGKILL");
      }
    },
  );

  it("the source findmnt shows is the .add-cow file, also with a comma and a space in its path", async () => {
    const dir = tempDir();
    const odd = path.join(dir, "a,b c");
    fs.mkdirSync(odd);
    const o = await makeOverlay(odd, "my vm", { size: MiB });
    const m = await mountDisk(o.addcow, path.join(odd, "mnt x"));
    const r = await run("findmnt", ["-n", "-o", "SOURCE,FSTYPE", m.dir]);
    expect(r.stdout.trim()).toBe(`${o.addcow} fuse.addcow`);
    // ... and a lock error quotes the mount point for the shell when it must.
    const info = await run(process.execPath, [path.join(DIST, "addcow.js"), "info", o.addcow]);
    expect(info.stderr).toContain(
      `is mounted at ${m.dir} (addcow-mount, pid ${m.pid}): unmount it first (fusermount -u '${m.dir}')`,
    );
    await m.unmount();
  });

  it("-o auto_unmount: the mount goes away when the daemon is killed", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "vm1", { size: MiB });
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"), { options: "auto_unmount" });
    await m.kill("SIGKILL");
    await waitFor("the mount to disappear", () => {
      const table = fs.readFileSync("/proc/self/mountinfo", "utf8");
      return !table.includes(` ${m.dir} `);
    });
    expect(processAlive(m.pid)).toBe(false);
  });
});
