import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import type { Workload } from "./fio";
import type { BenchContext } from "./suite";
import {
  copyFile,
  exited,
  isMounted,
  lazyUnmount,
  pidsWithArg,
  run,
  sleep,
  stopChild,
  waitFor,
  which,
} from "./util";

/** The repository root (this file runs from dist/test/bench). */
export const repoRoot = path.resolve(__dirname, "../../..");
export const addcowMountJs = path.join(repoRoot, "dist/src/cli/addcow-mount.js");
export const ceilingJs = path.join(__dirname, "ceiling-daemon.js");

/** A disk set up and mounted for one run. */
export interface Mounted {
  /** The file fio works on. */
  file: string;
  /** The daemon's pid, when there is one. */
  pid?: number;
  /** Unmounts and stops the daemon (registered with ctx.defer too). */
  teardown(): Promise<void>;
}

export type SystemKind = "addcow" | "peer" | "ceiling" | "reference";

export interface System {
  name: string;
  label: string;
  kind: SystemKind;
  /** fdatasync on the mounted file makes the writes durable. */
  durable: boolean;
  /** Footnote mark for a workload's numbers, with its text. */
  mark?(w: Workload): { sign: string; text: string } | undefined;
  /** Why it cannot run here, or null. */
  missing(): string | null;
  /** A fresh disk over `base` in `dir`, mounted (the timed part excludes this). */
  start(ctx: BenchContext, base: string, dir: string, w: Workload): Promise<Mounted>;
}

/** A daemon we spawn in the foreground: stopped with SIGTERM, unmounted lazily if it hangs. */
export async function startDaemon(
  ctx: BenchContext,
  what: string,
  cmd: string,
  args: string[],
  mountPoint: string,
  ready: () => string | undefined,
  opts: { stopWith?: "sigterm" | "fusermount"; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<Mounted> {
  const child: ChildProcess = spawn(cmd, args, {
    stdio: ["ignore", "ignore", "pipe"],
    env: opts.env ?? process.env,
  });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-2000)));
  let gone = false;
  child.once("exit", () => (gone = true));
  const teardown = ctx.defer(`stop ${what}`, async () => {
    if (opts.stopWith === "fusermount" && isMounted(mountPoint)) {
      await run("fusermount", ["-u", mountPoint], { allowFail: true });
      await Promise.race([exited(child), sleep(10_000)]);
    }
    await stopChild(child);
    await lazyUnmount(mountPoint);
  });
  try {
    const file = await waitFor(`${what} to mount`, opts.timeoutMs ?? 30_000, () => {
      if (gone) throw new Error(`${what} exited before it was ready: ${stderr.trim()}`);
      return isMounted(mountPoint) ? ready() : undefined;
    });
    return { file, pid: child.pid, teardown };
  } catch (err) {
    await teardown();
    throw err;
  }
}

/** The file of the expected size inside a mounted directory. */
export function fileIn(dir: string, size: number, name?: string): () => string | undefined {
  return () => {
    try {
      for (const entry of name ? [name] : fs.readdirSync(dir)) {
        const p = path.join(dir, entry);
        if (fs.statSync(p).size === size) return p;
      }
    } catch {
      // not there yet
    }
    return undefined;
  };
}

