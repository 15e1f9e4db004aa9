import * as fs from "node:fs";
import * as path from "node:path";
import type { BenchContext, BenchSuite } from "./suite";
import { repoRoot } from "./systems";
import { GiB, MiB, median, run, timed, which, writeRandomFile } from "./util";

/**
 * Streaming a half-allocated overlay into a standalone raw disk: `addcow
 * stream` (1 and 16 copies in flight) against the qemu-img ways of doing the
 * same with an equivalent qcow2 overlay: `qemu-img rebase -b ''` (copies the
 * backing data into the overlay) and `qemu-img convert -O raw` (writes a new
 * raw file). Every run starts from the same state (fresh copies of template
 * files); the base file is hot in the page cache for everyone. Times are to
 * the end of the tool and to the end of a following `sync` (data on disk).
 *
 * ADDCOW_JOBS_BENCH_SIZE (e.g. 512M) shortens runs while developing; default 4G.
 */
const CHUNK = 2 * MiB;

function sizeFromEnv(): number {
  const text = process.env.ADDCOW_JOBS_BENCH_SIZE;
  if (!text) return 4 * GiB;
  const { parseSize } = require("../../src/util/size") as typeof import("../../src/util/size");
  return parseSize(text, "ADDCOW_JOBS_BENCH_SIZE");
}

interface Row {
  name: string;
  description: string;
  secs: number[];
  secsSynced: number[];
}

