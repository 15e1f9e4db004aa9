import * as fs from "node:fs";
import * as path from "node:path";
import type { BenchContext, BenchSuite } from "./suite";
import { addcowMountJs, repoRoot } from "./systems";
import { MiB, isMounted, lazyUnmount, median, pidsWithArg, run, sleep, waitFor } from "./util";
import { startNginx } from "../helpers/remote-servers";
import { createDisk } from "../../src/ops/create";

/**
 * Density (issue 21): what a mount costs in time and memory, and a hundred
 * overlays of one remote base served at once.
 *
 *  - start-up: wall time of `node -e 0` (the floor), `addcow --version`,
 *    `addcow-mount --version`, `addcow info` (runs interleaved, medians);
 *  - one mount: `addcow-mount DISK DIR` until it returns (the file is usable
 *    then) for a local and a remote base, and `addcow-mount -o host=NAME`
 *    into a running host daemon; the RSS of a daemon of its own after the
 *    mount and after a 64 MiB sequential read;
 *  - a hundred overlays of one remote base (nginx on loopback) attached to
 *    one host daemon by `addcow-mount -o host=NAME`, 4 at a time: the time
 *    to mount them all, the host's RSS, every disk read and compared with
 *    the base (4 MiB each, at different offsets), the requests nginx served;
 *    ten daemons of their own over the same base for comparison.
 *
 * ADDCOW_DENSITY_DISKS (default 100) sets the number of overlays.
 */
const NODE = process.execPath;
const ADDCOW = path.join(repoRoot, "dist/src/cli/addcow.js");
const BASE_BYTES = 64 * MiB;
const READ_BYTES = 4 * MiB;
const ATTACH_PARALLEL = 4;

function rss(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) * 1024 : NaN;
}

async function wallMs(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<number> {
  const t0 = process.hrtime.bigint();
  await run(cmd, args, { env });
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

/** The one daemon serving `dir` (its command line names it), or the host's pid. */
function daemonOf(needle: string): number {
  const pids = pidsWithArg(needle).filter((p) => p !== process.pid);
  if (pids.length !== 1) throw new Error(`expected one daemon for ${needle}, found ${pids.length}`);
  return pids[0]!;
}

async function unmountAndWait(dir: string, pid: number | null): Promise<void> {
  await run("fusermount", ["-u", dir]);
  await waitFor(`${dir} to be released`, 20_000, () => {
    if (pid === null) return isMounted(dir) ? undefined : true;
    try {
      const state = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.[0];
      return state === "Z" ? true : undefined;
    } catch {
      return true;
    }
  });
}

/** Reads `length` bytes at `offset` of a mounted file and compares them with the base. */
async function readAndCompare(file: string, base: Buffer, offset: number, length: number) {
  const fh = await fs.promises.open(file, "r");
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    if (bytesRead !== length || !buf.equals(base.subarray(offset, offset + length))) {
      throw new Error(`${file} [${offset}, +${length}) does not read as the base`);
    }
  } finally {
    await fh.close();
  }
}

/** Starts host daemon `name` (background); the returned function stops it (SIGTERM) and waits. */
async function startHost(ctx: BenchContext, name: string, env: NodeJS.ProcessEnv) {
  await run(NODE, [addcowMountJs, "--serve", name], { env });
  const pid = daemonOf(name);
  return ctx.defer(`stop host daemon ${name}`, async () => {
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      return;
    }
    await waitFor(`host daemon ${name} to stop`, 60_000, () =>
      pidsWithArg(name).some((p) => p === pid) ? undefined : true,
    );
  });
}

async function inBatches<T>(items: T[], n: number, fn: (item: T) => Promise<void>) {
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < items.length) await fn(items[next++]!);
    }),
  );
}

const fmtMs = (v: number) => `${Math.round(v)} ms`;
const fmtMiB = (v: number) => `${(v / MiB).toFixed(1)} MiB`;

