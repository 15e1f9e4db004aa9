import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  cleanupAll,
  daemonPid,
  processAlive,
  run,
  tempDir,
  trackMount,
  waitFor,
  writePatternFile,
} from "../helpers/mount";
import { startS3 } from "../helpers/remote-servers";

afterEach(cleanupAll);

const DIST = path.resolve(__dirname, "../../dist/src/cli");
const MiB = 1 << 20;

/**
 * No command prints what it does not mean to: no runtime warnings (Node's
 * deprecation or experimental warnings, the AWS SDK's NodeVersionSupportWarning,
 * a library's console output) on stderr, in the foreground or from a
 * background daemon (its stderr goes to ADDCOW_MOUNT_LOG here). Each command
 * runs on the tests' Node.js with an environment free of NODE_OPTIONS and
 * DEBUG; every stderr line must match what that command is expected to say.
 */
class Session {
  readonly unexpected: string[] = [];
  readonly env: NodeJS.ProcessEnv;

  constructor(
    readonly dir: string,
    env: NodeJS.ProcessEnv = {},
  ) {
    const clean: NodeJS.ProcessEnv = { ...process.env, ...env };
    for (const k of Object.keys(clean)) {
      if (k.startsWith("NODE_") || k === "DEBUG" || k.startsWith("AWS_SDK_JS")) delete clean[k];
    }
    // Control sockets of this test's own: `addcow jobs` asks every daemon it finds there.
    this.env = {
      ...clean,
      ADDCOW_MOUNT_LOG: path.join(dir, "daemons.log"),
      ADDCOW_RUNTIME_DIR: path.join(dir, "run"),
    };
  }

  /** Runs a program of dist/src/cli; `expected` are the stderr lines it may print. */
  async cli(program: string, args: string[], expected: RegExp[] = [], code = 0) {
    const r = await run(process.execPath, [path.join(DIST, `${program}.js`), ...args], {
      cwd: this.dir,
      env: this.env,
      timeoutMs: 120_000,
    });
    const what = `${program} ${args.join(" ")}`;
    expect(r.code, `${what}: ${r.stderr}`).toBe(code);
    this.judge(what, r.stderr, expected);
    return r;
  }

  /** A command that is not addcow's, in the same environment (dd, cmp, fusermount). */
  async sh(script: string) {
    const r = await run("bash", ["-euo", "pipefail", "-c", script], {
      cwd: this.dir,
      env: this.env,
    });
    expect(r.code, `${script}: ${r.stderr}`).toBe(0);
  }

  async mountAndUnmount(file: string, name: string, compareWith?: string) {
    const mnt = path.join(this.dir, `mnt-${name}`);
    trackMount(mnt);
    await this.cli("addcow-mount", [file, mnt]);
    const pid = daemonPid(mnt);
    expect(pid).not.toBe(null);
    await this.sh(`dd if=${mnt}/${name} of=/dev/null bs=1M status=none`);
    if (compareWith) await this.sh(`cmp ${mnt}/${name} ${compareWith}`);
    await this.sh(`fusermount -u ${mnt}`);
    await waitFor("the daemon to exit", () => !processAlive(pid!));
  }

  /** The background daemons' stderr, judged at the end. */
  finish(): string[] {
    const log = this.env.ADDCOW_MOUNT_LOG!;
    if (fs.existsSync(log)) this.judge("background daemons", fs.readFileSync(log, "utf8"), []);
    return this.unexpected;
  }

  private judge(what: string, stderr: string, expected: RegExp[]) {
    for (const line of stderr.split("\n")) {
      if (line.trim() === "" || expected.some((re) => re.test(line))) continue;
      this.unexpected.push(`${what}: ${line}`);
    }
  }
}