export const jobsSuite: BenchSuite = {
  name: "jobs",
  description: "addcow stream vs qemu-img rebase -b '' and qemu-img convert -O raw",
  async run(ctx: BenchContext) {
    const addcowJs = path.join(repoRoot, "dist/src/cli/addcow.js");
    const size = sizeFromEnv();
    if (!which("qemu-img") || !fs.existsSync(addcowJs)) {
      const why = !which("qemu-img") ? "qemu-img is not installed" : `${addcowJs} is not built`;
      return { markdown: `### Stream\n\nSkipped: ${why}.`, data: { skipped: why } };
    }
    const dir = fs.mkdtempSync(path.join(ctx.workDir, "jobs-"));
    ctx.defer("remove stream bench files", () => fs.rmSync(dir, { recursive: true, force: true }));
    const f = (name: string) => path.join(dir, name);
    ctx.log(`stream bench: ${size / GiB} GiB base, half of it overwritten in the overlay`);
    writeRandomFile(f("base.raw"), size);

    // Templates: the add-cow overlay (metadata + sparse image) and the equivalent qcow2 overlay.
    const { createDisk } = require("../../src/ops/create") as typeof import("../../src/ops/create");
    const { openDisk } =
      require("../../src/chain/open-chain") as typeof import("../../src/chain/open-chain");
    await createDisk({
      file: f("ov.add-cow"),
      image: f("ov.raw"),
      backing: f("base.raw"),
      backingFormat: "raw",
    });
    await run("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-b",
      f("base.raw"),
      "-F",
      "raw",
      f("ov.qcow2"),
    ]);
    const data = Buffer.alloc(CHUNK, 0x5a);
    const dev = await openDisk(f("ov.add-cow"), { writable: true });
    const qemuWrites: string[] = [];
    try {
      // Every other 2 MiB region is written in the overlay: half allocated.
      for (let off = 0; off < size; off += 2 * CHUNK) {
        await dev.write(data.subarray(0, Math.min(CHUNK, size - off)), off);
        qemuWrites.push("-c", `write -q -P 0x5a ${off} ${Math.min(CHUNK, size - off)}`);
      }
    } finally {
      await dev.close();
    }
    for (let i = 0; i < qemuWrites.length; i += 512) {
      await run("qemu-io", ["-f", "qcow2", ...qemuWrites.slice(i, i + 512), f("ov.qcow2")]);
    }
    // Saved states every run starts from.
    fs.copyFileSync(f("ov.add-cow"), f("tmpl.add-cow-meta"));
    await run("cp", ["--sparse=always", f("ov.raw"), f("tmpl.add-cow-image")]);
    fs.copyFileSync(f("ov.qcow2"), f("tmpl.qcow2"));

    const freshAddcow = async () => {
      fs.copyFileSync(f("tmpl.add-cow-meta"), f("ov.add-cow"));
      await run("cp", ["--sparse=always", f("tmpl.add-cow-image"), f("ov.raw")]);
    };
    const freshQcow2 = () => run("cp", [f("tmpl.qcow2"), f("ov.qcow2")]);
    const clean = () => {
      fs.rmSync(f("out.raw"), { force: true });
    };

    const rows: Row[] = [
      { name: "addcow-1", description: "addcow stream -n 1", secs: [], secsSynced: [] },
      { name: "addcow-16", description: "addcow stream -n 16", secs: [], secsSynced: [] },
      {
        name: "addcow-16-sync",
        description: "addcow stream -n 16, ADDCOW_IO=sync",
        secs: [],
        secsSynced: [],
      },
      { name: "qemu-rebase", description: "qemu-img rebase -b ''", secs: [], secsSynced: [] },
      { name: "qemu-convert", description: "qemu-img convert -O raw", secs: [], secsSynced: [] },
    ];
    const runners: Record<string, { prep: () => Promise<unknown>; go: () => Promise<unknown> }> = {
      "addcow-1": {
        prep: freshAddcow,
        go: () => run(process.execPath, [addcowJs, "stream", "-q", "-n", "1", f("ov.add-cow")]),
      },
      "addcow-16": {
        prep: freshAddcow,
        go: () => run(process.execPath, [addcowJs, "stream", "-q", "-n", "16", f("ov.add-cow")]),
      },
      "addcow-16-sync": {
        prep: freshAddcow,
        go: () =>
          run(process.execPath, [addcowJs, "stream", "-q", "-n", "16", f("ov.add-cow")], {
            env: { ...process.env, ADDCOW_IO: "sync" },
          }),
      },
      "qemu-rebase": {
        prep: freshQcow2,
        go: () => run("qemu-img", ["rebase", "-q", "-f", "qcow2", "-b", "", f("ov.qcow2")]),
      },
      "qemu-convert": {
        prep: freshQcow2,
        go: () =>
          run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", f("ov.qcow2"), f("out.raw")]),
      },
    };
    // Read the base once so every tool starts with it in the page cache.
    await run("dd", [`if=${f("base.raw")}`, "of=/dev/null", "bs=1M"]);
    for (let rep = 0; rep < ctx.repeat; rep++) {
      for (const row of rows) {
        if (!ctx.only.has("workload", row.name)) continue;
        ctx.checkInterrupted();
        clean();
        await runners[row.name]!.prep();
        await run("sync", []);
        const [t, ts] = await timed(async () => {
          await runners[row.name]!.go();
        });
        row.secs.push(t);
        row.secsSynced.push(ts);
        ctx.log(`  ${row.description}: ${t.toFixed(2)} s (${ts.toFixed(2)} s with sync)`);
      }
    }
    clean();

    const measured = rows.filter((r) => r.secs.length > 0);
    const best = (prefix: string) =>
      Math.min(
        ...measured.filter((r) => r.name.startsWith(prefix)).map((r) => median(r.secsSynced)),
      );
    const lines = measured.map((r) => {
      const t = median(r.secs);
      const ts = median(r.secsSynced);
      const rate = size / 2 / ts / MiB;
      return `| ${r.description} | ${t.toFixed(2)} | ${ts.toFixed(2)} | ${rate.toFixed(0)} |`;
    });
    const addcowBest = best("addcow");
    const qemuBest = best("qemu");
    const verdict =
      Number.isFinite(addcowBest) && Number.isFinite(qemuBest)
        ? `Fastest addcow stream: ${addcowBest.toFixed(2)} s; fastest qemu-img way: ${qemuBest.toFixed(2)} s (${(qemuBest / addcowBest).toFixed(2)}x).`
        : "";
    const markdown = [
      `### Stream: ${size / GiB} GiB disk, half allocated in the overlay`,
      "",
      "| tool | seconds | seconds incl. sync | MiB/s copied (half the disk, incl. sync) |",
      "|---|---|---|---|",
      ...lines,
      "",
      `Median of ${ctx.repeat} run(s). Base file hot in the page cache; each run starts from fresh copies of the same overlay. ${verdict}`,
    ].join("\n");
    return {
      markdown,
      data: {
        size,
        rows: measured.map((r) => ({
          name: r.name,
          description: r.description,
          secs: r.secs,
          secsSynced: r.secsSynced,
        })),
      },
    };
  },
};
