/**
 * The mount daemon keeps acknowledged writes and says what went wrong where
 * people look: a lazy unmount keeps serving open files; a failed data sync is
 * announced once, loudly, in syslog; a final flush that fails is retried, then
 * the daemon exits 1; a mount directory that cannot be made and a control
 * socket directory that is not the user's own are refused with one line.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  bitAfterRemountWrite,
  bitOnDisk as bitAt,
  mountWithFaults,
  syscall,
} from "../helpers/faulty-mount";
import { ADDCOW, stderrLines } from "../helpers/cli";
import {
  MOUNT_BIN,
  cleanupAll,
  makeOverlay,
  mountDisk,
  processAlive,
  run,
  sh,
  spawnTracked,
  tempDir,
  trackMount,
  waitFor,
} from "../helpers/mount";
import { blocksDiffering, pattern } from "../helpers/pattern";

afterEach(cleanupAll);

const CS = 64 * 1024;
const SIZE = 16 << 20;

function mountedAt(dir: string): boolean {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .some((l) => l.split(" ")[4] === dir);
}

const bitOnDisk = (addcow: string, c: number) => bitAt(addcow, c, CS);
const mountFaulty = (opts: { options?: string; foreground?: boolean }) =>
  mountWithFaults({ clusterSize: CS, backingBytes: SIZE, ...opts });

/**
 * A syslog receiver of the test's own: a unix datagram socket (as /dev/log is)
 * whose messages are appended to a file. The daemon is pointed at it with the
 * documented -o log=syslog:SOCKET.
 */
async function syslogReceiver(dir: string): Promise<{ socket: string; messages(): string[] }> {
  const socket = path.join(dir, "log.sock");
  const out = path.join(dir, "syslog.txt");
  const script = [
    "import socket, sys",
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)",
    "s.bind(sys.argv[1])",
    "while True:",
    "    data = s.recv(65536)",
    "    with open(sys.argv[2], 'ab') as f:",
    "        f.write(data.rstrip(b'\\n') + b'\\n')",
  ].join("\n");
  spawnTracked("python3", ["-c", script, socket, out]);
  await waitFor("the syslog receiver", () => fs.existsSync(socket));
  return {
    socket,
    messages: () => (fs.existsSync(out) ? fs.readFileSync(out, "utf8").split("\n") : []),
  };
}

describe("a lazy unmount while a writer holds the file open", () => {
  it("keeps serving it; every write is there after a remount; the daemon exits after the last close", async () => {
    const dir = tempDir("addcow-safety-");
    const disk = await makeOverlay(dir, "disk", { backingBytes: SIZE, clusterSize: CS });
    const mnt = path.join(dir, "mnt");
    const m = await mountDisk(disk.addcow, mnt);
    const block = (i: number) => pattern(CS, 500 + i);
    const fd = fs.openSync(m.file, "r+");
    let closedAt = 0;
    try {
      fs.writeSync(fd, block(0), 0, CS, 0);
      await sh("fusermount", ["-uz", mnt]);
      expect(mountedAt(mnt)).toBe(false);
      // The daemon notices within a poll; the file must keep working well after that.
      await new Promise((r) => setTimeout(r, 600));
      for (let i = 1; i < 40; i++) expect(fs.writeSync(fd, block(i), 0, CS, i * CS)).toBe(CS);
      fs.fdatasyncSync(fd);
      const back = Buffer.alloc(CS);
      fs.readSync(fd, back, 0, CS, 7 * CS);
      expect(back.equals(block(7))).toBe(true);
      expect(processAlive(m.pid)).toBe(true);
    } finally {
      fs.closeSync(fd);
      closedAt = Date.now();
    }
    await waitFor(`daemon ${m.pid} to exit after the last close`, () => !processAlive(m.pid), 5000);
    console.log(`daemon exited ${Date.now() - closedAt} ms after the last close`);

    const again = await mountDisk(disk.addcow, mnt, { options: "ro" });
    const all = Array.from({ length: 40 }, (_, i) => i);
    expect(blocksDiffering(again.file, all, CS, block)).toEqual([]);
    await again.unmount();
  });
});

