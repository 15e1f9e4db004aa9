import * as fs from "node:fs";
import * as path from "node:path";
import type { BenchContext, BenchSuite } from "./suite";
import { MiB, median, run } from "./util";
import { repoRoot } from "./systems";
import {
  TRACE,
  addcowStarter,
  fioRun,
  serversMissing,
  traceReads,
  writeIolog,
} from "./remote-bench";
import { type FaultProxy, startNginx, startProxy } from "../helpers/remote-servers";
import { nextVersion, someBlocks } from "../helpers/manifests";
import { pattern } from "../helpers/pattern";

/**
 * Verified blocks and the cache by digest (docs/remote.md, "Verified
 * blocks"): what checking every block against a manifest costs, and what two
 * versions of a base share. The remote suite's setup (nginx behind a proxy
 * adding 2 ms per request, a fresh overlay and daemon per run, fio replaying
 * an iolog), over a 256 MiB base v1 and its v2 with 5% of its 64 KiB blocks
 * changed, spread at random; served three times under other names: without
 * a manifest, with a 64 KiB manifest (the default), with a 1 MiB one. The
 * proxy counts requests and bytes.
 *
 *   boot, rand  the remote suite's recorded boot and 1024 random 4 KiB reads, cold then warm;
 *   seq         sequential 128 KiB reads of the whole base, cold then warm;
 *   v2 seq      the whole of v2 read after the whole of v1 (v1 cached).
 *
 * seq runs again with the cache on tmpfs (/dev/shm): a 64 KiB manifest makes
 * a cache file per 64 KiB block instead of per 1 MiB, and creating a file
 * costs what the cache's file system makes it cost.
 */
const LATENCY_MS = 2;
const SIZE = 256 * MiB;
const BS = 64 * 1024;
const KINDS = [
  { name: "none", label: "no manifest (cache by URL)", blockSize: null },
  { name: "m64k", label: "64 KiB manifest (default)", blockSize: "64K" },
  { name: "m1m", label: "1 MiB manifest", blockSize: "1M" },
] as const;
const TMPFS = "/dev/shm";

interface Row {
  kind: string;
  workload: string;
  cache: string;
  secs: number[];
  read: number[];
  requests: number[];
  bytes: number[];
}

function reads(name: string): Array<[number, number]> {
  if (name === "boot") return traceReads(TRACE).filter(([off, len]) => off + len <= SIZE);
  if (name === "rand") {
    let seed = 42;
    return Array.from({ length: 1024 }, () => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return [((seed >>> 8) % Math.floor(SIZE / 4096)) * 4096, 4096];
    });
  }
  return Array.from({ length: SIZE / (128 * 1024) }, (_, i) => [i * 128 * 1024, 128 * 1024]);
}

