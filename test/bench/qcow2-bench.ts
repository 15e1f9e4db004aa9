import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { type FioResult, type Workload, runFio, workloads } from "./fio";
import type { BenchContext, BenchSuite } from "./suite";
import { addcowMountJs, fileIn, startDaemon, startQsdOverlay, type Mounted } from "./systems";
import { GiB, MiB, cpuSeconds, median, run, timed, which } from "./util";

/**
 * A compressed qcow2 "cloud image" as the base: reads through an add-cow disk
 * over it (addcow decompresses) against qemu-storage-daemon exporting a qcow2
 * overlay over the same image through FUSE, for zlib and zstd compression;
 * and the "convert then use raw" route: the time of `qemu-img convert -O raw`,
 * then the same reads through an add-cow disk over the converted raw file.
 * The base images are hot in the page cache for everyone.
 *
 * ADDCOW_QCOW2_BENCH_SIZE (e.g. 256M) shortens runs while developing; default 1G.
 */
function sizeFromEnv(): number {
  const text = process.env.ADDCOW_QCOW2_BENCH_SIZE;
  if (!text) return GiB;
  const { parseSize } = require("../../src/util/size") as typeof import("../../src/util/size");
  return parseSize(text, "ADDCOW_QCOW2_BENCH_SIZE");
}