async function runDensity(ctx: BenchContext) {
  const work = path.join(ctx.workDir, "density");
  fs.mkdirSync(path.join(work, "www"), { recursive: true });
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    ADDCOW_RUNTIME_DIR: path.join(work, "run"),
    ADDCOW_CACHE_DIR: path.join(work, "cache"),
  };
  const disks = Number(process.env.ADDCOW_DENSITY_DISKS ?? 100);
  const repeat = Math.max(5, ctx.repeat * 5);

  // A base with a different value in every 4 KiB (a misplaced read shows).
  const basePath = path.join(work, "www", "base.raw");
  const base = Buffer.alloc(BASE_BYTES);
  for (let i = 0; i < BASE_BYTES; i += 4096) base.writeUInt32LE(i / 4096, i);
  fs.writeFileSync(basePath, base);
  const nginx = await startNginx(path.join(work, "nginx"), path.join(work, "www"), {}, (fn) =>
    ctx.defer("stop nginx", fn),
  );
  const url = `${nginx.baseUrl}base.raw`;
  const make = async (name: string, backing: string) => {
    const file = path.join(work, `${name}.add-cow`);
    const prev = process.env.ADDCOW_CACHE_DIR;
    process.env.ADDCOW_CACHE_DIR = "none";
    try {
      await createDisk({
        file,
        image: path.join(work, `${name}.raw`),
        backing,
        backingFormat: "raw",
      });
    } finally {
      if (prev === undefined) delete process.env.ADDCOW_CACHE_DIR;
      else process.env.ADDCOW_CACHE_DIR = prev;
    }
    return file;
  };
  const local = await make("local", basePath);
  const remote = await make("remote", url);

  ctx.log("start-up");
  const startup: Record<string, number[]> = { node: [], version: [], mountVersion: [], info: [] };
  for (let i = 0; i < repeat; i++) {
    startup.node!.push(await wallMs(NODE, ["-e", "0"], env));
    startup.version!.push(await wallMs(NODE, [ADDCOW, "--version"], env));
    startup.mountVersion!.push(await wallMs(NODE, [addcowMountJs, "--version"], env));
    startup.info!.push(await wallMs(NODE, [ADDCOW, "info", local], env));
  }

  ctx.log("one mount");
  const host = `bench-${process.pid}`;
  const stopHost = await startHost(ctx, host, env);
  const one: Record<string, number[]> = {
    local: [],
    remote: [],
    hostLocal: [],
    hostRemote: [],
    rssLocal: [],
    rssRemote: [],
    rssRemoteRead: [],
  };
  for (let i = 0; i < repeat; i++) {
    for (const [kind, file] of [
      ["local", local],
      ["remote", remote],
    ] as const) {
      const dir = path.join(work, `mnt-${kind}`);
      ctx.defer(`unmount ${dir}`, () => lazyUnmount(dir));
      one[kind]!.push(await wallMs(NODE, [addcowMountJs, file, dir], env));
      const pid = daemonOf(dir);
      one[kind === "local" ? "rssLocal" : "rssRemote"]!.push(rss(pid));
      if (kind === "remote") {
        await readAndCompare(path.join(dir, kind), base, 0, BASE_BYTES);
        one.rssRemoteRead!.push(rss(pid));
      }
      await unmountAndWait(dir, pid);
      const hdir = path.join(work, `hmnt-${kind}`);
      ctx.defer(`unmount ${hdir}`, () => lazyUnmount(hdir));
      const key = kind === "local" ? "hostLocal" : "hostRemote";
      one[key]!.push(await wallMs(NODE, [addcowMountJs, "-o", `host=${host}`, file, hdir], env));
      await readAndCompare(path.join(hdir, kind), base, 0, 64 * 1024);
      await unmountAndWait(hdir, null);
      ctx.checkInterrupted();
    }
  }
  // Let the host's detaches finish before its memory is measured.
  await sleep(500);

  ctx.log(`${disks} overlays of one remote base in one host daemon`);
  // A host of its own with an empty block cache: what nginx serves is what the fleet fetched.
  await stopHost();
  const fleetEnv = { ...env, ADDCOW_CACHE_DIR: path.join(work, "cache-fleet") };
  const fleet = `${host}-fleet`;
  const stopFleet = await startHost(ctx, fleet, fleetEnv);
  const fleetPid = daemonOf(fleet);
  const files: string[] = [];
  for (let i = 0; i < disks; i++) files.push(await make(`vm${i}`, url));
  const served0 = nginx.requests().length;
  const rssBefore = rss(fleetPid);
  // The orchestrator's way (as with qemu-storage-daemon's QMP): one attach request per disk
  // over the host's socket, no process started per disk.
  const { ControlClient } = await import("../../src/control/client");
  const client = new ControlClient(path.join(work, "run", `host-${fleet}.ctl`));
  const ts = process.hrtime.bigint();
  for (let i = 0; i < disks; i++) {
    const dir = path.join(work, `vm-mnt${i}`);
    ctx.defer(`unmount ${dir}`, () => lazyUnmount(dir));
    await client.call({ op: "attach", files: [files[i]!], mountDir: dir, options: [], cwd: work });
  }
  const socketAttachMs = Number(process.hrtime.bigint() - ts) / 1e6;
  await inBatches(
    files.map((_, i) => i),
    ATTACH_PARALLEL,
    async (i) => {
      const offset = (i * READ_BYTES) % BASE_BYTES;
      await readAndCompare(path.join(work, `vm-mnt${i}`, `vm${i}`), base, offset, READ_BYTES);
    },
  );
  const rssSocketRead = rss(fleetPid);
  const coldRequests = nginx.requests().slice(served0);
  const td = process.hrtime.bigint();
  for (let i = 0; i < disks; i++) {
    await client.call({ op: "detach", mountDir: path.join(work, `vm-mnt${i}`) });
  }
  const detachMs = Number(process.hrtime.bigint() - td) / 1e6;
  const t0 = process.hrtime.bigint();
  await inBatches(
    files.map((f, i) => ({ f, i })),
    ATTACH_PARALLEL,
    async ({ f, i }) => {
      const dir = path.join(work, `vm-mnt${i}`);
      ctx.defer(`unmount ${dir}`, () => lazyUnmount(dir));
      await run(NODE, [addcowMountJs, "-o", `host=${fleet}`, f, dir], { env: fleetEnv });
    },
  );
  const attachMs = Number(process.hrtime.bigint() - t0) / 1e6;
  const rssAttached = rss(fleetPid);
  const t1 = process.hrtime.bigint();
  await inBatches(
    files.map((_, i) => i),
    ATTACH_PARALLEL,
    async (i) => {
      const offset = (i * READ_BYTES) % BASE_BYTES;
      await readAndCompare(path.join(work, `vm-mnt${i}`, `vm${i}`), base, offset, READ_BYTES);
    },
  );
  const readMs = Number(process.hrtime.bigint() - t1) / 1e6;
  const rssRead = rss(fleetPid);
  const requests = coldRequests;
  const fetched = requests.reduce((n, l) => n + Number(l.split(" ").pop()), 0);
  const t2 = process.hrtime.bigint();
  await stopFleet();
  const stopMs = Number(process.hrtime.bigint() - t2) / 1e6;

  const owned = Math.min(10, disks);
  ctx.log(`${owned} daemons of their own over the same base`);
  const own: number[] = [];
  for (let i = 0; i < owned; i++) {
    const dir = path.join(work, `own-mnt${i}`);
    ctx.defer(`unmount ${dir}`, () => lazyUnmount(dir));
    await run(NODE, [addcowMountJs, files[i]!, dir], { env });
    await readAndCompare(path.join(dir, `vm${i}`), base, (i * READ_BYTES) % BASE_BYTES, READ_BYTES);
  }
  for (let i = 0; i < owned; i++) own.push(rss(daemonOf(path.join(work, `own-mnt${i}`))));
  for (let i = 0; i < owned; i++) {
    const dir = path.join(work, `own-mnt${i}`);
    await unmountAndWait(dir, daemonOf(dir));
  }

  return {
    disks,
    startup: Object.fromEntries(Object.entries(startup).map(([k, v]) => [k, median(v)])),
    one: Object.fromEntries(Object.entries(one).map(([k, v]) => [k, median(v)])),
    fleet: {
      socketAttachMs,
      detachMs,
      rssSocketRead,
      attachMs,
      readMs,
      stopMs,
      rssBefore,
      rssAttached,
      rssRead,
      perDisk: rssSocketRead / disks,
      requests: requests.length,
      fetched,
    },
    ownDaemons: { count: own.length, total: own.reduce((a, b) => a + b, 0), each: median(own) },
  };
}

