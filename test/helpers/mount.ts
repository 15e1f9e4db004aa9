/**
 * Real-mount helpers for integration tests (root, /dev/fuse). Everything a
 * test creates through them — temp dirs, addcow-mount daemons, loop devices,
 * mounted partitions — is recorded and removed by `cleanupAll()`, which every
 * test file calls in afterEach, so a failing test leaves nothing behind.
 *
 *   afterEach(cleanupAll);
 *   const dir = tempDir();
 *   await makeOverlay(dir, "disk", { backingBytes: 8 << 20 });
 *   const m = await mountDisk(`${dir}/disk.add-cow`, `${dir}/mnt`);
 *   await sh("cmp", [m.file, `${dir}/disk-base.raw`]);
 *   await m.unmount();            // fusermount -u, waits for the daemon to exit 0
 *
 * The daemon is the built CLI (dist/): run `npm run build` before vitest.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createDisk } from "../../src/ops/create";
import { mountDirOfCommandLine } from "../../src/chain/lock-holder";
import { pattern } from "./pattern";

function repoRoot(): string {
  let dir = __dirname;
  while (!fs.existsSync(path.join(dir, "package.json"))) dir = path.dirname(dir);
  return dir;
}

/** The compiled addcow-mount entry point. */
export const MOUNT_BIN = path.join(repoRoot(), "dist/src/cli/addcow-mount.js");

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program; never throws for a non-zero exit (look at `code`). */
export function run(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; input?: string; cwd?: string } = {},
): Promise<RunResult> {
  return new Promise((resolve) => {
    const child = execFile(
      cmd,
      args,
      {
        env: opts.env ?? process.env,
        ...(opts.cwd ? { cwd: opts.cwd } : {}),
        timeout: opts.timeoutMs ?? 60_000,
        maxBuffer: 64 << 20,
        encoding: "utf8",
      },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === "number" ? err.code : 1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
    // Always end stdin so nothing waits on it.
    child.stdin?.end(opts.input);
  });
}

/** Runs a program and throws (with its stderr) unless it exits 0. */
export async function sh(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}) {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${r.code}: ${r.stderr.trim() || r.stdout.trim()}`,
    );
  }
  return r;
}

// What cleanupAll() undoes, newest first.
const tempDirs: string[] = [];
const fuseMounts = new Set<string>();
const partitionMounts = new Set<string>();
const loopDevices = new Set<string>();
const children = new Set<ChildProcess>();
const deferred: Array<() => Promise<void> | void> = [];

/** Runs fn in cleanupAll() after the mounts are gone (servers, proxies a test started). */
export function deferCleanup(fn: () => Promise<void> | void): void {
  deferred.push(fn);
}

/** A child process that cleanupAll() kills when it is still running. */
export function trackChild(child: ChildProcess): void {
  children.add(child);
}

/** A fresh directory under os.tmpdir(), removed by cleanupAll(). */
export function tempDir(prefix = "addcow-test-"): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  tempDirs.push(dir);
  return dir;
}

/** Writes `bytes` of deterministic pseudo-random data (seeded) to a new file. */
export function writePatternFile(file: string, bytes: number, seed = 1): void {
  fs.writeFileSync(file, pattern(bytes, seed));
}

export interface Overlay {
  addcow: string;
  image: string;
  backing: string | null;
}

/**
 * Creates `<dir>/<name>.add-cow` (image `<name>.raw`). With backingBytes a raw
 * backing file `<name>-base.raw` of pattern data is made first; with
 * `backing` an existing raw file is used.
 */
export async function makeOverlay(
  dir: string,
  name: string,
  opts: { backingBytes?: number; backing?: string; size?: number; clusterSize?: number } = {},
): Promise<Overlay> {
  let backing = opts.backing ?? null;
  if (!backing && opts.backingBytes !== undefined) {
    backing = path.join(dir, `${name}-base.raw`);
    writePatternFile(backing, opts.backingBytes, 7);
  }
  const addcow = path.join(dir, `${name}.add-cow`);
  const image = path.join(dir, `${name}.raw`);
  await createDisk({
    file: addcow,
    image,
    ...(backing ? { backing, backingFormat: "raw" } : {}),
    ...(opts.size !== undefined ? { size: opts.size } : {}),
    ...(opts.clusterSize !== undefined ? { clusterSize: opts.clusterSize } : {}),
  });
  return { addcow, image, backing };
}

function mountedAt(dir: string): boolean {
  const table = fs.readFileSync("/proc/self/mountinfo", "utf8");
  return table.split("\n").some((line) => line.split(" ")[4] === dir);
}

/** Pid of the addcow-mount daemon serving `mountDir`, found by its command line. */
export function daemonPid(mountDir: string): number | null {
  const want = path.resolve(mountDir);
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    let args: string[];
    try {
      args = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8").split("\0");
    } catch {
      continue;
    }
    if (!args.some((a) => /addcow-mount(\.js)?$/.test(a))) continue;
    if (!args.includes("--daemon-child") && !args.includes("-f")) continue;
    let cwd = "/";
    try {
      cwd = fs.readlinkSync(`/proc/${entry}/cwd`);
    } catch {
      // Gone already.
    }
    if (mountDirOfCommandLine(args, cwd) === want) return Number(entry);
  }
  return null;
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(" ")[2] !== "Z";
  } catch {
    return false;
  }
}

export async function waitFor(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 15_000,
): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

export interface MountHandle {
  /** The mount directory (absolute). */
  dir: string;
  /** The first disk's file inside the mount. */
  file: string;
  /** The daemon's pid. */
  pid: number;
  /** fusermount -u, then waits for the daemon to exit; returns its exit code when known. */
  unmount(): Promise<void>;
  /** Sends a signal to the daemon and waits until it is gone. */
  kill(signal?: NodeJS.Signals): Promise<void>;
  /** With `foreground`: the daemon's exit code once it exits (null: killed by a signal). */
  exited?: Promise<number | null>;
  /** With `foreground`: what the daemon wrote to stderr so far. */
  stderr?: () => string;
}

export interface MountOpts {
  /** `-o` value, e.g. "ro" or "cache=writethrough". */
  options?: string;
  name?: string;
  /** Run with -f as a child of this process (default: background like a user would). */
  foreground?: boolean;
  env?: NodeJS.ProcessEnv;
  /** The program to run instead of the built addcow-mount (a test launcher). */
  bin?: string;
}

/** Arguments for addcow-mount. */
export function mountArgs(files: string[], mountDir: string, opts: MountOpts = {}): string[] {
  const args: string[] = [];
  if (opts.options) args.push("-o", opts.options);
  if (opts.name) args.push("--name", opts.name);
  if (opts.foreground) args.push("-f");
  return [...args, ...files, mountDir];
}

/** For tests that start addcow-mount themselves: cleanupAll() unmounts DIR and stops its daemon. */
export function trackMount(dir: string): void {
  fuseMounts.add(path.resolve(dir));
}

/** Mounts one or more disks with addcow-mount and waits until the files are usable. */
export async function mountDisks(
  files: string[],
  mountDir: string,
  opts: MountOpts = {},
): Promise<MountHandle> {
  const dir = path.resolve(mountDir);
  fuseMounts.add(dir);
  const args = [opts.bin ?? MOUNT_BIN, ...mountArgs(files, dir, opts)];
  let pid: number;
  let exited: Promise<number | null> | undefined;
  let stderr = "";
  if (opts.foreground) {
    const child = spawn(process.execPath, args, {
      env: opts.env ?? process.env,
      stdio: ["ignore", "ignore", "pipe"],
    });
    children.add(child);
    exited = new Promise((resolve) => child.on("exit", (code) => resolve(code)));
    child.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
    await waitFor(`${dir} to be mounted (stderr: ${stderr})`, () => {
      if (child.exitCode !== null) {
        throw new Error(`addcow-mount -f exited ${child.exitCode}: ${stderr.trim()}`);
      }
      return mountedAt(dir);
    });
    pid = child.pid!;
  } else {
    const r = await run(process.execPath, args, { env: opts.env });
    if (r.code !== 0) throw new Error(`addcow-mount exited ${r.code}: ${r.stderr.trim()}`);
    const found = daemonPid(dir);
    if (found === null) throw new Error(`addcow-mount returned 0 but no daemon serves ${dir}`);
    pid = found;
  }
  const names = fs.readdirSync(dir);
  const file = path.join(dir, opts.name ?? names[0] ?? "");
  const handle: MountHandle = {
    dir,
    file,
    pid,
    ...(exited ? { exited, stderr: () => stderr } : {}),
    async unmount() {
      await sh("fusermount", ["-u", dir]);
      await waitFor(`daemon ${pid} to exit`, () => !processAlive(pid));
      fuseMounts.delete(dir);
    },
    async kill(signal: NodeJS.Signals = "SIGTERM") {
      process.kill(pid, signal);
      await waitFor(`daemon ${pid} to exit`, () => !processAlive(pid));
    },
  };
  return handle;
}

export function mountDisk(file: string, mountDir: string, opts: MountOpts = {}) {
  return mountDisks([file], mountDir, opts);
}

/** losetup (-P: scan partitions) on a file; detached by cleanupAll(). Returns /dev/loopN. */
export async function attachLoop(file: string, opts: { partitions?: boolean } = {}) {
  const args = ["--find", "--show"];
  if (opts.partitions) args.push("-P");
  const r = await sh("losetup", [...args, file]);
  const dev = r.stdout.trim();
  loopDevices.add(dev);
  if (opts.partitions) await ensurePartitions(dev);
  return dev;
}

/**
 * Kernels built without partition-table parsers (CONFIG_MSDOS_PARTITION and
 * CONFIG_EFI_PARTITION off) ignore -P; partx then adds the partitions from
 * user space.
 */
async function ensurePartitions(dev: string): Promise<void> {
  const name = path.basename(dev);
  const hasParts = () => fs.readdirSync(`/sys/block/${name}`).some((e) => e.startsWith(`${name}p`));
  if (hasParts()) return;
  await run("partx", ["-a", dev]);
}

export async function detachLoop(dev: string): Promise<void> {
  await sh("losetup", ["-d", dev]);
  loopDevices.delete(dev);
}

/** mount(8) a block device; unmounted (lazily if needed) by cleanupAll(). */
export async function mountBlock(dev: string, dir: string, options?: string): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  partitionMounts.add(dir);
  await sh("mount", [...(options ? ["-o", options] : []), dev, dir]);
}

/**
 * A small file system of its own for a test (a full disk is easy to reach):
 * tmpfs of `megabytes`, or ext4 in a file on a loop device. Unmounted and
 * detached by cleanupAll(), even when the test fails.
 */
export async function smallFileSystem(
  kind: "tmpfs" | "ext4",
  dir: string,
  megabytes: number,
): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  if (kind === "tmpfs") {
    partitionMounts.add(dir);
    await sh("mount", ["-t", "tmpfs", "-o", `size=${megabytes}m,mode=0755`, "tmpfs", dir]);
    return;
  }
  const backing = `${dir}.img`;
  fs.writeFileSync(backing, "");
  fs.truncateSync(backing, megabytes << 20);
  await sh("mkfs.ext4", ["-q", "-F", "-m", "0", backing]);
  await mountBlock(await attachLoop(backing), dir);
}

export async function umountBlock(dir: string): Promise<void> {
  await sh("umount", [dir]);
  partitionMounts.delete(dir);
}

/** Starts a helper process (a syslog receiver, ...) that cleanupAll() kills. */
export function spawnTracked(cmd: string, args: string[]): ChildProcess {
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  children.add(child);
  return child;
}

/** Undoes everything the helpers created, newest first; never throws. */
export async function cleanupAll(): Promise<void> {
  for (const dir of [...partitionMounts].reverse()) {
    if (mountedAt(dir)) await run("umount", ["-l", dir]);
  }
  partitionMounts.clear();
  for (const dev of [...loopDevices].reverse()) await run("losetup", ["-d", dev]);
  loopDevices.clear();
  // Loop devices attached to our files by other means.
  for (const dir of tempDirs) {
    const r = await run("losetup", ["-n", "-O", "NAME,BACK-FILE", "-l"]);
    for (const line of r.stdout.split("\n")) {
      const [dev, back] = line.trim().split(/\s+/, 2);
      if (dev && back && back.startsWith(dir + "/")) await run("losetup", ["-d", dev]);
    }
  }
  for (const dir of [...fuseMounts].reverse()) {
    const pid = daemonPid(dir);
    if (mountedAt(dir)) {
      const r = await run("fusermount", ["-u", dir]);
      if (r.code !== 0) await run("fusermount", ["-uz", dir]);
    }
    if (pid !== null && processAlive(pid)) {
      try {
        process.kill(pid, "SIGTERM");
        await waitFor(`daemon ${pid} to exit`, () => !processAlive(pid), 5000);
      } catch {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // Already gone.
        }
      }
    }
  }
  fuseMounts.clear();
  for (const fn of deferred.splice(0).reverse()) {
    try {
      await fn();
    } catch {
      // Keep cleaning up.
    }
  }
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
  children.clear();
  for (const dir of tempDirs.splice(0).reverse()) {
    try {
      fs.rmSync(dir, { recursive: true, force: true });
    } catch {
      // Something is still mounted inside; leave the directory rather than fail the run.
    }
  }
}
