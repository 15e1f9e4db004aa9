import * as fs from "node:fs";
import * as path from "node:path";
import { type FioResult, type Workload, fillFile, runFio, workloads } from "./fio";
import type { BenchContext, BenchSuite, SuiteReport } from "./suite";
import { type System, allSystems, optInSystems } from "./systems";
import { GiB, MiB, cpuSeconds, median, run, writeRandomFile } from "./util";

const BASE_SIZE = GiB;

interface Cell {
  runs: FioResult[];
  errors: string[];
}

interface Median {
  bw: number;
  iops: number;
  latUs: number;
  cpuUsPerIo: number;
  runs: number;
}

function medianOf(cell: Cell | undefined): Median | undefined {
  if (!cell || cell.runs.length === 0) return undefined;
  return {
    bw: median(cell.runs.map((r) => r.bw)),
    iops: median(cell.runs.map((r) => r.iops)),
    latUs: median(cell.runs.map((r) => r.latUs)),
    cpuUsPerIo: median(cell.runs.map((r) => r.cpuUsPerIo ?? NaN)),
    runs: cell.runs.length,
  };
}

const fmtMBs = (bw: number) => (bw / 1e6).toFixed(bw >= 100e6 ? 0 : 1);
const fmtIops = (iops: number) =>
  iops >= 10_000 ? `${(iops / 1000).toFixed(1)}k` : iops.toFixed(0);
const fmtRatio = (r: number) => (Number.isFinite(r) ? `${r.toFixed(2)}x` : "-");

/** What the issue asks of addcow on each workload. */
function targets(w: Workload): { ceiling: number; qsd: number } {
  return {
    ceiling: w.name === "randwrite-cow" ? 0.75 : 0.9,
    qsd: w.fdatasync ? 2 : 1,
  };
}