export const densitySuite: BenchSuite = {
  name: "density",
  description: "start-up, one mount, and a hundred overlays of one remote base in one host daemon",
  async run(ctx) {
    const d = await runDensity(ctx);
    const s = d.startup;
    const o = d.one;
    const f = d.fleet;
    const markdown = [
      "### Density (issue 21): `npm run bench -- --only density`",
      "",
      "| start-up (wall, median) | time | over `node -e 0` |",
      "|---|---|---|",
      `| \`node -e 0\` | ${fmtMs(s.node!)} | |`,
      `| \`addcow --version\` | ${fmtMs(s.version!)} | +${fmtMs(s.version! - s.node!)} |`,
      `| \`addcow-mount --version\` | ${fmtMs(s.mountVersion!)} | +${fmtMs(s.mountVersion! - s.node!)} |`,
      `| \`addcow info DISK\` | ${fmtMs(s.info!)} | +${fmtMs(s.info! - s.node!)} |`,
      "",
      "| one mount (until addcow-mount returns; median) | local base | remote base (nginx) |",
      "|---|---|---|",
      `| a daemon of its own | ${fmtMs(o.local!)} | ${fmtMs(o.remote!)} |`,
      `| attached to a running host daemon (\`-o host=\`) | ${fmtMs(o.hostLocal!)} | ${fmtMs(o.hostRemote!)} |`,
      `| RSS of a daemon of its own, mounted | ${fmtMiB(o.rssLocal!)} | ${fmtMiB(o.rssRemote!)} |`,
      `| the same after reading 64 MiB of it | | ${fmtMiB(o.rssRemoteRead!)} |`,
      "",
      `| ${d.disks} overlays of one 64 MiB remote base, one host daemon | |`,
      "|---|---|",
      `| time to mount all: attach requests on the host's socket, one after another | ${fmtMs(f.socketAttachMs)} (${fmtMs(f.socketAttachMs / d.disks)} per disk) |`,
      `| host RSS: empty / after mounting all and reading 4 MiB of each (cold cache) | ${fmtMiB(f.rssBefore)} / ${fmtMiB(f.rssSocketRead)} |`,
      `| RSS per disk (all included: ${fmtMiB(f.rssSocketRead)} / ${d.disks}) | ${fmtMiB(f.perDisk)} |`,
      `| what nginx served for the ${d.disks} disks (probes included) | ${f.requests} requests, ${fmtMiB(f.fetched)} |`,
      `| detach all on the socket (flush, unmount, close), one after another | ${fmtMs(f.detachMs)} |`,
      `| time to mount all again: ${d.disks} \`addcow-mount -o host=\` commands, ${ATTACH_PARALLEL} at a time | ${fmtMs(f.attachMs)} (${fmtMs(f.attachMs / d.disks)} per disk) |`,
      `| host RSS after that round: mounted / after the reads | ${fmtMiB(f.rssAttached)} / ${fmtMiB(f.rssRead)} |`,
      `| reads of that round: every disk compared with the base | ${fmtMs(f.readMs)} |`,
      `| SIGTERM to the host until all ${d.disks} are flushed and unmounted | ${fmtMs(f.stopMs)} |`,
      `| for comparison: ${d.ownDaemons.count} daemons of their own, same reads | ${fmtMiB(d.ownDaemons.each)} each, ${fmtMiB(d.ownDaemons.total)} together |`,
    ].join("\n");
    return { markdown, data: d };
  },
};
