/**
 * Remote base images through the mounted file, against real servers the test
 * starts (nginx with TLS, s3rver, a fault-injecting proxy): the disk reads
 * exactly like the same overlay over a local copy of the base, before and
 * after writes, copy-on-read and stream; faults give EIO, never wrong bytes;
 * the shared cache serves a second overlay without a request.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  cleanupAll,
  daemonPid,
  makeOverlay,
  mountDisk,
  processAlive,
  run,
  sh,
  smallFileSystem,
  tempDir,
  waitFor,
  writePatternFile,
} from "../helpers/mount";
import { ADDCOW } from "../helpers/cli";
import { servedBase, startProxy, startS3 } from "../helpers/remote-servers";
import { cacheState } from "../helpers/remote-cache-layout";

afterEach(cleanupAll);

const MiB = 1 << 20;
const BASE = 24 * MiB + 4096 * 3; // not a whole number of remote blocks
const SIZE = 32 * MiB;

/** addcow CLI with an environment (async: the servers live in this process). */
async function addcow(env: NodeJS.ProcessEnv, ...args: string[]) {
  return run(process.execPath, [ADDCOW, ...args], { env: { ...process.env, ...env } });
}

async function setup(opts: { tls?: boolean } = {}) {
  const { dir, base, nginx, url } = await servedBase(BASE, 21, opts);
  const env: NodeJS.ProcessEnv = {
    ADDCOW_CACHE_DIR: path.join(dir, "cache"),
    ADDCOW_REMOTE_TIMEOUT: "3",
    ADDCOW_REMOTE_RETRIES: "1",
    ...(nginx.caFile ? { ADDCOW_CA_FILE: nginx.caFile } : {}),
  };
  return { dir, base, nginx, env, url };
}

async function remoteOverlay(env: NodeJS.ProcessEnv, url: string, file: string, size = SIZE) {
  const r = await addcow(env, "create", "-q", "-b", url, "-F", "raw", file, String(size));
  expect(r.code, r.stderr).toBe(0);
}

/** The same writes into two mounted files: dd at odd offsets, then fio verify (an offset pattern: the same bytes in every run). */
async function sameWrites(files: string[], dir: string) {
  const data = path.join(dir, "writes.bin");
  writePatternFile(data, 3 * MiB + 777, 33);
  for (const f of files) {
    await sh("dd", [
      `if=${data}`,
      `of=${f}`,
      "bs=64k",
      "seek=5",
      "conv=notrunc,fsync",
      "status=none",
    ]);
    await sh("dd", [
      `if=${data}`,
      `of=${f}`,
      "bs=1",
      "count=5000",
      "seek=12345677",
      "conv=notrunc",
      "status=none",
    ]);
    await sh("fio", [
      "--name=w",
      `--filename=${f}`,
      "--rw=randwrite",
      "--bs=4k",
      "--size=8M",
      "--offset=20M",
      "--io_size=2M",
      "--randseed=7",
      "--ioengine=psync",
      "--verify=pattern",
      "--verify_pattern=%o",
      "--do_verify=1",
      "--direct=0",
      "--fsync_on_close=1",
    ]);
  }
}

async function cmpFiles(a: string, b: string) {
  const r = await run("cmp", [a, b]);
  expect(r.code, r.stdout + r.stderr).toBe(0);
}

/** The cache by its documented layout: no chunk marked present whose bytes do not match. */
function cacheClean(cacheDir: string): string[] {
  const state = cacheState(cacheDir);
  return [...state.badFiles, ...state.badChunks];
}

