import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { expectOwnRuntime, shellPath } from "../helpers/runtime";
import {
  cleanupAll,
  daemonPid,
  processAlive,
  run,
  tempDir,
  trackMount,
  waitFor,
} from "../helpers/mount";

afterEach(cleanupAll);

const REPO = path.resolve(__dirname, "../..");

/** Runs a command, failing the test with its output unless it exits 0. */
async function ok(cmd: string, args: string[], opts: Parameters<typeof run>[2] = {}) {
  const r = await run(cmd, args, { timeoutMs: 240_000, ...opts });
  expect(
    r.code,
    `${cmd} ${args.join(" ")}:\n${r.stdout.slice(-3000)}\n${r.stderr.slice(-3000)}`,
  ).toBe(0);
  return r;
}

describe("the npm package", () => {
  it("npm pack, then npm install -g of the tarball into a prefix: the installed commands create, inspect and mount a disk", async () => {
    const dir = tempDir("addcow-pkg-");
    // npm pack builds first (prepare) and ships dist, docs, mount-examples, README, LICENSE.
    const pack = await ok("npm", ["pack", "--json", "--pack-destination", dir], { cwd: REPO });
    const [info] = JSON.parse(pack.stdout) as Array<{
      filename: string;
      files: Array<{ path: string }>;
    }>;
    const files = info!.files.map((f) => f.path);
    for (const f of [
      "dist/src/cli/addcow.js",
      "dist/src/cli/addcow-mount.js",
      "dist/src/cli/mount-fuse-addcow.js",
      "docs/cli.md",
      "docs/mount.md",
      "mount-examples/fstab.txt",
      "mount-examples/addcow-mount@.service",
      "README.md",
      "LICENSE",
    ]) {
      expect(files).toContain(f);
    }
    expect(files.filter((f) => f.startsWith("test/") || f.endsWith(".ts"))).toEqual([]);

    // Installed like any package: no TypeScript needed, the native modules load (prebuilt).
    const prefix = path.join(dir, "prefix");
    await ok("npm", [
      "install",
      "-g",
      "--prefix",
      prefix,
      "--prefer-offline",
      "--no-audit",
      "--no-fund",
      "--allow-scripts=fuse-native",
      path.join(dir, info!.filename),
    ]);
    const bin = path.join(prefix, "bin");
    for (const name of ["addcow", "addcow-mount", "mount.fuse.addcow"]) {
      expect(fs.statSync(path.join(bin, name)).mode & 0o111).not.toBe(0);
    }
    const env: NodeJS.ProcessEnv = { ...process.env, PATH: `${bin}:${process.env.PATH}` };
    delete env.DEBUG;
    const sh = (script: string) =>
      ok("bash", ["-euo", "pipefail", "-c", script], { cwd: dir, env });

    const version = await sh("addcow --version");
    expect(version.stdout.trim()).toBe(
      (JSON.parse(fs.readFileSync(path.join(REPO, "package.json"), "utf8")) as { version: string })
        .version,
    );
    await sh(`command -v addcow | grep -q '^${bin}/'`);
    // The package's commands run on the node the PATH gives: here, the tests' own.
    const started = await sh(
      "DEBUG=addcow:cli addcow --version && DEBUG=addcow:cli addcow-mount -V",
    );
    expectOwnRuntime(started.stderr, ["addcow", "addcow-mount"]);
    await sh("head -c 4M /dev/urandom > base.raw && addcow create -b base.raw -F raw disk.add-cow");
    const json = await sh("addcow info --output=json disk.add-cow");
    expect(JSON.parse(json.stdout)).toMatchObject({ virtualSize: 4 << 20, chainDepth: 1 });

    const mnt = path.join(dir, "mnt");
    trackMount(mnt);
    await sh(`addcow-mount disk.add-cow ${mnt} && cmp ${mnt}/disk base.raw`);
    const pid = daemonPid(mnt);
    expect(pid).not.toBe(null);
    await sh(`dd if=/dev/zero of=${mnt}/disk bs=64k count=2 conv=notrunc,fsync status=none`);
    await sh(`fusermount -u ${mnt}`);
    await waitFor("the daemon to exit", () => !processAlive(pid!));
    await sh('addcow map --json disk.add-cow | grep -q \'"source": "image"\'');

    // The mount(8) helper, called the way mount(8) calls it.
    const ro = path.join(dir, "ro");
    trackMount(ro);
    await sh(`mount.fuse.addcow ${dir}/disk.add-cow ${ro} -o ro,nofail,_netdev`);
    const src = await sh(`findmnt -n -o SOURCE,FSTYPE ${ro}`);
    expect(src.stdout.trim()).toMatch(new RegExp(`^${dir}/disk\\.add-cow +fuse\\.addcow$`));
    await sh(`fusermount -u ${ro}`);

    // An example shipped in the package runs with the installed commands.
    const examples = path.join(prefix, "lib/node_modules/addcow/mount-examples");
    const tmp = path.join(dir, "tmp");
    fs.mkdirSync(tmp);
    await ok("bash", [path.join(examples, "dd-in-and-out.sh")], {
      env: { ...env, TMPDIR: tmp },
    });
  }, 300_000);

  it(".ci/install-commands puts wrappers running this checkout on its Node.js into a prefix, mount.fuse.addcow beside mount(8)'s helpers; again is fine", async () => {
    const dir = tempDir("addcow-link-");
    const prefix = path.join(dir, "prefix");
    const sbin = path.join(dir, "sbin");
    fs.mkdirSync(sbin);
    // What an earlier install-commands left: an npm link of the checkout into the prefix.
    fs.mkdirSync(path.join(prefix, "lib/node_modules"), { recursive: true });
    fs.mkdirSync(path.join(prefix, "bin"));
    fs.symlinkSync(REPO, path.join(prefix, "lib/node_modules/addcow"));
    fs.symlinkSync(
      "../lib/node_modules/addcow/dist/src/cli/addcow.js",
      path.join(prefix, "bin/addcow"),
    );
    const addcowJs = path.join(REPO, "dist/src/cli/addcow.js");
    const before = fs.readFileSync(addcowJs);
    for (let i = 0; i < 2; i++) {
      await ok("bash", [path.join(REPO, ".ci/install-commands"), prefix], {
        env: { ...process.env, ADDCOW_SBIN: sbin },
      });
    }
    // The old link's target was not written through; the link into the checkout is gone.
    expect(fs.readFileSync(addcowJs).equals(before)).toBe(true);
    expect(fs.existsSync(path.join(prefix, "lib/node_modules/addcow"))).toBe(false);
    for (const name of ["addcow", "addcow-mount", "mount.fuse.addcow"]) {
      const file = path.join(prefix, "bin", name);
      expect(fs.lstatSync(file).isFile()).toBe(true);
      expect(fs.readFileSync(file, "utf8")).toContain(`${REPO}/dist/src/cli/`);
    }
    expect(fs.realpathSync(path.join(sbin, "mount.fuse.addcow"))).toBe(
      path.join(prefix, "bin/mount.fuse.addcow"),
    );
    // Started with a PATH where the machine's node comes first, or with mount(8)'s and
    // systemd's bare ones, the commands run on this checkout's Node.js all the same.
    for (const PATH of [shellPath(), "/usr/sbin:/usr/bin:/sbin:/bin"]) {
      const env = { PATH, DEBUG: "addcow:cli" };
      const r = await ok(path.join(prefix, "bin/addcow"), ["--help"], { env });
      expect(r.stdout).toMatch(/rebase/);
      const m = await ok(path.join(prefix, "bin/addcow-mount"), ["--version"], { env });
      const helper = await run(path.join(sbin, "mount.fuse.addcow"), [], { env });
      expect(helper.stderr).toMatch(/usage: mount\.fuse\.addcow/);
      expectOwnRuntime(r.stderr + m.stderr + helper.stderr, [
        "addcow",
        "addcow-mount",
        "mount.fuse.addcow",
      ]);
    }
  });
});
