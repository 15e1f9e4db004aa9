import * as fs from "node:fs";
import * as path from "node:path";
import type { BenchContext, BenchSuite } from "./suite";
import {
  addcowMountJs,
  fileIn,
  repoRoot,
  startDaemon,
  startQsdOverlay,
  type Mounted,
} from "./systems";
import { MiB, median, run, which, writeRandomFile } from "./util";
import { type FaultProxy, startNginx, startProxy } from "../helpers/remote-servers";

/**
 * A first boot from a remote base: reads of the base through the mounted
 * file of a fresh overlay, over loopback with added latency per request (a
 * delaying proxy in front of nginx; tc netem on the shared loopback would slow
 * every other process on the machine). Systems: addcow (1 MiB blocks, shared
 * cache) cold and warm (a second overlay, new daemon, cache kept), and the
 * peers qemu-storage-daemon with the curl driver under a qcow2 overlay and
 * nbdkit curl + cow filter + nbdfuse (neither keeps a cache across restarts:
 * their warm run is another cold one). The proxy counts requests and bytes.
 *
 * ADDCOW_REMOTE_BENCH_SIZE (default 256M) sets the base size.
 */
interface Workload {
  name: string;
  description: string;
  fio: string[];
}

const WORKLOADS: Workload[] = [
  {
    name: "boot-seq",
    description: "sequential 128K reads of the first 64 MiB",
    fio: ["--rw=read", "--bs=128k", "--io_size=64M"],
  },
  {
    name: "boot-rand",
    description: "random 4K reads over the whole base, 16 MiB",
    fio: ["--rw=randread", "--bs=4k", "--io_size=16M", "--randseed=42", "--norandommap"],
  },
];

const LATENCIES = [2, 20];
/** fio stops a run after this long; the table then shows what it read by then. */
const RUNTIME_S = 180;

interface Row {
  system: string;
  cache: "cold" | "warm";
  latencyMs: number;
  workload: string;
  secs: number[];
  /** Bytes fio read (less than the workload's when a run hit RUNTIME_S). */
  read: number[];
  requests: number[];
  bytes: number[];
}

type Starter = (ctx: BenchContext, dir: string, url: string) => Promise<Mounted>;

function sizeFromEnv(): number {
  const text = process.env.ADDCOW_REMOTE_BENCH_SIZE;
  if (!text) return 256 * MiB;
  const { parseSize } = require("../../src/util/size") as typeof import("../../src/util/size");
  return parseSize(text, "ADDCOW_REMOTE_BENCH_SIZE");
}

/**
 * addcow over the URL, or over `localBase` (the reference: what "local-disk
 * speed" means here), with the cache directory in env.
 */
function addcowStarter(size: number, env: NodeJS.ProcessEnv, localBase?: string): Starter {
  return async (ctx, dir, url) => {
    const file = path.join(dir, "disk.add-cow");
    const fullEnv = { ...process.env, ...env };
    const addcowJs = path.join(repoRoot, "dist/src/cli/addcow.js");
    await run(
      process.execPath,
      [addcowJs, "create", "-q", "-b", localBase ?? url, "-F", "raw", file],
      {
        env: fullEnv,
      },
    );
    const mnt = path.join(dir, "mnt");
    const args = [addcowMountJs, "-f", file, mnt];
    return startDaemon(ctx, "addcow", process.execPath, args, mnt, fileIn(mnt, size, "disk"), {
      env: fullEnv,
    });
  };
}

function qsdStarter(): Starter {
  return (ctx, dir, url) => startQsdOverlay(ctx, "qemu-storage-daemon", url, "raw", dir);
}

function nbdkitStarter(size: number): Starter {
  return async (ctx, dir, url) => {
    const mnt = path.join(dir, "mnt");
    fs.mkdirSync(mnt);
    return startDaemon(
      ctx,
      "nbdfuse",
      "nbdfuse",
      [mnt, "--command", "nbdkit", "-s", "--filter=cow", "curl", `url=${url}`],
      mnt,
      fileIn(mnt, size, "nbd"),
      { stopWith: "fusermount" },
    );
  };
}

function curlDriverMissing(): string | null {
  if (!which("qemu-storage-daemon") || !which("qemu-img"))
    return "qemu-storage-daemon not installed";
  const dirs = ["/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib/qemu"];
  return dirs.some((d) => fs.existsSync(path.join(d, "block-curl.so")))
    ? null
    : "qemu's curl driver is missing (apt install qemu-block-extra)";
}

function nbdkitCurlMissing(): string | null {
  if (!which("nbdkit") || !which("nbdfuse")) return "nbdkit/nbdfuse not installed";
  const r = require("node:child_process").spawnSync("nbdkit", ["curl", "--version"]);
  return r.status === 0 ? null : "nbdkit's curl plugin is missing";
}

/** Runs fio; returns wall seconds and the bytes it read (fio stops at --runtime). */
async function fioRun(file: string, w: Workload): Promise<{ secs: number; bytes: number }> {
  const t0 = process.hrtime.bigint();
  const r = await run("fio", [
    "--name=boot",
    `--filename=${file}`,
    "--ioengine=psync",
    "--direct=1",
    "--numjobs=1",
    `--runtime=${RUNTIME_S}`,
    "--output-format=json",
    ...w.fio,
  ]);
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))) as {
    jobs: Array<{ read: { io_bytes: number } }>;
  };
  return { secs, bytes: json.jobs[0]?.read.io_bytes ?? NaN };
}

