/**
 * `npm run bench`: runs every registered suite (suites.ts) and prints the
 * tables; writes bench-results/bench-<time>.json and bench-results/latest.md,
 * and with --update-md the generated part of BENCHMARKS.md.
 *
 *   npm run bench -- [--time S] [--repeat N] [--only a,b,...] [--update-md]
 *
 * --only takes suite, system and workload names; in each of those categories
 * where a name matches, only the named ones run (e.g. --only addcow,qsd,randread).
 * Opt-in rows (fuse-null, ceiling-async, ceiling-small, addcow-alt) are added
 * to the default set by naming them.
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { BenchContext, Selection, SuiteReport } from "./suite";
import { suites } from "./suites";
import { allSystems, optInSystems } from "./systems";
import { workloads } from "./fio";
import { repoRoot } from "./systems";
import { run } from "./util";

interface Options {
  time: number;
  repeat: number;
  only: string[];
  updateMd: boolean;
}

const USAGE =
  "usage: npm run bench -- [--time SECONDS] [--repeat N] [--only name,name,...] [--update-md]";

function parseOptions(argv: string[]): Options {
  const opts: Options = { time: 10, repeat: 1, only: [], updateMd: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const value = () => {
      const v = argv[++i];
      if (v === undefined) throw new Error(`${a} needs a value\n${USAGE}`);
      return v;
    };
    const positive = (v: string) => {
      const n = Number(v);
      if (!Number.isInteger(n) || n < 1)
        throw new Error(`${a} takes a whole number >= 1, not ${v}`);
      return n;
    };
    if (a === "--time") opts.time = positive(value());
    else if (a === "--repeat") opts.repeat = positive(value());
    else if (a === "--only") opts.only.push(...value().split(",").filter(Boolean));
    else if (a === "--update-md") opts.updateMd = true;
    else if (a === "--help" || a === "-h") {
      console.log(USAGE);
      process.exit(0);
    } else throw new Error(`unknown option ${a}\n${USAGE}`);
  }
  return opts;
}

function makeSelection(only: string[]): Selection {
  const known = {
    suite: suites.map((s) => s.name),
    system: allSystems().map((s) => s.name),
    workload: workloads.map((w) => w.name),
  };
  const all = new Set([...known.suite, ...known.system, ...known.workload]);
  for (const name of only) {
    // Suites added later may have their own names; accept anything a suite might check.
    if (!all.has(name))
      process.stderr.write(`note: --only ${name} matches no built-in suite, system or workload\n`);
  }
  return {
    has(category, name) {
      // Opt-in rows (e.g. fuse-null) are added by naming them; they do not narrow the default set.
      const named = only.filter(
        (n) => known[category].includes(n) && !(category === "system" && optInSystems.has(n)),
      );
      return named.length === 0 || named.includes(name);
    },
    named: (name) => only.includes(name),
  };
}

function machine(): Record<string, unknown> {
  const cpus = os.cpus();
  return {
    cpu: cpus[0]?.model ?? "unknown",
    cores: cpus.length,
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    node: process.version,
    loadavg: os.loadavg(),
  };
}

async function main(): Promise<number> {
  const opts = parseOptions(process.argv.slice(2));
  const workDir = fs.mkdtempSync(path.join(os.tmpdir(), "addcow-bench-"));
  const undo: Array<{ what: string; fn: () => Promise<void> | void; done: boolean }> = [];
  let interrupted = false;
  const log = (msg: string) => process.stderr.write(`${msg}\n`);
  const ctx: BenchContext = {
    time: opts.time,
    repeat: opts.repeat,
    only: makeSelection(opts.only),
    workDir,
    log,
    defer(what, fn) {
      const entry = { what, fn, done: false };
      undo.push(entry);
      return async () => {
        if (entry.done) return;
        entry.done = true;
        undo.splice(undo.indexOf(entry), 1);
        await fn();
      };
    },
    checkInterrupted() {
      if (interrupted) throw new Error("interrupted");
    },
  };
  const cleanup = async () => {
    while (undo.length) {
      const entry = undo.pop();
      if (!entry || entry.done) continue;
      entry.done = true;
      try {
        await entry.fn();
      } catch (err) {
        log(`cleanup (${entry.what}) failed: ${(err as Error).message}`);
      }
    }
    fs.rmSync(workDir, { recursive: true, force: true });
  };
  const onSignal = (sig: NodeJS.Signals) => {
    if (interrupted) return log(`${sig} again: still cleaning up mounts and daemons, please wait`);
    interrupted = true;
    log(`${sig}: stopping after the current step, then cleaning up`);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);

  const started = new Date();
  const startMachine = machine();
  const reports: Array<{ name: string; report: SuiteReport }> = [];
  let failed = false;
  try {
    log(`work dir ${workDir}; ${opts.time} s per run, ${opts.repeat} repeat(s)`);
    for (const suite of suites) {
      if (!ctx.only.has("suite", suite.name)) continue;
      log(`== ${suite.name}: ${suite.description}`);
      const report = await suite.run(ctx);
      reports.push({ name: suite.name, report });
      if (report.markdown) console.log(`\n${report.markdown}\n`);
    }
  } catch (err) {
    failed = true;
    log(interrupted ? "interrupted" : `benchmark failed: ${(err as Error).stack ?? err}`);
  } finally {
    await cleanup();
  }
  if (reports.length === 0) return interrupted ? 130 : failed ? 1 : 0;

  const endLoad = os.loadavg();
  const m = startMachine;
  const header = [
    `Measured ${started.toISOString().slice(0, 16).replace("T", " ")} UTC on ${m.cpu} (${m.cores} cores), ` +
      `${m.memGiB} GiB, Linux ${m.kernel}, Node ${m.node}; ${opts.time} s per run, median of ${opts.repeat}.`,
    `Load average at start ${(m.loadavg as number[]).map((l) => l.toFixed(2)).join(" ")}, ` +
      `at end ${endLoad.map((l) => l.toFixed(2)).join(" ")}` +
      (Math.max(...endLoad, ...(m.loadavg as number[])) > 0.7
        ? " (other work ran on the machine meanwhile)."
        : "."),
  ].join("  \n");
  const markdown = [
    header,
    ...reports.filter((r) => r.report.markdown).map((r) => r.report.markdown),
  ].join("\n\n");

  const outDir = path.join(repoRoot, "bench-results");
  fs.mkdirSync(outDir, { recursive: true });
  const stamp = started.toISOString().replace(/[:.]/g, "-");
  const jsonFile = path.join(outDir, `bench-${stamp}.json`);
  const json = {
    started: started.toISOString(),
    options: opts,
    machine: startMachine,
    endLoadavg: endLoad,
    interrupted,
    suites: Object.fromEntries(reports.map((r) => [r.name, r.report.data])),
  };
  fs.writeFileSync(jsonFile, JSON.stringify(json, null, 2) + "\n");
  fs.writeFileSync(path.join(outDir, "latest.md"), markdown + "\n");
  log(`results: ${jsonFile}`);
  if (opts.updateMd && !interrupted) {
    const mdFile = path.join(repoRoot, "BENCHMARKS.md");
    const begin = "<!-- bench:begin -->";
    const end = "<!-- bench:end -->";
    const text = fs.existsSync(mdFile)
      ? fs.readFileSync(mdFile, "utf8")
      : `# Benchmarks\n\n${begin}\n${end}\n`;
    const a = text.indexOf(begin);
    const b = text.indexOf(end);
    if (a < 0 || b < a) throw new Error(`${mdFile} lacks the ${begin} ... ${end} markers`);
    fs.writeFileSync(mdFile, `${text.slice(0, a + begin.length)}\n${markdown}\n${text.slice(b)}`);
    // Keep `npm test`'s prettier --check green: let prettier align the tables.
    await run(path.join(repoRoot, "node_modules/.bin/prettier"), ["--write", mdFile], {
      allowFail: true,
    });
    log(`updated ${mdFile}`);
  }
  return interrupted ? 130 : failed ? 1 : 0;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    process.stderr.write(`${(err as Error).message}\n`);
    process.exit(1);
  },
);
