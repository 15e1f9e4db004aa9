/**
 * The hostile file sets of test/helpers/hostile-cases.ts through the commands,
 * as a user runs them (node dist/src/cli/*.js): `addcow info`, `map`, `check`
 * and `addcow-mount`. Each must exit 1 (check: 2 for findings) with one line on
 * stderr and no stack trace, change no file and leave no mount or daemon. Then
 * command-line mistakes: missing arguments, unknown options, bad sizes, bad
 * mount directories.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, afterEach, describe, expect, it } from "vitest";
import { diffTrees, snapshotTree, writeDisk, writeRaw } from "../helpers/bad-files";
import { hostileCases, releaseImmutable } from "../helpers/hostile-cases";
import {
  type RunResult,
  cleanupAll,
  daemonPid,
  mountDisk,
  processAlive,
  run,
  tempDir,
  waitFor,
} from "../helpers/mount";

const CLI_DIR = path.resolve(__dirname, "../../dist/src/cli");
const ADDCOW = path.join(CLI_DIR, "addcow.js");
const MOUNT = path.join(CLI_DIR, "addcow-mount.js");

const env = { ...process.env };
delete env.DEBUG;

afterAll(async () => {
  releaseImmutable();
  await cleanupAll();
});

function cli(bin: string, args: string[], opts: { asNobody?: boolean } = {}): Promise<RunResult> {
  if (opts.asNobody) {
    return run(
      "setpriv",
      ["--reuid=65534", "--regid=65534", "--clear-groups", process.execPath, bin, ...args],
      { env, timeoutMs: 60_000 },
    );
  }
  return run(process.execPath, [bin, ...args], { env, timeoutMs: 60_000 });
}

function mountedAt(dir: string): boolean {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .some((line) => line.split(" ")[4] === dir);
}

/**
 * Leaves nothing behind even when an assertion failed after a mount succeeded.
 * Returns true when something was left: a mount, or a daemon still alive after
 * a grace period (a daemon child that reported its error may take a moment to exit).
 */
async function ensureUnmounted(dir: string): Promise<boolean> {
  const mounted = mountedAt(dir);
  if (mounted) await run("fusermount", ["-uz", dir]);
  const pid = daemonPid(dir);
  if (pid === null) return mounted;
  try {
    await waitFor(`daemon ${pid} to exit`, () => !processAlive(pid), 5000);
    return mounted;
  } catch {
    process.kill(pid, "SIGKILL");
    await waitFor(`daemon ${pid} to exit`, () => !processAlive(pid), 5000);
    return true;
  }
}

/** One line on stderr, "<prog>: message", exit 1, no stack trace; returns the message. */
function expectOneLineError(r: RunResult, prog: string, code = 1): string {
  const what = `${prog} exit ${r.code}, stderr: ${r.stderr}`;
  expect(r.code, what).toBe(code);
  const lines = r.stderr.replace(/\n$/, "").split("\n");
  expect(lines, what).toHaveLength(1);
  expect(lines[0]!.startsWith(`${prog}: `), what).toBe(true);
  expect(r.stderr).not.toMatch(/^\s+at .*:\d+:\d+\)?$/m);
  expect(r.stderr).not.toMatch(/internal error/);
  return lines[0]!.slice(prog.length + 2);
}

const cases = hostileCases.filter((c) => !/opener/.test(c.name));