describe("a disk over a remote base, through the mount", () => {
  it("https: reads like the same overlay over a local base before and after writes, copy-on-read and stream", async () => {
    const { dir, base, env, url } = await setup({ tls: true });
    const local = await makeOverlay(dir, "local", { backing: base, size: SIZE });
    const remote = path.join(dir, "remote.add-cow");
    await remoteOverlay(env, url, remote);

    const info = await addcow(env, "info", "--json", remote);
    expect(info.code, info.stderr).toBe(0);
    const json = JSON.parse(info.stdout);
    expect(json.backing).toMatchObject({ stored: url, path: url, format: "raw" });
    expect(json.backing.details).toMatchObject({ remote: true, size: BASE });
    const map = await addcow(env, "map", "--json", remote);
    expect(JSON.parse(map.stdout)[0]).toMatchObject({ source: "backing", file: url, length: BASE });
    expect((await addcow(env, "check", remote)).code).toBe(0);

    const ml = await mountDisk(local.addcow, path.join(dir, "ml"));
    let mr = await mountDisk(remote, path.join(dir, "mr"), { env: { ...process.env, ...env } });
    await cmpFiles(ml.file, mr.file);
    await sameWrites([ml.file, mr.file], dir);
    await cmpFiles(ml.file, mr.file);
    await mr.unmount();

    // Copy-on-read: reading everything makes every cluster of the base local.
    mr = await mountDisk(remote, path.join(dir, "mr"), {
      env: { ...process.env, ...env },
      options: "copy-on-read",
    });
    await cmpFiles(ml.file, mr.file);
    await mr.unmount();
    const after = JSON.parse((await addcow(env, "info", "--json", remote)).stdout);
    const baseClusters = Math.ceil(BASE / after.clusterSize);
    expect(after.allocatedClusters).toBeGreaterThanOrEqual(baseClusters);
    mr = await mountDisk(remote, path.join(dir, "mr"), { env: { ...process.env, ...env } });
    await cmpFiles(ml.file, mr.file);
    await mr.unmount();

    // Stream: the image file becomes a standalone raw disk with the same bytes.
    const s = await addcow(env, "stream", "--json", remote);
    expect(s.code, s.stderr).toBe(0);
    await cmpFiles(ml.file, path.join(dir, "remote.raw"));
    await ml.unmount();

    // Stream of an overlay that never read anything: every block comes over the network.
    const fresh = path.join(dir, "fresh.add-cow");
    await remoteOverlay({ ...env, ADDCOW_CACHE_DIR: "none" }, url, fresh);
    const s2 = await addcow({ ...env, ADDCOW_CACHE_DIR: "none" }, "stream", "-q", fresh);
    expect(s2.code, s2.stderr).toBe(0);
    await sh("cmp", ["-n", String(BASE), path.join(dir, "fresh.raw"), base]);
    const tail = Buffer.alloc(SIZE - BASE);
    const fd = fs.openSync(path.join(dir, "fresh.raw"), "r");
    fs.readSync(fd, tail, 0, tail.length, BASE);
    fs.closeSync(fd);
    expect(tail.every((b) => b === 0)).toBe(true);
  }, 180_000);

  it("two overlays on one base: the second reads everything from the shared cache (no request for data)", async () => {
    const { dir, base, nginx, env, url } = await setup();
    const a = path.join(dir, "vm1.add-cow");
    const b = path.join(dir, "vm2.add-cow");
    await remoteOverlay(env, url, a);
    await remoteOverlay(env, url, b);
    const fullEnv = { ...process.env, ...env };
    const ma = await mountDisk(a, path.join(dir, "ma"), { env: fullEnv });
    await sh("cmp", ["-n", String(BASE), ma.file, base]);
    await ma.unmount();
    const ranges = () => nginx.requests().filter((l) => l.startsWith("GET /base.raw"));
    // Readahead of the first daemon may still be landing in the log.
    let before = -1;
    await waitFor("the access log to settle", async () => {
      const n = ranges().length;
      if (n === before) return true;
      before = n;
      await new Promise((r) => setTimeout(r, 300));
      return false;
    });
    const mb = await mountDisk(b, path.join(dir, "mb"), { env: fullEnv });
    await sh("cmp", ["-n", String(BASE), mb.file, base]);
    await mb.unmount();
    const second = ranges().slice(before);
    // Only the probe at open (one byte) reached the server.
    expect(second).toEqual([expect.stringMatching(/"bytes=0-0" 206 1 /)]);
    expect(cacheClean(env.ADDCOW_CACHE_DIR!)).toEqual([]);
  }, 120_000);

  it("s3 (s3rver): a disk over s3://bucket/key reads like the object; writes stay in the overlay", async () => {
    const dir = tempDir();
    const base = path.join(dir, "base.raw");
    writePatternFile(base, BASE, 22);
    const s3 = await startS3(path.join(dir, "s3"), ["fleet"]);
    await s3.put("fleet", "images/base.raw", base);
    const env = { ...s3.env, ADDCOW_CACHE_DIR: path.join(dir, "cache") };
    const disk = path.join(dir, "vm.add-cow");
    await remoteOverlay(env, "s3://fleet/images/base.raw", disk);
    const local = await makeOverlay(dir, "local", { backing: base, size: SIZE });
    const ml = await mountDisk(local.addcow, path.join(dir, "ml"));
    const mr = await mountDisk(disk, path.join(dir, "mr"), { env: { ...process.env, ...env } });
    await cmpFiles(ml.file, mr.file);
    await sameWrites([ml.file, mr.file], dir);
    await cmpFiles(ml.file, mr.file);
    await mr.unmount();
    await ml.unmount();
  }, 120_000);
});