export const remoteSuite: BenchSuite = {
  name: "remote",
  description:
    "first boot from a remote base: addcow (cold/warm cache) vs qsd curl and nbdkit curl",
  async run(ctx: BenchContext) {
    if (!which("nginx") || !which("fio")) {
      const why = "nginx or fio is not installed (bash .ci/setup)";
      return { markdown: `### Remote base\n\nSkipped: ${why}.`, data: { skipped: why } };
    }
    const size = sizeFromEnv();
    const dir = fs.mkdtempSync(path.join(ctx.workDir, "remote-"));
    ctx.defer("remove remote bench files", () => fs.rmSync(dir, { recursive: true, force: true }));
    const www = path.join(dir, "www");
    fs.mkdirSync(www);
    writeRandomFile(path.join(www, "base.raw"), size);
    const register = (fn: () => Promise<void>) => void ctx.defer("stop server", fn);
    const nginx = await startNginx(path.join(dir, "nginx"), www, {}, register);
    const proxy: FaultProxy = await startProxy(
      `http://127.0.0.1:${nginx.port}`,
      { kind: "pass" },
      register,
    );
    const url = `${proxy.url}/base.raw`;

    const systems: Array<{
      name: string;
      label: string;
      missing: string | null;
      start: (cacheDir: string) => Starter;
    }> = [
      {
        name: "addcow",
        label: "addcow (1 MiB blocks, shared cache)",
        missing: null,
        start: (c) => addcowStarter(size, { ADDCOW_CACHE_DIR: c }),
      },
      {
        name: "addcow-local",
        label: "addcow over a local base file (reference)",
        missing: null,
        start: () => addcowStarter(size, {}, path.join(www, "base.raw")),
      },
      {
        name: "qsd-curl",
        label: "qemu-storage-daemon curl + qcow2",
        missing: curlDriverMissing(),
        start: () => qsdStarter(),
      },
      {
        name: "nbdkit-curl",
        label: "nbdkit curl + cow + nbdfuse",
        missing: nbdkitCurlMissing(),
        start: () => nbdkitStarter(size),
      },
    ];
    const rows: Row[] = [];
    const skipped: string[] = [];
    for (let rep = 0; rep < ctx.repeat; rep++) {
      for (const latencyMs of LATENCIES) {
        for (const sys of systems) {
          // Remote systems are not in systems.ts: naming any of them narrows to those.
          const named = systems.filter((x) => ctx.only.named(x.name));
          if (named.length > 0 ? !named.includes(sys) : !ctx.only.has("system", sys.name)) {
            continue;
          }
          if (sys.missing) {
            if (rep === 0 && latencyMs === LATENCIES[0])
              skipped.push(`${sys.label}: ${sys.missing}`);
            continue;
          }
          for (const w of WORKLOADS) {
            if (!ctx.only.has("workload", w.name)) continue;
            const cacheDir = fs.mkdtempSync(path.join(dir, "cache-"));
            for (const cache of ["cold", "warm"] as const) {
              ctx.checkInterrupted();
              const runDir = fs.mkdtempSync(path.join(dir, `${sys.name}-`));
              proxy.mode = { kind: "pass" };
              const m = await sys.start(cacheDir)(ctx, runDir, url);
              try {
                proxy.mode = { kind: "delay", ms: latencyMs };
                const r0 = proxy.requests;
                const b0 = proxy.bytes;
                const { secs, bytes } = await fioRun(m.file, w);
                let row = rows.find(
                  (r) =>
                    r.system === sys.name &&
                    r.cache === cache &&
                    r.latencyMs === latencyMs &&
                    r.workload === w.name,
                );
                if (!row) {
                  row = {
                    system: sys.name,
                    cache,
                    latencyMs,
                    workload: w.name,
                    secs: [],
                    read: [],
                    requests: [],
                    bytes: [],
                  };
                  rows.push(row);
                }
                row.secs.push(secs);
                row.read.push(bytes);
                row.requests.push(proxy.requests - r0);
                row.bytes.push(proxy.bytes - b0);
                ctx.log(
                  `  remote ${sys.name} ${w.name} ${latencyMs} ms ${cache}: ${secs.toFixed(2)} s, ${proxy.requests - r0} requests, ${((proxy.bytes - b0) / MiB).toFixed(1)} MiB`,
                );
              } finally {
                await m.teardown();
                fs.rmSync(runDir, { recursive: true, force: true });
              }
            }
            fs.rmSync(cacheDir, { recursive: true, force: true });
          }
        }
      }
    }
    const label = (name: string) => systems.find((s) => s.name === name)!.label;
    const lines = rows.map((r) => {
      const t = median(r.secs);
      return `| ${label(r.system)} | ${r.workload} | ${r.latencyMs} ms | ${r.cache} | ${t.toFixed(2)} | ${(median(r.read) / t / MiB).toFixed(1)} | ${median(r.requests)} | ${(median(r.bytes) / MiB).toFixed(1)} |`;
    });
    const markdown = [
      `### Remote base (${size / MiB} MiB over http through a delaying proxy)`,
      "",
      "| system | workload | latency/request | cache | seconds | MiB/s | requests | MiB fetched |",
      "|---|---|---|---|---|---|---|---|",
      ...lines,
      "",
      `Workloads: ${WORKLOADS.map((w) => `${w.name} = ${w.description}`).join("; ")} (fio psync, O_DIRECT, one job, stopped after ${RUNTIME_S} s; MiB/s from what it read). ` +
        `Each run mounts a fresh overlay; "warm" is a second overlay with a new daemon: addcow's shared block cache is kept, the peers have no cache across restarts. Median of ${ctx.repeat} run(s).`,
      ...(skipped.length ? ["", `Skipped: ${skipped.join("; ")}.`] : []),
    ].join("\n");
    return { markdown, data: { size, latencies: LATENCIES, rows, skipped } };
  },
};