// The cases run a few at a time: each has its own directory and mount point and
// cleans up after itself, and most of the time is spent starting node processes.
describe("hostile files through the commands", () => {
  it.concurrent.each(cases.map((c) => [c.name, c] as const))("%s", async (_name, c) => {
    const dir = tempDir("addcow-hostile-cli-");
    const built = c.build(dir);
    const mnt = path.join(dir, "mnt");
    fs.mkdirSync(mnt);
    const before = snapshotTree(dir);
    // Only a writable open can fail for some cases (immutable image): the read-only commands work.
    const readsFail = (built.modes ?? ["read", "write"]).includes("read");
    const writesFail = (built.modes ?? ["read", "write"]).includes("write");

    const [info, map, check] = await Promise.all([
      cli(ADDCOW, ["info", built.file]),
      cli(ADDCOW, ["map", built.file]),
      cli(ADDCOW, ["check", built.file]),
    ]);
    if (readsFail) {
      for (const [r, sub] of [
        [info, "info"],
        [map, "map"],
      ] as const) {
        const message = expectOneLineError(r, "addcow");
        for (const p of built.patterns) expect(message, `addcow ${sub}`).toMatch(p);
      }
      // check: 2 with its findings on stdout, or 1 when it cannot check at all.
      if (check.code === 2) {
        expect(check.stdout).toMatch(/corruption/);
        expect(check.stderr).toBe("");
      } else {
        expectOneLineError(check, "addcow");
      }
    } else {
      for (const r of [info, map, check]) expect(r.code, r.stderr).toBe(0);
    }

    let mount: RunResult;
    try {
      mount = await cli(MOUNT, [built.file, mnt]);
    } finally {
      const leftBehind = await ensureUnmounted(mnt);
      if (writesFail) expect(leftBehind, "a mount or daemon was left behind").toBe(false);
    }
    if (writesFail) {
      const message = expectOneLineError(mount, "addcow-mount");
      for (const p of built.patterns) expect(message, "addcow-mount").toMatch(p);
    }
    expect(mountedAt(mnt)).toBe(false);
    expect(diffTrees(before, snapshotTree(dir))).toEqual([]);
  });

  it.sequential(
    "a user who may not read the backing file or the .add-cow file gets one line (run as nobody)",
    async () => {
      const dir = tempDir("addcow-hostile-cli-");
      fs.chmodSync(dir, 0o755);
      writeRaw(path.join(dir, "base.raw"), 1 << 20);
      const d = writeDisk(dir, "d", {
        size: 1 << 20,
        backingName: "base.raw",
        backingFormat: "raw",
      });
      const mnt = path.join(dir, "mnt");
      fs.mkdirSync(mnt);
      fs.chmodSync(mnt, 0o777);
      /** Runs as nobody; nothing in dir may change. */
      const asNobody = async (bin: string, args: string[]) => {
        const before = snapshotTree(dir);
        let r: RunResult;
        try {
          r = await cli(bin, args, { asNobody: true });
        } finally {
          expect(await ensureUnmounted(mnt)).toBe(false);
        }
        expect(diffTrees(before, snapshotTree(dir))).toEqual([]);
        return r;
      };

      fs.chmodSync(path.join(dir, "base.raw"), 0o000);
      expect(expectOneLineError(await asNobody(ADDCOW, ["info", d.addcow]), "addcow")).toMatch(
        /backing file .*base\.raw \(named in .*d\.add-cow\) cannot be opened for reading: permission denied/,
      );
      fs.chmodSync(path.join(dir, "base.raw"), 0o644);

      fs.chmodSync(d.addcow, 0o000);
      expect(expectOneLineError(await asNobody(ADDCOW, ["map", d.addcow]), "addcow")).toMatch(
        /add-cow file .*d\.add-cow cannot be opened for reading: permission denied/,
      );
      expectOneLineError(await asNobody(ADDCOW, ["check", d.addcow]), "addcow");
      fs.chmodSync(d.addcow, 0o644);

      // Readable but not writable: mounting (read-write by default) is refused.
      fs.chmodSync(d.image, 0o444);
      expect(expectOneLineError(await asNobody(MOUNT, [d.addcow, mnt]), "addcow-mount")).toMatch(
        /cannot be opened for writing: permission denied/,
      );
    },
  );
});