/** Systems that need their own copy of the base when the workload writes. */
async function ownCopy(base: string, dir: string, w: Workload): Promise<string> {
  if (!w.writes) return base;
  const copy = path.join(dir, "disk.raw");
  await copyFile(base, copy);
  // Write the 1 GiB copy out now, so its writeback does not run during the next timed run.
  const fd = fs.openSync(copy, "r+");
  try {
    fs.fdatasyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  return copy;
}

function addcow(
  name: string,
  label: string,
  clusterSize?: number,
  mountJs = addcowMountJs,
): System {
  return {
    name,
    label,
    kind: "addcow",
    durable: true,
    missing: () =>
      fs.existsSync(mountJs) ? null : `${mountJs} not built (the mount daemon is missing)`,
    async start(ctx, base, dir) {
      const { createDisk } =
        require("../../src/ops/create") as typeof import("../../src/ops/create");
      const file = path.join(dir, "disk.add-cow");
      await createDisk({ file, backing: base, backingFormat: "raw", clusterSize });
      const mnt = path.join(dir, "mnt");
      const size = fs.statSync(base).size;
      const nodeArgs = (process.env.ADDCOW_BENCH_NODE_ARGS ?? "").split(" ").filter(Boolean);
      const mountArgs = (process.env.ADDCOW_BENCH_MOUNT_ARGS ?? "").split(" ").filter(Boolean);
      return startDaemon(
        ctx,
        name,
        process.execPath,
        [...nodeArgs, mountJs, "-f", ...mountArgs, file, mnt],
        mnt,
        fileIn(mnt, size, "disk"),
      );
    },
  };
}

/**
 * qemu-storage-daemon serving a fresh qcow2 overlay over `base` (of `baseFormat`)
 * through a FUSE export on `dir/disk`.
 */
export async function startQsdOverlay(
  ctx: BenchContext,
  what: string,
  base: string,
  baseFormat: "raw" | "qcow2",
  dir: string,
): Promise<Mounted> {
  const overlay = path.join(dir, "overlay.qcow2");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", baseFormat, overlay]);
  const size = Number(
    JSON.parse((await run("qemu-img", ["info", "--output=json", overlay])).stdout)["virtual-size"],
  );
  const mnt = path.join(dir, "disk");
  fs.writeFileSync(mnt, "");
  return startDaemon(
    ctx,
    what,
    "qemu-storage-daemon",
    [
      "--blockdev",
      `driver=file,node-name=file0,filename=${overlay}`,
      "--blockdev",
      "driver=qcow2,node-name=disk0,file=file0",
      "--export",
      `type=fuse,id=exp0,node-name=disk0,mountpoint=${mnt},writable=on`,
    ],
    mnt,
    () => (fs.statSync(mnt).size === size ? mnt : undefined),
  );
}

const qsd: System = {
  name: "qsd",
  label: "qemu-storage-daemon qcow2",
  kind: "peer",
  durable: true,
  missing: () =>
    which("qemu-storage-daemon") && which("qemu-img")
      ? null
      : "qemu-storage-daemon/qemu-img not installed (apt install qemu-system-common qemu-utils)",
  start: (ctx, base, dir) => startQsdOverlay(ctx, "qemu-storage-daemon", base, "raw", dir),
};

const xmount: System = {
  name: "xmount",
  label: "xmount cache file",
  kind: "peer",
  durable: false,
  mark: (w) =>
    w.fdatasync
      ? {
          sign: "†",
          text: "xmount never fsyncs its cache file: its fdatasync numbers are not durable",
        }
      : undefined,
  missing: () => (which("xmount") ? null : "xmount not installed (apt install xmount)"),
  async start(ctx, base, dir) {
    const mnt = path.join(dir, "mnt");
    fs.mkdirSync(mnt);
    const size = fs.statSync(base).size;
    // xmount puts itself in the background; find it by our unique directory to stop it.
    const stop = ctx.defer("stop xmount", async () => {
      if (isMounted(mnt)) await run("fusermount", ["-u", mnt], { allowFail: true });
      await waitFor("xmount to exit", 10_000, () =>
        pidsWithArg(dir).length ? undefined : true,
      ).catch(() => {
        for (const pid of pidsWithArg(dir)) process.kill(pid, "SIGKILL");
      });
      await lazyUnmount(mnt);
    });
    try {
      await run("xmount", [
        "--in",
        "raw",
        base,
        "--cache",
        path.join(dir, "cache.xmc"),
        "--out",
        "raw",
        mnt,
      ]);
      const file = await waitFor("xmount to mount", 30_000, () =>
        isMounted(mnt) ? fileIn(mnt, size)() : undefined,
      );
      return { file, pid: pidsWithArg(dir)[0], teardown: stop };
    } catch (err) {
      await stop();
      throw err;
    }
  },
};

const nbdkit: System = {
  name: "nbdkit",
  label: "nbdkit cow + nbdfuse",
  kind: "peer",
  durable: false,
  mark: (w) =>
    w.writes
      ? {
          sign: "‡",
          text: "nbdkit's cow filter keeps the overlay in a temporary file: nothing written persists",
        }
      : undefined,
  missing: () =>
    which("nbdkit") && which("nbdfuse")
      ? null
      : "nbdkit/nbdfuse not installed (apt install nbdkit libnbd-bin)",
  async start(ctx, base, dir) {
    const mnt = path.join(dir, "mnt");
    fs.mkdirSync(mnt);
    const size = fs.statSync(base).size;
    return startDaemon(
      ctx,
      "nbdfuse",
      "nbdfuse",
      [mnt, "--command", "nbdkit", "-s", "--filter=cow", "file", base],
      mnt,
      fileIn(mnt, size, "nbd"),
      { stopWith: "fusermount" },
    );
  },
};

/** The fastest variant measured on this machine (see BENCHMARKS.md). */
export function ceiling(
  io: "sync" | "async" | "null" = "sync",
  small = false,
  name = "ceiling",
): System {
  return {
    name,
    label:
      io === "null"
        ? "fuse-native doing no I/O (per-request cost)"
        : `ceiling (fuse-native passthrough, ${io} I/O${small ? ", no big_writes/max_write/max_read" : ""})`,
    kind: "ceiling",
    durable: true,
    missing: () => (fs.existsSync(ceilingJs) ? null : `${ceilingJs} not built`),
    async start(ctx, base, dir, w) {
      const raw = await ownCopy(base, dir, w);
      const mnt = path.join(dir, "mnt");
      const size = fs.statSync(base).size;
      const args = [
        ceilingJs,
        ...(io === "null" ? ["--null"] : ["--io", io]),
        ...(small ? ["--small"] : []),
        raw,
        mnt,
      ];
      return startDaemon(ctx, name, process.execPath, args, mnt, fileIn(mnt, size, "disk"));
    },
  };
}

const rawFile: System = {
  name: "raw",
  label: "raw file, no FUSE (direct I/O hits the disk)",
  kind: "reference",
  durable: true,
  missing: () => null,
  async start(_ctx, base, dir, w) {
    return { file: await ownCopy(base, dir, w), teardown: async () => undefined };
  },
};

/**
 * ADDCOW_BENCH_ALT=/path/to/other/checkout adds the opt-in row "addcow-alt":
 * another build of addcow, for A/B comparisons of a change in one run.
 */
const altRoot = process.env.ADDCOW_BENCH_ALT;

/** Every system, in table order. */
export function allSystems(): System[] {
  return [
    ...(altRoot
      ? [
          addcow(
            "addcow-alt",
            `addcow from ${altRoot}`,
            undefined,
            path.join(altRoot, "dist/src/cli/addcow-mount.js"),
          ),
        ]
      : []),
    addcow("addcow", "addcow (64K clusters)"),
    addcow("addcow-4k", "addcow, 4K clusters", 4096),
    addcow("addcow-1m", "addcow, 1M clusters", 1024 * 1024),
    qsd,
    xmount,
    nbdkit,
    ceiling(),
    ceiling("async", false, "ceiling-async"),
    ceiling("sync", true, "ceiling-small"),
    ceiling("null", false, "fuse-null"),
    rawFile,
  ];
}

/** Systems run unless named in --only (variants that only explain the ceiling). */
export const optInSystems = new Set(["addcow-alt", "ceiling-async", "ceiling-small", "fuse-null"]);
