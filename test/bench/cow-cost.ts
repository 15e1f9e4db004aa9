/**
 * What a first write costs the kernel, without FUSE: the copy-on-write of a
 * 4 KiB write into a 64 KiB cluster (read 60 KiB of backing data, write 64 KiB
 * into a hole of the sparse image) against the plain 4 KiB overwrite the
 * ceiling does. CPU time (user + system) of this process per operation.
 * Then the durable versions (fio --fdatasync=1): what one ordered flush after
 * a first write costs (image fdatasync, then the bitmap page and its
 * fdatasync) against the ceiling's one fdatasync, with fdatasync on this
 * thread and through libuv's thread pool (what the daemon does).
 *
 *   node dist/test/bench/cow-cost.js [DIR]
 */
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { promisify } from "node:util";
import { GiB, writeRandomFile } from "./util";

const fdatasyncPool = promisify(fs.fdatasync);

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

const SYNC_OPS = 400;

async function measureDurable(name: string, fn: (i: number) => Promise<void>): Promise<void> {
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < SYNC_OPS; i++) await fn(i);
  const wall = Number(process.hrtime.bigint() - t0) / 1e3 / SYNC_OPS;
  console.log(`${name.padEnd(58)} ${wall.toFixed(0).padStart(5)} us wall`);
}

async function main(): Promise<void> {
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

    // Durable writes: fresh clusters for the first writes, a synced file for the overwrites.
    const fresh = path.join(dir, "fresh-image");
    const meta = fs.openSync(path.join(dir, "meta"), "w+");
    fs.writeSync(meta, Buffer.alloc(65536));
    fs.fdatasyncSync(base);
    fs.fdatasyncSync(meta);
    const page = Buffer.alloc(4096, 1);
    for (const pool of [false, true]) {
      const how = pool ? "thread pool" : "this thread";
      const sync = (fd: number) =>
        pool ? fdatasyncPool(fd) : Promise.resolve(fs.fdatasyncSync(fd));
      await measureDurable(`ceiling: 4 KiB overwrite + fdatasync (${how})`, async (i) => {
        fs.writeSync(base, buf, 0, 4096, at(i));
        await sync(base);
      });
      fs.rmSync(fresh, { force: true });
      const img = fs.openSync(fresh, "w+");
      fs.ftruncateSync(img, GiB);
      await measureDurable(`addcow: 64 KiB first write + fdatasync (${how})`, async (i) => {
        fs.writeSync(img, buf, 0, CLUSTER, at(i));
        await sync(img);
      });
      await measureDurable(`addcow: then bitmap page + fdatasync (${how})`, async (i) => {
        fs.writeSync(meta, page, 0, 4096, (i % 16) * 4096);
        await sync(meta);
      });
      fs.closeSync(img);
    }
    fs.closeSync(meta);
    fs.closeSync(base);
    fs.closeSync(image);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

void main();
