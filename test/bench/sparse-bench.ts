import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { runFio } from "./fio";
import type { BenchSuite } from "./suite";
import { addcowMountJs, fileIn, startDaemon } from "./systems";
import { MiB, median, peakRss, run } from "./util";

const TiB = 1024 * 1024 * MiB;
const DISK_SIZE = 16 * TiB;
const RANDOM_WRITES = 2048;

/** ext4 cannot hold a 16 TiB file; tmpfs can (sparse, only written clusters use memory). */
function sparseRoot(): string {
  return fs.existsSync("/dev/shm") ? "/dev/shm" : os.tmpdir();
}

/** dd of the disk from its start for `seconds` (the whole 16 TiB would take hours). */
async function ddThroughput(
  file: string,
  seconds: number,
): Promise<{ bytes: number; secs: number }> {
  const out = await run(
    "timeout",
    ["--signal=INT", String(seconds), "dd", `if=${file}`, "of=/dev/null", "bs=1M"],
    {
      allowFail: true,
    },
  );
  // "17179869184 bytes (17 GB, 16 GiB) copied, 10.0 s, 1.7 GB/s"
  const m = /(\d+) bytes .* copied, ([\d.]+) s/.exec(out.stderr);
  if (!m) throw new Error(`cannot parse dd output: ${out.stderr.trim()}`);
  return { bytes: Number(m[1]), secs: Number(m[2]) };
}

export const sparseSuite: BenchSuite = {
  name: "sparse",
  description: "addcow daemon on a 16 TiB sparse disk: mount time, peak RSS, dd throughput",
  async run(ctx) {
    if (!ctx.only.has("system", "addcow")) return { markdown: "", data: null };
    if (!fs.existsSync(addcowMountJs)) {
      const why = `${addcowMountJs} not built (the mount daemon is missing)`;
      return { markdown: `### 16 TiB sparse disk\n\nSkipped: ${why}.`, data: { skipped: why } };
    }
    const { createDisk } = require("../../src/ops/create") as typeof import("../../src/ops/create");
    const dir = fs.mkdtempSync(path.join(sparseRoot(), "addcow-bench-sparse-"));
    ctx.defer("remove sparse disk", () => fs.rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, "sparse.add-cow");
    const mnt = path.join(dir, "mnt");
    await createDisk({ file, size: DISK_SIZE });
    const mount = () =>
      startDaemon(
        ctx,
        "addcow-mount (16 TiB)",
        process.execPath,
        [addcowMountJs, "-f", file, mnt],
        mnt,
        fileIn(mnt, DISK_SIZE, "sparse"),
      );

    ctx.log(`16 TiB sparse disk in ${dir}: ${RANDOM_WRITES} random 4 KiB writes over all of it`);
    let m = await mount();
    let rssAfterWrites = NaN;
    try {
      await runFio(
        m.file,
        DISK_SIZE,
        { name: "spread", description: "", rw: "randwrite", bs: "4k", numjobs: 1, writes: true },
        0,
        [`--number_ios=${RANDOM_WRITES}`],
      );
      rssAfterWrites = peakRss(m.pid ?? -1);
    } finally {
      await m.teardown();
    }

    const mountMs: number[] = [];
    const rssAfterMount: number[] = [];
    const rssAfterDd: number[] = [];
    const ddMBs: number[] = [];
    for (let rep = 0; rep < ctx.repeat; rep++) {
      ctx.checkInterrupted();
      const t0 = process.hrtime.bigint();
      m = await mount();
      mountMs.push(Number(process.hrtime.bigint() - t0) / 1e6);
      try {
        rssAfterMount.push(peakRss(m.pid ?? -1));
        const dd = await ddThroughput(m.file, ctx.time);
        ddMBs.push(dd.bytes / dd.secs / 1e6);
        rssAfterDd.push(peakRss(m.pid ?? -1));
      } finally {
        await m.teardown();
      }
      ctx.log(
        `  [${rep + 1}/${ctx.repeat}] mount ${mountMs[rep]?.toFixed(0)} ms, peak RSS ${((rssAfterDd[rep] ?? NaN) / MiB).toFixed(0)} MiB, dd ${ddMBs[rep]?.toFixed(0)} MB/s`,
      );
    }
    const data = {
      diskSize: DISK_SIZE,
      randomWrites: RANDOM_WRITES,
      location: sparseRoot(),
      mountMs,
      rssAfterWrites,
      rssAfterMount,
      rssAfterDd,
      ddMBs,
      ddSeconds: ctx.time,
    };
    const mib = (b: number) => `${(b / MiB).toFixed(0)} MiB`;
    const markdown = [
      "### 16 TiB sparse disk (addcow, 64K clusters)",
      "",
      `${RANDOM_WRITES} random 4 KiB writes spread over the whole disk (peak RSS of that daemon: ${mib(rssAfterWrites)}), unmounted, then mounted again (median of ${ctx.repeat}):`,
      "",
      "| mount until ready | peak RSS after mount | peak RSS after dd | dd bs=1M from the start (" +
        ctx.time +
        " s) |",
      "|---:|---:|---:|---:|",
      `| ${median(mountMs).toFixed(0)} ms | ${mib(median(rssAfterMount))} | ${mib(median(rssAfterDd))} | ${median(ddMBs).toFixed(0)} MB/s |`,
      "",
      "Mount time is from spawning `addcow-mount -f` to the file being visible with its size (includes Node start-up).",
      `The disk lives on ${sparseRoot()} (tmpfs) because ext4 cannot hold a 16 TiB file.`,
    ].join("\n");
    return { markdown, data };
  },
};
