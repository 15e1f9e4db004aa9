/**
 * What a first write costs the kernel, without FUSE: the copy-on-write of a
 * 4 KiB write into a 64 KiB cluster (read 60 KiB of backing data, write 64 KiB
 * into a hole of the sparse image) against the plain 4 KiB overwrite the
 * ceiling does. CPU time (user + system) of this process per operation.
 *
 *   node dist/test/bench/cow-cost.js [DIR]
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { GiB, writeRandomFile } from "./util";

const CLUSTER = 64 * 1024;
const OPS = 5000;

function measure(name: string, fn: (i: number) => void): void {
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < OPS; i++) fn(i);
  const wall = Number(process.hrtime.bigint() - t0) / 1e3 / OPS;
  const cpu = process.cpuUsage(cpu0);
  console.log(
    `${name.padEnd(40)} ${(cpu.user / OPS).toFixed(1).padStart(6)} us user ${(cpu.system / OPS).toFixed(1).padStart(6)} us system ${wall.toFixed(1).padStart(7)} us wall`,
  );
}

function main(): void {
  const dir = fs.mkdtempSync(path.join(process.argv[2] ?? os.tmpdir(), "addcow-cow-cost-"));
  try {
    const basePath = path.join(dir, "base");
    writeRandomFile(basePath, GiB);
    const base = fs.openSync(basePath, "r+");
    const image = fs.openSync(path.join(dir, "image"), "w+");
    fs.ftruncateSync(image, GiB);
    // Distinct random clusters, like first writes of a random workload.
    const clusters = new Set<number>();
    while (clusters.size < OPS) clusters.add(Math.floor(Math.random() * (GiB / CLUSTER)));
    const offsets = [...clusters].map((c) => c * CLUSTER);
    const buf = Buffer.alloc(CLUSTER);
    const at = (i: number) => offsets[i] as number;
    measure("allocate a 64 KiB buffer", () => Buffer.allocUnsafe(CLUSTER));
    measure("read 60 KiB backing (page cache)", (i) =>
      fs.readSync(base, buf, 0, CLUSTER - 4096, at(i)),
    );
    measure("write 64 KiB into a hole of the image", (i) =>
      fs.writeSync(image, buf, 0, CLUSTER, at(i)),
    );
    measure("write 64 KiB over allocated blocks", (i) =>
      fs.writeSync(image, buf, 0, CLUSTER, at(i)),
    );
    measure("write 4 KiB into dirty cached blocks", (i) =>
      fs.writeSync(image, buf, 0, 4096, at(i)),
    );
    measure("write 4 KiB into clean cached blocks", (i) => fs.writeSync(base, buf, 0, 4096, at(i)));
    fs.closeSync(base);
    fs.closeSync(image);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main();