/** Disk-like content: per MiB, random bytes, repeated text, sparse bytes or zeros (about 2:1). */
function writeImageLikeFile(file: string, size: number): void {
  const fd = fs.openSync(file, "w");
  try {
    const chunk = Buffer.alloc(MiB);
    for (let off = 0, i = 0; off < size; off += MiB, i++) {
      const kind = (i * 2654435761) % 5;
      chunk.fill(0);
      if (kind === 0 || kind === 1) crypto.randomFillSync(chunk);
      else if (kind === 2) chunk.fill(`/usr/lib/x86_64-linux-gnu/libfoo.so.${i} `);
      else if (kind === 3) for (let j = 0; j < MiB; j += 61) chunk[j] = (i + j) & 0xff;
      fs.writeSync(fd, chunk, 0, Math.min(MiB, size - off), off);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

interface Target {
  name: string;
  label: string;
  start(ctx: BenchContext, dir: string): Promise<Mounted>;
}

function addcowOver(name: string, label: string, base: string, format: "qcow2" | "raw"): Target {
  return {
    name,
    label,
    async start(ctx, dir) {
      const { createDisk } =
        require("../../src/ops/create") as typeof import("../../src/ops/create");
      const file = path.join(dir, "disk.add-cow");
      const r = await createDisk({ file, backing: base, backingFormat: format });
      const mnt = path.join(dir, "mnt");
      return startDaemon(
        ctx,
        name,
        process.execPath,
        [addcowMountJs, "-f", file, mnt],
        mnt,
        fileIn(mnt, r.size, "disk"),
      );
    },
  };
}

function qsdOver(name: string, label: string, base: string): Target {
  return { name, label, start: (ctx, dir) => startQsdOverlay(ctx, name, base, "qcow2", dir) };
}

const fmt = (r: FioResult[]) => {
  if (r.length === 0) return "failed";
  const bw = median(r.map((x) => x.bw));
  const iops = median(r.map((x) => x.iops));
  const cpu = median(r.map((x) => x.cpuUsPerIo ?? NaN));
  const iopsText = iops >= 10_000 ? `${(iops / 1000).toFixed(1)}k` : iops.toFixed(0);
  const cpuText = Number.isFinite(cpu) ? `<br>${cpu.toFixed(0)} µs CPU/IO` : "";
  return `${(bw / 1e6).toFixed(bw >= 100e6 ? 0 : 1)} MB/s<br>${iopsText} IOPS${cpuText}`;
};

export const qcow2Suite: BenchSuite = {
  name: "qcow2",
  description: "reads of a compressed qcow2 base: addcow vs qemu-storage-daemon; qemu-img convert",
  async run(ctx) {
    const size = sizeFromEnv();
    const missing = ["qemu-img", "qemu-storage-daemon", "fio"].filter((t) => !which(t));
    if (missing.length || !fs.existsSync(addcowMountJs)) {
      const why = missing.length ? `${missing.join(", ")} not installed` : "addcow not built";
      return { markdown: `### qcow2 base\n\nSkipped: ${why}.`, data: { skipped: why } };
    }
    const dir = fs.mkdtempSync(path.join(ctx.workDir, "qcow2-"));
    ctx.defer("remove qcow2 bench files", () => fs.rmSync(dir, { recursive: true, force: true }));
    const f = (name: string) => path.join(dir, name);
    ctx.log(`qcow2 bench: ${size / MiB} MiB image-like content, compressed with zlib and zstd`);
    writeImageLikeFile(f("src.raw"), size);
    const sizes: Record<string, number> = {};
    const convert: Record<string, [number, number]> = {};
    for (const type of ["zlib", "zstd"]) {
      const img = f(`cloud-${type}.qcow2`);
      await run("qemu-img", [
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        `compression_type=${type}`,
        f("src.raw"),
        img,
      ]);
      sizes[type] = fs.statSync(img).size;
      // The "convert then use raw" route: one full conversion per host.
      convert[type] = await timed(() =>
        run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", img, f(`converted-${type}.raw`)]),
      );
      ctx.log(`  qemu-img convert ${type} -> raw: ${convert[type]![0].toFixed(2)} s`);
    }
    fs.rmSync(f("src.raw"));
    for (const type of ["zlib"]) fs.rmSync(f(`converted-${type}.raw`));

    const allTargets: Target[] = [
      addcowOver("addcow-zlib", "addcow over zlib qcow2", f("cloud-zlib.qcow2"), "qcow2"),
      qsdOver(
        "qsd-zlib",
        "qemu-storage-daemon, qcow2 overlay over zlib qcow2",
        f("cloud-zlib.qcow2"),
      ),
      addcowOver("addcow-zstd", "addcow over zstd qcow2", f("cloud-zstd.qcow2"), "qcow2"),
      qsdOver(
        "qsd-zstd",
        "qemu-storage-daemon, qcow2 overlay over zstd qcow2",
        f("cloud-zstd.qcow2"),
      ),
      addcowOver(
        "addcow-converted",
        "addcow over the converted raw file",
        f("converted-zstd.raw"),
        "raw",
      ),
    ];
    const wls = workloads.filter(
      (w: Workload) =>
        ["seqread", "randread", "randread4"].includes(w.name) && ctx.only.has("workload", w.name),
    );
    // Targets named with --only (e.g. addcow-zlib,qsd-zlib) narrow the rows; none named, all run.
    const named = allTargets.filter((t) => ctx.only.named(t.name));
    const targets = named.length > 0 ? named : allTargets;
    const cells = new Map<string, FioResult[]>();
    for (let rep = 0; rep < ctx.repeat; rep++) {
      for (const w of wls) {
        for (const t of targets) {
          ctx.checkInterrupted();
          const runDir = fs.mkdtempSync(path.join(dir, `${t.name}-${w.name}-`));
          const list = cells.get(`${t.name}/${w.name}`) ?? [];
          cells.set(`${t.name}/${w.name}`, list);
          try {
            const mounted = await t.start(ctx, runDir);
            try {
              await run("sync", []);
              const cpu0 = cpuSeconds(mounted.pid);
              const r = await runFio(mounted.file, size, w, ctx.time);
              const cpu = cpuSeconds(mounted.pid) - cpu0;
              if (Number.isFinite(cpu) && r.ios > 0) r.cpuUsPerIo = (cpu * 1e6) / r.ios;
              list.push(r);
              ctx.log(`  ${t.name} ${w.name}: ${(r.bw / 1e6).toFixed(1)} MB/s`);
            } finally {
              await mounted.teardown();
            }
          } catch (err) {
            ctx.checkInterrupted();
            ctx.log(`  ${t.name} ${w.name} FAILED: ${(err as Error).message}`);
          } finally {
            fs.rmSync(runDir, { recursive: true, force: true });
          }
        }
      }
    }

    const lines = [
      `### qcow2 base: ${size / MiB} MiB image-like content, compressed (64K clusters)`,
      "",
      `Compressed images: zlib ${(sizes.zlib! / MiB).toFixed(0)} MiB, zstd ${(sizes.zstd! / MiB).toFixed(0)} MiB. ` +
        "Reads through an add-cow disk over the qcow2 (addcow decompresses) and through " +
        "qemu-storage-daemon exporting a qcow2 overlay over the same image (FUSE); fio psync, direct.",
      "",
      `| system | ${wls.map((w) => w.name).join(" | ")} |`,
      `|---|${wls.map(() => "---:").join("|")}|`,
      ...targets.map(
        (t) =>
          `| ${t.label} | ${wls.map((w) => fmt(cells.get(`${t.name}/${w.name}`) ?? [])).join(" | ")} |`,
      ),
      "",
      "The convert-then-raw route first pays a full `qemu-img convert -O raw` per host:",
      "",
      "| image | convert to raw (tool) | with sync |",
      "|---|---:|---:|",
      ...Object.entries(convert).map(
        ([type, [tool, synced]]) =>
          `| ${type} qcow2 | ${tool.toFixed(2)} s | ${synced.toFixed(2)} s |`,
      ),
    ];
    return {
      markdown: lines.join("\n"),
      data: {
        size,
        compressedSizes: sizes,
        convertSeconds: convert,
        cells: Object.fromEntries(cells),
      },
    };
  },
};
