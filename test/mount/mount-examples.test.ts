import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { afterEach } from "vitest";
import * as fs from "node:fs";
import { cleanupAll, makeOverlay, run, tempDir, trackMount } from "../helpers/mount";
import { inNamespace } from "../helpers/namespace";
import { expectOwnRuntime, installCommands, shellPath } from "../helpers/runtime";

afterEach(cleanupAll);

/**
 * An example run the way a user runs it from a shell (a PATH where the
 * machine's node comes first, not npm's), tracing each addcow program's start:
 * the examples run the checkout's addcow on the checkout's Node.js.
 */
async function runExample(script: string, timeoutMs: number) {
  const tmp = tempDir();
  const log = path.join(tmp, "daemons.log");
  const r = await run("bash", [path.join(dir, script)], {
    timeoutMs,
    env: {
      ...process.env,
      TMPDIR: tmp,
      PATH: shellPath(),
      DEBUG: "addcow:cli",
      ADDCOW_MOUNT_LOG: log,
    },
  });
  const started = `${r.stderr}\n${fs.existsSync(log) ? fs.readFileSync(log, "utf8") : ""}`;
  return { ...r, tmp, started };
}

// The runnable examples users copy from, and `npm run demo` (the README's first command).
const dir = path.join(__dirname, "../..", "mount-examples");

function mountsUnder(prefix: string): string[] {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[4] ?? "")
    .filter((p) => p.startsWith(prefix));
}

describe("mount-examples", () => {
  for (const script of [
    "dd-in-and-out.sh",
    "partitioned-disk.sh",
    "qemu.sh",
    "discard-overlay.sh",
  ]) {
    it(`${script} runs to the end and leaves nothing mounted`, async () => {
      const r = await runExample(script, 120_000);
      expect(r.code, r.stdout.slice(-2000) + r.stderr).toBe(0);
      expect(mountsUnder(r.tmp)).toEqual([]);
      expectOwnRuntime(r.started, ["addcow", "addcow-mount"]);
    }, 150_000);
  }

  it("fleet.sh: three overlays on one base over HTTP, the second boots from the shared cache, one streamed to standalone", async () => {
    const r = await runExample("fleet.sh", 240_000);
    expect(r.code, r.stdout.slice(-3000) + r.stderr).toBe(0);
    expect(mountsUnder(r.tmp)).toEqual([]);
    expectOwnRuntime(r.started, ["addcow", "addcow-mount"]);
    expect(r.stdout).toMatch(/vm2 boot: 0 requests to the server/);
    expect(r.stdout).toMatch(/^vm1: vm1$/m);
    expect(r.stdout).toMatch(/^vm2: vm2$/m);
    expect(r.stdout).toMatch(/^base: golden$/m);
    expect(r.stdout).toMatch(/vm3\.raw: vm3 \(standalone\)/);
  }, 300_000);

  it("demo.sh (npm run demo) shows the base unchanged and the overlay's writes persisting", async () => {
    const r = await runExample("demo.sh", 120_000);
    expect(r.code, r.stdout.slice(-2000) + r.stderr).toBe(0);
    expect(mountsUnder(r.tmp)).toEqual([]);
    expectOwnRuntime(r.started, ["addcow", "addcow-mount"]);
    expect(r.stdout).toMatch(/identical to base\.raw/);
    expect(r.stdout).toMatch(/base\.raw: unchanged/);
    expect(r.stdout).toMatch(/overlay's writes persisted/);
  }, 150_000);

  it("addcow-mount@.service: its ExecStart as systemd runs it (bare environment, systemd's PATH) mounts on the checkout's Node.js; SIGTERM unmounts", async () => {
    const tmp = tempDir();
    const o = await makeOverlay(tmp, "vm1", { backingBytes: 4 << 20 });
    const mnt = path.join(tmp, "run/vm1");
    fs.mkdirSync(mnt, { recursive: true });
    trackMount(mnt);
    // The unit's command for addcow-mount@vm1, with this test's directories for its own.
    const unit = fs.readFileSync(path.join(dir, "addcow-mount@.service"), "utf8");
    const exec = /^ExecStart=(.*)$/m
      .exec(unit)![1]!
      .replaceAll("%i", "vm1")
      .replaceAll("/var/lib/addcow", tmp)
      .replaceAll("/run/addcow", path.join(tmp, "run"));
    expect(exec).toMatch(/^addcow-mount /);
    // systemd finds a bare name in its own search path: /usr/local/bin there has the commands
    // .ci/install-commands installs (in this namespace only); /usr/bin/node comes before any other.
    const bin = await installCommands(tmp);
    const r = await inNamespace(
      `mount --bind ${bin} /usr/local/bin
${exec}
daemon=$(pgrep -f "addcow-mount.js .*${mnt} --daemon"-child)
echo "DAEMON-EXE $(readlink /proc/$daemon/exe)"
cmp ${mnt}/vm1 ${o.backing} && echo SAME
kill -TERM $daemon
for i in $(seq 100); do kill -0 $daemon 2>/dev/null || break; sleep 0.1; done
kill -0 $daemon 2>/dev/null && echo STILL-RUNNING
findmnt ${mnt} || echo UNMOUNTED`,
      { env: { PATH: "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" } },
    );
    expect(r.code, r.stderr + r.stdout).toBe(0);
    expect(r.stdout).toContain(`DAEMON-EXE ${fs.realpathSync(process.execPath)}\n`);
    expect(r.stdout).toContain("SAME");
    expect(r.stdout).not.toContain("STILL-RUNNING");
    expect(r.stdout).toContain("UNMOUNTED");
  });
});