describe("failed flushes in the mount daemon", () => {
  it("a failed data sync is said once, loudly, in syslog; fsync fails until remount; exit status 1", async () => {
    const dir = tempDir("addcow-safety-");
    const syslog = await syslogReceiver(dir);
    const s = await mountFaulty({ options: `log=syslog:${syslog.socket}`, foreground: true });
    const fd = fs.openSync(s.m.file, "r+");
    try {
      fs.writeSync(fd, Buffer.alloc(CS, 0x61), 0, CS, 3 * CS);
      s.setFaults([{ file: "disk.raw", op: "sync", code: "EIO", times: 1 }]);
      expect(syscall(() => fs.fdatasyncSync(fd))).toBe("EIO");
      s.setFaults([]);
      // The fault is gone, but the kernel may have dropped those pages: every fsync fails.
      expect(syscall(() => fs.fdatasyncSync(fd))).toBe("EIO");
      fs.writeSync(fd, Buffer.alloc(CS, 0x62), 0, CS, 4 * CS);
      expect(syscall(() => fs.fdatasyncSync(fd))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 3)).toBe(0);
      expect(processAlive(s.m.pid)).toBe(true);
    } finally {
      syscall(() => fs.closeSync(fd));
    }
    await sh("fusermount", ["-u", s.m.dir]);
    expect(await s.m.exited).toBe(1);
    await waitFor("the messages in syslog", () =>
      syslog.messages().some((l) => /stopped .* with errors/.test(l)),
    );
    const lines = syslog.messages();
    const failed = lines.filter((l) => l.includes("DISK FAILED"));
    expect(failed).toHaveLength(1);
    expect(failed[0]).toMatch(
      new RegExp(`addcow-mount\\[${s.m.pid}\\]: DISK FAILED: .*disk\\.add-cow`),
    );
    expect(failed[0]).toMatch(/fsync now fails/);
    expect(s.m.stderr!()).toMatch(/DISK FAILED/);
    // Reopened, the disk works again.
    expect(await bitAfterRemountWrite(s, 3, CS, CS)).toBe(1);
  });

  it("bits whose write-back failed are written by a later periodic write-back; said once, not every round", async () => {
    const s = await mountFaulty({ foreground: true });
    s.setFaults([{ file: "disk.add-cow", op: "write", code: "ENOSPC" }]);
    const fd = fs.openSync(s.m.file, "r+");
    try {
      fs.writeSync(fd, Buffer.alloc(CS, 0x74), 0, CS, 9 * CS);
      // The 5 s write-back fails, then fails again; the message is said once.
      await waitFor("a failed write-back", () => /write-back of .* failed/.test(s.m.stderr!()));
      await new Promise((r) => setTimeout(r, 5500));
      expect(bitOnDisk(s.addcow, 9)).toBe(0);
      s.setFaults([]);
      await waitFor("the bit on disk", () => bitOnDisk(s.addcow, 9) === 1, 12_000);
    } finally {
      fs.closeSync(fd);
    }
    await waitFor("the all-clear", () => /write-back of .* works again/.test(s.m.stderr!()));
    expect(s.m.stderr!().match(/periodic write-back of .* failed/g)).toHaveLength(1);
    await sh("fusermount", ["-u", s.m.dir]);
    expect(await s.m.exited).toBe(0);
  }, 40_000);

  it("a final flush that fails is retried, and succeeds once the fault is gone", async () => {
    const s = await mountFaulty({ foreground: true });
    const fd = fs.openSync(s.m.file, "r+");
    fs.writeSync(fd, Buffer.alloc(CS, 0x71), 0, CS, 5 * CS);
    fs.closeSync(fd); // the close's flush writes the bit
    expect(bitOnDisk(s.addcow, 5)).toBe(1);
    // A new bit that cannot be written: the .add-cow file's write fails until the fault goes.
    s.setFaults([{ file: "disk.add-cow", op: "write", code: "ENOSPC" }]);
    const fd2 = fs.openSync(s.m.file, "r+");
    fs.writeSync(fd2, Buffer.alloc(CS, 0x72), 0, CS, 6 * CS);
    expect(syscall(() => fs.closeSync(fd2))).toBe("ENOSPC");
    await sh("fusermount", ["-u", s.m.dir]);
    await waitFor("a retry", () => /retrying for up to 10 s/.test(s.m.stderr!()));
    expect(processAlive(s.m.pid)).toBe(true);
    s.setFaults([]);
    expect(await s.m.exited).toBe(0);
    expect(bitOnDisk(s.addcow, 6)).toBe(1);
    expect(s.m.stderr!()).toMatch(/worked on attempt/);
  });

  it("a final flush that keeps failing makes the daemon give up after 10 s and exit 1", async () => {
    const s = await mountFaulty({ foreground: true });
    s.setFaults([{ file: "disk.add-cow", op: "sync", code: "EIO" }]);
    const fd = fs.openSync(s.m.file, "r+");
    fs.writeSync(fd, Buffer.alloc(CS, 0x73), 0, CS, 7 * CS);
    expect(syscall(() => fs.closeSync(fd))).toBe("EIO");
    const started = Date.now();
    await sh("fusermount", ["-u", s.m.dir]);
    expect(await s.m.exited).toBe(1);
    expect(Date.now() - started).toBeGreaterThanOrEqual(9000);
    expect(s.m.stderr!()).toMatch(/before unmount failed for 10 s, giving up: .*EIO/);
  }, 30_000);
});

describe("refused at once with one line", () => {
  it("a mount directory that cannot be created (under /proc)", async () => {
    const dir = tempDir("addcow-safety-");
    const disk = await makeOverlay(dir, "disk", { size: SIZE });
    const mnt = `/proc/addcow-no-such-dir-${process.pid}/mnt`;
    trackMount(mnt);
    const r = await run(process.execPath, [MOUNT_BIN, "-f", disk.addcow, mnt], {
      timeoutMs: 10_000,
    });
    expect(r.code).toBe(1);
    const lines = r.stderr.split("\n").filter((l) => l !== "");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/cannot create mount directory \/proc\/addcow-no-such-dir/);
  });

  it("a control socket directory that is not the user's own (as user nobody)", async () => {
    const tmp = tempDir("addcow-safety-");
    fs.chmodSync(tmp, 0o755);
    const nobody = 65534;
    const dir = path.join(tmp, `addcow-${nobody}`);
    const asNobody = () =>
      run("setpriv", [
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        "env",
        "-u",
        "XDG_RUNTIME_DIR",
        "-u",
        "ADDCOW_RUNTIME_DIR",
        "-u",
        "DEBUG",
        `TMPDIR=${tmp}`,
        process.execPath,
        ADDCOW,
        "jobs",
      ]);
    // Made first by another user (root here), open to everyone.
    fs.mkdirSync(dir, { mode: 0o777 });
    fs.chmodSync(dir, 0o777);
    let r = await asNobody();
    expect(r.code).toBe(1);
    expect(stderrLines({ ...r })).toHaveLength(1);
    expect(r.stderr).toMatch(/control socket directory .*addcow-65534 belongs to user 0/);
    // The user's own, but writable by others.
    fs.chownSync(dir, nobody, nobody);
    r = await asNobody();
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/is writable by other users \(mode 777\)/);
    // The user's own, 0700: fine.
    fs.chmodSync(dir, 0o700);
    r = await asNobody();
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
  });
});