export const verifySuite: BenchSuite = {
  name: "remote-verify",
  description:
    "verified blocks: the cost of checking against a manifest, and v2 (5% changed) after v1",
  async run(ctx: BenchContext) {
    const missing = serversMissing("Verified blocks");
    if (missing) return missing;
    const dir = fs.mkdtempSync(path.join(ctx.workDir, "verify-"));
    ctx.defer("remove verify bench files", () => fs.rmSync(dir, { recursive: true, force: true }));
    const www = path.join(dir, "www");
    fs.mkdirSync(www);
    const v1 = pattern(SIZE, 20);
    const changed = someBlocks(SIZE / BS, Math.round((SIZE / BS) * 0.05), 21);
    const data = { v1, v2: nextVersion(v1, BS, changed, 7000) };
    const addcowJs = path.join(repoRoot, "dist/src/cli/addcow.js");
    for (const v of ["v1", "v2"] as const) {
      const file = path.join(www, `none-${v}.raw`);
      fs.writeFileSync(file, data[v]);
      for (const k of KINDS) {
        if (k.blockSize === null) continue;
        const name = path.join(www, `${k.name}-${v}.raw`);
        fs.linkSync(file, name);
        await run(process.execPath, [
          addcowJs,
          "manifest",
          "-q",
          "--block-size",
          k.blockSize,
          name,
          "-o",
          `${name}.manifest`,
        ]);
      }
    }
    const register = (fn: () => Promise<void>) => void ctx.defer("stop server", fn);
    const nginx = await startNginx(path.join(dir, "nginx"), www, {}, register);
    const proxy: FaultProxy = await startProxy(
      `http://127.0.0.1:${nginx.port}`,
      { kind: "pass" },
      register,
    );
    const iologs = new Map<string, string>();
    for (const w of ["boot", "seq", "rand"]) {
      const file = path.join(dir, `${w}.iolog`);
      writeIolog(file, reads(w));
      iologs.set(w, file);
    }

    const rows: Row[] = [];
    /** One run: a fresh overlay and daemon over `name`, the iolog replayed; measured unless `quiet`. */
    const once = async (
      kind: string,
      name: string,
      workload: string,
      cache: string,
      cacheDir: string,
      quiet = false,
    ) => {
      ctx.checkInterrupted();
      const runDir = fs.mkdtempSync(path.join(dir, "run-"));
      proxy.mode = { kind: "pass" };
      const m = await addcowStarter(SIZE, { ADDCOW_CACHE_DIR: cacheDir })(
        ctx,
        runDir,
        `${proxy.url}/${name}`,
      );
      try {
        proxy.mode = { kind: "delay", ms: LATENCY_MS };
        const r0 = proxy.requests;
        const b0 = proxy.bytes;
        const { secs, bytes } = await fioRun(m.file, iologs.get(workload)!);
        if (quiet) return;
        let row = rows.find((r) => r.kind === kind && r.workload === workload && r.cache === cache);
        if (!row) {
          row = { kind, workload, cache, secs: [], read: [], requests: [], bytes: [] };
          rows.push(row);
        }
        row.secs.push(secs);
        row.read.push(bytes);
        row.requests.push(proxy.requests - r0);
        row.bytes.push(proxy.bytes - b0);
        ctx.log(
          `  verify ${kind} ${workload} ${cache}: ${secs.toFixed(2)} s, ${proxy.requests - r0} requests, ${((proxy.bytes - b0) / MiB).toFixed(1)} MiB`,
        );
      } finally {
        await m.teardown();
        fs.rmSync(runDir, { recursive: true, force: true });
      }
    };
    for (let rep = 0; rep < ctx.repeat; rep++) {
      for (const k of KINDS) {
        for (const w of ["boot", "seq", "rand"]) {
          if (!ctx.only.has("workload", w)) continue;
          const cacheDir = fs.mkdtempSync(path.join(dir, "cache-"));
          await once(k.name, `${k.name}-v1.raw`, w, "cold", cacheDir);
          await once(k.name, `${k.name}-v1.raw`, w, "warm", cacheDir);
          fs.rmSync(cacheDir, { recursive: true, force: true });
        }
        if (!ctx.only.has("workload", "seq")) continue;
        const cacheDir = fs.mkdtempSync(path.join(dir, "cache-"));
        await once(k.name, `${k.name}-v1.raw`, "seq", "v1", cacheDir, true);
        await once(k.name, `${k.name}-v2.raw`, "seq", "v1 cached", cacheDir);
        fs.rmSync(cacheDir, { recursive: true, force: true });
        if (k.name === "m1m" || !fs.existsSync(TMPFS)) continue;
        const shm = fs.mkdtempSync(path.join(TMPFS, "addcow-verify-"));
        const undo = ctx.defer("remove tmpfs cache", () =>
          fs.rmSync(shm, { recursive: true, force: true }),
        );
        await once(`${k.name}-tmpfs`, `${k.name}-v1.raw`, "seq", "cold", shm);
        await once(`${k.name}-tmpfs`, `${k.name}-v1.raw`, "seq", "warm", shm);
        await undo();
      }
    }
    const label = (kind: string) => {
      const k = KINDS.find((x) => kind.startsWith(x.name))!;
      return kind.endsWith("-tmpfs") ? `${k.label}, cache on tmpfs` : k.label;
    };
    const lines = rows.map((r) => {
      const t = median(r.secs);
      const base = r.cache === "v1 cached" ? "v2" : "v1";
      return `| ${label(r.kind)} | ${base} ${r.workload} | ${r.cache} | ${t.toFixed(2)} | ${(median(r.read) / t / MiB).toFixed(1)} | ${median(r.requests)} | ${(median(r.bytes) / MiB).toFixed(1)} |`;
    });
    const markdown = [
      `### Verified blocks (${SIZE / MiB} MiB, ${LATENCY_MS} ms per request)`,
      "",
      "| base served | workload | cache | seconds | MiB/s | requests | MiB fetched |",
      "|---|---|---|---|---|---|---|",
      ...lines,
      "",
      `v2 differs from v1 in ${changed.length} of ${SIZE / BS} 64 KiB blocks (${((changed.length * 100 * BS) / SIZE).toFixed(1)}%, ${((changed.length * BS) / MiB).toFixed(1)} MiB), spread at random. ` +
        `"v1 cached": v2 read whole after v1 was read whole into the same cache. Median of ${ctx.repeat} run(s).`,
    ].join("\n");
    return { markdown, data: { size: SIZE, latencyMs: LATENCY_MS, changed: changed.length, rows } };
  },
};