async function runOne(
  ctx: BenchContext,
  sys: System,
  base: string,
  w: Workload,
  cell: Cell,
): Promise<void> {
  const dir = fs.mkdtempSync(path.join(ctx.workDir, `${sys.name}-${w.name}-`));
  try {
    const mounted = await sys.start(ctx, base, dir, w);
    try {
      if (w.prefill) await fillFile(mounted.file, BASE_SIZE);
      // Start every timed run from a quiet disk: the previous run's dirty pages
      // and the discards of its deleted files would otherwise land in this one.
      await run("sync", []);
      const cpu0 = cpuSeconds(mounted.pid);
      const result = await runFio(mounted.file, BASE_SIZE, w, ctx.time);
      const cpu = cpuSeconds(mounted.pid) - cpu0;
      if (Number.isFinite(cpu) && result.ios > 0) result.cpuUsPerIo = (cpu * 1e6) / result.ios;
      cell.runs.push(result);
    } finally {
      await mounted.teardown();
    }
  } catch (err) {
    ctx.checkInterrupted();
    const msg = (err as Error).message;
    cell.errors.push(msg);
    ctx.log(`  ${sys.name} ${w.name} FAILED: ${msg}`);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

function report(
  systems: System[],
  skipped: string[],
  wls: Workload[],
  cells: Map<string, Cell>,
): SuiteReport {
  const key = (s: System, w: Workload) => `${s.name}/${w.name}`;
  const med = (s: System, w: Workload) => medianOf(cells.get(key(s, w)));
  const notes = new Map<string, string>();
  const lines: string[] = [];

  lines.push("### Results (median per cell)", "");
  lines.push(`| system | ${wls.map((w) => w.name).join(" | ")} |`);
  lines.push(`|---|${wls.map(() => "---:").join("|")}|`);
  for (const s of systems) {
    const row = wls.map((w) => {
      const m = med(s, w);
      const mark = s.mark?.(w);
      if (mark) notes.set(mark.sign, mark.text);
      if (!m) return cells.get(key(s, w))?.errors.length ? "failed" : "-";
      return `${fmtMBs(m.bw)} MB/s<br>${fmtIops(m.iops)} IOPS${mark ? " " + mark.sign : ""}`;
    });
    lines.push(`| ${s.label} | ${row.join(" | ")} |`);
  }
  lines.push("");
  for (const [sign, text] of notes) lines.push(`${sign} ${text}.  `);
  for (const s of skipped) lines.push(`Skipped: ${s}.  `);

  // CPU time is far steadier than throughput on a shared machine: it shows the cost per request.
  lines.push("", "### Daemon CPU time per fio I/O (user + system, all threads; µs, median)", "");
  lines.push(`| system | ${wls.map((w) => w.name).join(" | ")} |`);
  lines.push(`|---|${wls.map(() => "---:").join("|")}|`);
  for (const s of systems) {
    if (s.kind === "reference") continue;
    const row = wls.map((w) => {
      const cpu = med(s, w)?.cpuUsPerIo;
      return cpu === undefined || !Number.isFinite(cpu) ? "-" : cpu.toFixed(0);
    });
    lines.push(`| ${s.label} | ${row.join(" | ")} |`);
  }
  lines.push(
    "",
    "A 1 MiB fio I/O is 8 FUSE requests of 128 KiB. nbdkit's CPU is not counted (only nbdfuse's).",
  );

  const addcow = systems.find((s) => s.name === "addcow");
  const qsd = systems.find((s) => s.name === "qsd");
  const ceil = systems.find((s) => s.name === "ceiling");
  const peers = systems.filter((s) => s.kind === "peer");
  const summary: Record<string, unknown> = {};
  if (addcow) {
    lines.push("", "### addcow against the peers and the ceiling (IOPS ratios)", "");
    lines.push(
      "| workload | addcow | best peer | vs best peer | vs qsd (target) | vs ceiling (target) |",
    );
    lines.push("|---|---:|---|---:|---:|---:|");
    for (const w of wls) {
      const a = med(addcow, w);
      if (!a) continue;
      // A non-durable fdatasync is not a fair peer for a durable one.
      const fair = peers.filter((p) => !w.fdatasync || p.durable);
      let best: { s: System; m: Median } | undefined;
      for (const p of fair) {
        const m = med(p, w);
        if (m && (!best || m.iops > best.m.iops)) best = { s: p, m };
      }
      const q = qsd ? med(qsd, w) : undefined;
      const c = ceil ? med(ceil, w) : undefined;
      const t = targets(w);
      const vsBest = best ? a.iops / best.m.iops : NaN;
      const vsQsd = q ? a.iops / q.iops : NaN;
      const vsCeil = c ? a.iops / c.iops : NaN;
      const ok = (r: number, goal: number, strict: boolean) =>
        Number.isFinite(r) ? ((strict ? r > goal : r >= goal) ? "met" : "**missed**") : "";
      lines.push(
        `| ${w.name} | ${fmtIops(a.iops)} IOPS | ${best ? best.s.name : "-"} | ${fmtRatio(vsBest)} | ` +
          `${fmtRatio(vsQsd)} (${t.qsd === 1 ? ">1" : ">=" + t.qsd}: ${ok(vsQsd, t.qsd, t.qsd === 1)}) | ` +
          `${fmtRatio(vsCeil)} (>=${t.ceiling}: ${ok(vsCeil, t.ceiling, false)}) |`,
      );
      summary[w.name] = {
        addcowIops: a.iops,
        bestPeer: best?.s.name ?? null,
        vsBestPeer: vsBest,
        vsQsd,
        vsCeiling: vsCeil,
      };
    }
  }
  lines.push("", "Workloads (fio, psync, 1 GiB file):", "");
  for (const w of wls) lines.push(`- \`${w.name}\`: ${w.description}`);

  const data = {
    baseSize: BASE_SIZE,
    systems: systems.map((s) => ({
      name: s.name,
      label: s.label,
      kind: s.kind,
      durable: s.durable,
    })),
    skipped,
    workloads: wls,
    results: Object.fromEntries(
      [...cells].map(([k, c]) => [k, { median: medianOf(c) ?? null, ...c }]),
    ),
    summary,
  };
  return { markdown: lines.join("\n"), data };
}

export const fioSuite: BenchSuite = {
  name: "fio",
  description:
    "fio workloads on a fresh overlay over a 1 GiB random base, every system interleaved",
  async run(ctx) {
    const skipped: string[] = [];
    const systems = allSystems().filter((s) => {
      if (optInSystems.has(s.name) ? !ctx.only.named(s.name) : !ctx.only.has("system", s.name))
        return false;
      const why = s.missing();
      if (why) skipped.push(`${s.name}: ${why}`);
      return !why;
    });
    const wls = workloads.filter((w) => ctx.only.has("workload", w.name));
    const base = path.join(ctx.workDir, "base.raw");
    ctx.log(`writing ${BASE_SIZE / MiB} MiB random base ${base}`);
    writeRandomFile(base, BASE_SIZE);
    const cells = new Map<string, Cell>();
    for (let rep = 0; rep < ctx.repeat; rep++) {
      for (const w of wls) {
        // Rotate the order each repeat so no system always runs first.
        const order = systems.map((_, i) => systems[(i + rep) % systems.length] as System);
        for (const s of order) {
          ctx.checkInterrupted();
          const k = `${s.name}/${w.name}`;
          const cell = cells.get(k) ?? { runs: [], errors: [] };
          cells.set(k, cell);
          await runOne(ctx, s, base, w, cell);
          const last = cell.runs[cell.runs.length - 1];
          if (last && cell.runs.length + cell.errors.length === rep + 1) {
            const cpu =
              last.cpuUsPerIo === undefined
                ? ""
                : `  daemon CPU ${last.cpuUsPerIo.toFixed(1)} us/io`;
            ctx.log(
              `  [${rep + 1}/${ctx.repeat}] ${w.name.padEnd(14)} ${s.name.padEnd(13)} ${fmtMBs(last.bw).padStart(6)} MB/s ${fmtIops(last.iops).padStart(7)} IOPS${cpu}`,
            );
          }
        }
      }
    }
    return report(systems, skipped, wls, cells);
  },
};