/** What a block job prints on stderr when not on a terminal: progress lines, where it runs. */
const JOB = [
  /^(stream|commit|rebase) \S+: \d+% \(/,
  /^\S+ is mounted: job \S+ runs in daemon pid \d+$/,
];

describe("no runtime warnings", () => {
  it("every addcow command over a raw base, addcow-mount, mount.fuse.addcow and a qcow2 base (zlib, zstd) print nothing unexpected on stderr", async () => {
    const dir = tempDir("addcow-warn-");
    const s = new Session(dir);
    writePatternFile(path.join(dir, "base.raw"), 4 * MiB, 3);
    writePatternFile(path.join(dir, "base2.raw"), 4 * MiB, 4);
    await s.cli("addcow", ["--version"]);
    await s.cli("addcow", ["--help"]);
    await s.cli("addcow", ["create", "-b", "base.raw", "-F", "raw", "disk.add-cow"]);
    await s.cli("addcow", ["info", "disk.add-cow"]);
    await s.cli("addcow", ["info", "--json", "--backing-chain", "disk.add-cow"]);
    await s.cli("addcow", ["map", "--json", "disk.add-cow"]);
    await s.cli("addcow", ["check", "disk.add-cow"]);
    await s.cli("addcow", ["resize", "disk.add-cow", "+1M"]);
    await s.cli("addcow", ["snapshot", "disk.add-cow", "snap.add-cow"]);
    await s.cli("addcow", ["commit", "snap.add-cow"], JOB);
    await s.cli("addcow", ["rebase", "-b", "base2.raw", "-F", "raw", "disk.add-cow"], JOB);
    await s.cli("addcow", ["stream", "disk.add-cow"], JOB);
    await s.cli("addcow", ["jobs"]);
    // A refusal is one line saying what is wrong, and nothing more.
    await s.cli("addcow", ["info", "missing.add-cow"], [/^addcow: .*missing\.add-cow/], 1);
    await s.cli("addcow-mount", ["--version"]);
    await s.cli("addcow-mount", ["--help"]);

    // Mounted: jobs run inside the daemon, the commands talk to it.
    await s.cli("addcow", ["create", "-b", "base.raw", "-F", "raw", "live.add-cow"]);
    const mnt = path.join(dir, "mnt");
    trackMount(mnt);
    await s.cli("addcow-mount", ["live.add-cow", mnt]);
    const pid = daemonPid(mnt)!;
    await s.sh(`dd if=/dev/urandom of=${mnt}/live bs=64k count=4 conv=notrunc,fsync status=none`);
    await s.cli("addcow", ["jobs", "--json"]);
    await s.cli("addcow", ["stream", "live.add-cow"], JOB);
    await s.cli("addcow", ["info", "-U", "live.add-cow"]);
    await s.sh(`fusermount -u ${mnt}`);
    await waitFor("the daemon to exit", () => !processAlive(pid));

    // The mount(8) helper, called as mount(8) calls it.
    await s.cli("addcow", ["create", "-b", "base.raw", "-F", "raw", "helper.add-cow"]);
    const ro = path.join(dir, "ro");
    trackMount(ro);
    await s.cli("mount-fuse-addcow", [path.join(dir, "helper.add-cow"), ro, "-o", "ro,nofail"]);
    await s.sh(`cmp ${ro}/helper base.raw && fusermount -u ${ro}`);

    // Compressed qcow2 bases: zlib and zstd clusters go through node:zlib.
    for (const type of ["zlib", "zstd"]) {
      await s.sh(
        `qemu-img convert -c -f raw -O qcow2 -o compression_type=${type} base.raw ${type}.qcow2`,
      );
      await s.cli("addcow", [
        "create",
        "-b",
        `${type}.qcow2`,
        "-F",
        "qcow2",
        `over-${type}.add-cow`,
      ]);
      await s.cli("addcow", ["map", "--json", `over-${type}.add-cow`]);
      await s.mountAndUnmount(`over-${type}.add-cow`, `over-${type}`, "base.raw");
    }
    expect(s.finish()).toEqual([]);
  }, 240_000);

  it("over an S3 base (s3rver): create, info, map, check, mount, read, unmount print nothing unexpected on stderr", async () => {
    const dir = tempDir("addcow-warn-s3-");
    writePatternFile(path.join(dir, "base.raw"), 4 * MiB, 5);
    const s3 = await startS3(path.join(dir, "s3"), ["images"]);
    await s3.put("images", "base.raw", path.join(dir, "base.raw"));
    const s = new Session(dir, { ...s3.env, ADDCOW_CACHE_DIR: path.join(dir, "cache") });
    const url = "s3://images/base.raw";
    await s.cli("addcow", ["create", "-b", url, "-F", "raw", "vm.add-cow"]);
    await s.cli("addcow", ["info", "--backing-chain", "vm.add-cow"]);
    await s.cli("addcow", ["map", "--json", "vm.add-cow"]);
    await s.cli("addcow", ["check", "vm.add-cow"]);
    await s.mountAndUnmount("vm.add-cow", "vm", "base.raw");
    expect(s.finish()).toEqual([]);
  }, 120_000);
});