describe("command-line mistakes", () => {
  afterEach(async () => {
    releaseImmutable();
    await cleanupAll();
  });

  it.each([
    [["info"], /missing required argument/],
    [["map"], /missing required argument/],
    [["check"], /missing required argument/],
    [["info", "--bogus", "x.add-cow"], /unknown option '--bogus'/],
    [["map", "-z", "x.add-cow"], /unknown option '-z'/],
    [["frobnicate"], /unknown command 'frobnicate'/],
    [["info", "a.add-cow", "b.add-cow"], /too many arguments|excess/],
  ])("addcow %j", async (args, pattern) => {
    const dir = tempDir("addcow-hostile-cli-");
    const r = await run(process.execPath, [ADDCOW, ...args], { env, timeoutMs: 60_000 });
    expect(expectOneLineError(r, "addcow")).toMatch(pattern);
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  it.each(["-1", "12Q", "0", "1.5.5G", ""])("addcow create with size %j", async (size) => {
    const dir = tempDir("addcow-hostile-cli-");
    const r = await run(process.execPath, [ADDCOW, "create", path.join(dir, "x.add-cow"), size], {
      env,
      timeoutMs: 60_000,
    });
    const message = expectOneLineError(r, "addcow");
    const shown = size === "0" ? "0" : JSON.stringify(size);
    expect(message).toContain(`invalid size ${shown}`);
    expect(fs.readdirSync(dir)).toEqual([]);
  });

  describe("addcow-mount", () => {
    async function good(dir: string) {
      return writeDisk(dir, "d", { size: 1 << 20, fill: 0x42, allSet: true });
    }

    async function expectMountFails(args: string[], pattern: RegExp, dirs: string[]) {
      let r: RunResult;
      try {
        r = await cli(MOUNT, args);
      } finally {
        for (const d of dirs) expect(await ensureUnmounted(d)).toBe(false);
      }
      expect(expectOneLineError(r, "addcow-mount")).toMatch(pattern);
    }

    it("needs a FILE and a MOUNTDIR", async () => {
      const dir = tempDir("addcow-hostile-cli-");
      const d = await good(dir);
      await expectMountFails([], /missing required argument|give at least one/, []);
      await expectMountFails([d.addcow], /give at least one FILE\.add-cow and a MOUNTDIR/, []);
    });

    it("refuses unknown options and mount options", async () => {
      const dir = tempDir("addcow-hostile-cli-");
      const d = await good(dir);
      const mnt = path.join(dir, "mnt");
      fs.mkdirSync(mnt);
      await expectMountFails(["--bogus", d.addcow, mnt], /unknown option '--bogus'/, [mnt]);
      await expectMountFails(["-o", "frobnicate", d.addcow, mnt], /frobnicate/, [mnt]);
    });

    it("refuses a MOUNTDIR that is a file or may not be used", async () => {
      const dir = tempDir("addcow-hostile-cli-");
      fs.chmodSync(dir, 0o755);
      const d = await good(dir);
      const file = writeRaw(path.join(dir, "plain"), 10);
      const before = snapshotTree(dir);
      await expectMountFails([d.addcow, file], /mount directory .*plain is not a directory/, [
        file,
      ]);
      const closed = path.join(dir, "closed");
      fs.mkdirSync(closed, { mode: 0o700 });
      const r = await cli(MOUNT, ["-o", "ro", d.addcow, closed], { asNobody: true });
      expect(await ensureUnmounted(closed)).toBe(false);
      expect(expectOneLineError(r, "addcow-mount")).toMatch(
        /mount directory .*closed: permission denied; choose a directory you may read and write/,
      );
      fs.rmdirSync(closed);
      expect(diffTrees(before, snapshotTree(dir))).toEqual([]);
    });

    it("refuses a MOUNTDIR that is already mounted and leaves the first mount alone", async () => {
      const dir = tempDir("addcow-hostile-cli-");
      const d = await good(dir);
      const other = writeDisk(dir, "e", { size: 1 << 20, fill: 0x43, allSet: true });
      const mnt = path.join(dir, "mnt");
      fs.mkdirSync(mnt);
      const m = await mountDisk(d.addcow, mnt);
      try {
        const r = await cli(MOUNT, [other.addcow, mnt]);
        expectOneLineError(r, "addcow-mount");
        expect(r.stderr).toMatch(/mnt is already a mount point; unmount it first/);
        // Still the first disk, still served.
        const head = Buffer.alloc(16);
        const fd = fs.openSync(m.file, "r");
        try {
          fs.readSync(fd, head, 0, 16, 0);
        } finally {
          fs.closeSync(fd);
        }
        expect(head.every((b) => b === 0x42)).toBe(true);
        expect(processAlive(m.pid)).toBe(true);
      } finally {
        await m.unmount();
      }
      expect(mountedAt(mnt)).toBe(false);
    });
  });
});