describe("remote faults through the mount", () => {
  it("500s and a stopped server give EIO to the reader, the daemon keeps running and recovers", async () => {
    const { dir, base, nginx, env } = await setup();
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const disk = path.join(dir, "vm.add-cow");
    await remoteOverlay({ ...env, ADDCOW_CACHE_DIR: "none" }, `${proxy.url}/base.raw`, disk);
    const log = path.join(dir, "daemon.log");
    const m = await mountDisk(disk, path.join(dir, "m"), {
      env: { ...process.env, ...env, ADDCOW_CACHE_DIR: "none", ADDCOW_MOUNT_LOG: log },
    });
    proxy.mode = { kind: "status", status: 500 };
    const bad = await run("dd", [
      `if=${m.file}`,
      "of=/dev/null",
      "bs=64k",
      "count=4",
      "skip=100",
      "iflag=direct",
    ]);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/Input\/output error/);
    proxy.mode = { kind: "pass" };
    await nginx.stop();
    const down = await run("dd", [
      `if=${m.file}`,
      "of=/dev/null",
      "bs=64k",
      "count=4",
      "skip=200",
      "iflag=direct",
    ]);
    expect(down.stderr).toMatch(/Input\/output error/);
    expect(processAlive(m.pid)).toBe(true);
    await nginx.start();
    await sh("cmp", ["-n", String(BASE), m.file, base]);
    await m.unmount();
    const lines = fs.readFileSync(log, "utf8");
    expect(lines).toMatch(/remote backing .*HTTP 500 \(the read fails with EIO\)/);
  }, 120_000);

  it("the base changes under a mounted disk: EIO and one line in the log, never bytes of the new image", async () => {
    const { dir, base, env, url } = await setup();
    const disk = path.join(dir, "vm.add-cow");
    await remoteOverlay(env, url, disk);
    const log = path.join(dir, "daemon.log");
    const m = await mountDisk(disk, path.join(dir, "m"), {
      env: { ...process.env, ...env, ADDCOW_MOUNT_LOG: log },
    });
    const head = Buffer.alloc(MiB);
    const fd = fs.openSync(m.file, "r");
    fs.readSync(fd, head, 0, MiB, 0);
    fs.closeSync(fd);
    writePatternFile(base + ".new", BASE, 99);
    fs.utimesSync(base + ".new", new Date(2001, 1, 1), new Date(2001, 1, 1));
    fs.renameSync(base + ".new", base);
    const r = await run("dd", [
      `if=${m.file}`,
      "of=/dev/null",
      "bs=1M",
      "skip=10",
      "count=2",
      "iflag=direct",
    ]);
    expect(r.stderr).toMatch(/Input\/output error/);
    await m.unmount();
    const lines = fs
      .readFileSync(log, "utf8")
      .split("\n")
      .filter((l) => /changed since/.test(l));
    expect(lines).toHaveLength(1);
  }, 120_000);

  it("12 readers on a stalled server all get EIO within the documented bound, queued or not", async () => {
    const { dir, nginx, env } = await setup();
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const disk = path.join(dir, "vm.add-cow");
    const quick = { ...env, ADDCOW_CACHE_DIR: "none", ADDCOW_REMOTE_TIMEOUT: "2" };
    await remoteOverlay(quick, `${proxy.url}/base.raw`, disk);
    const m = await mountDisk(disk, path.join(dir, "m"), { env: { ...process.env, ...quick } });
    proxy.mode = { kind: "hang" };
    const t0 = Date.now();
    // 12 misses at once (4 in flight, 8 queued behind them), each in its own piece.
    const readers = Array.from({ length: 12 }, (_, i) =>
      run("dd", [
        `if=${m.file}`,
        "of=/dev/null",
        "bs=4k",
        "count=1",
        `skip=${i * 400}`,
        "iflag=direct",
      ]).then((r) => ({ ...r, ms: Date.now() - t0 })),
    );
    const results = await Promise.all(readers);
    for (const r of results) expect(r.stderr).toMatch(/Input\/output error/);
    // Bound: 2 attempts of 2 s and a pause of at most 0.1 s (4.1 s); the old code
    // started a request's clock only when it got a slot: 4.1, 8.2 and 12.2 s.
    expect(Math.max(...results.map((r) => r.ms))).toBeLessThan(4100 + 2000);
    proxy.mode = { kind: "pass" };
    await m.unmount();
  }, 120_000);

  it("a full cache file system: the disk reads right, the daemon's log says so once", async () => {
    const { dir, base, env, url } = await setup();
    const cache = path.join(dir, "small-cache");
    await smallFileSystem("tmpfs", cache, 3);
    const disk = path.join(dir, "vm.add-cow");
    await remoteOverlay({ ...env, ADDCOW_CACHE_DIR: cache }, url, disk);
    const log = path.join(dir, "daemon.log");
    const m = await mountDisk(disk, path.join(dir, "m"), {
      env: { ...process.env, ...env, ADDCOW_CACHE_DIR: cache, ADDCOW_MOUNT_LOG: log },
    });
    await sh("cmp", ["-n", String(BASE), m.file, base]);
    await m.unmount();
    const lines = fs
      .readFileSync(log, "utf8")
      .split("\n")
      .filter((l) => /block cache/.test(l));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/cannot store fetched blocks \(the file system is full\)/);
    expect(cacheClean(cache)).toEqual([]);
    expect(cacheState(cache).tmp).toBe(0);
  }, 120_000);

  it("kill -9 while the cache fills leaves no bad entry; the next daemon reads correct bytes", async () => {
    const { dir, base, nginx, env } = await setup();
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`, { kind: "delay", ms: 40 });
    const disk = path.join(dir, "vm.add-cow");
    const slow = { ...env, ADDCOW_REMOTE_BLOCK_SIZE: "64K", ADDCOW_REMOTE_IN_FLIGHT: "8" };
    await remoteOverlay(slow, `${proxy.url}/base.raw`, disk);
    const fullEnv = { ...process.env, ...slow };
    const m = await mountDisk(disk, path.join(dir, "m"), { env: fullEnv });
    const reader = run("dd", [`if=${m.file}`, "of=/dev/null", "bs=1M", "iflag=direct"]);
    await waitFor(
      "the cache to fill a little",
      () => cacheState(env.ADDCOW_CACHE_DIR!).bytes >= 512 * 1024,
    );
    process.kill(m.pid, "SIGKILL");
    await waitFor("the daemon to die", () => !processAlive(m.pid));
    await reader;
    await run("fusermount", ["-uz", m.dir]);
    expect(cacheClean(env.ADDCOW_CACHE_DIR!)).toEqual([]);
    expect(cacheState(env.ADDCOW_CACHE_DIR!).goodChunks).toBeGreaterThan(0);
    proxy.mode = { kind: "pass" };
    const m2 = await mountDisk(disk, path.join(dir, "m2"), { env: fullEnv });
    await sh("cmp", ["-n", String(BASE), m2.file, base]);
    await m2.unmount();
    expect(daemonPid(m2.dir)).toBeNull();
  }, 120_000);
});
