import { type ChildProcess, execFileSync, spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { openDisk } from "../../src/chain/open-chain";
import { makeChain, MiB, KiB, qemuCompareRaw, readDisk, scribble, tempDir } from "../helpers/jobs";

const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");

function addcow(cwd: string, ...args: string[]) {
  const env = { ...process.env };
  delete env.DEBUG;
  const r = spawnSync(process.execPath, [ADDCOW, ...args], { cwd, env, encoding: "utf8" });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

const dirs: string[] = [];
const children: ChildProcess[] = [];
const immutable: string[] = [];
function dir(tag: string): string {
  const d = tempDir(tag);
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const c of children.splice(0)) if (c.exitCode === null) c.kill("SIGKILL");
  for (const f of immutable.splice(0)) spawnSync("chattr", ["-i", f]);
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

describe("addcow stream/commit/snapshot", () => {
  it("streams with JSON progress events and plain output", async () => {
    const d = dir("cli");
    await makeChain(d, 8 * MiB, 1);
    await scribble(path.join(d, "layer0.add-cow"), 3, 20);
    const before = await readDisk(path.join(d, "layer0.add-cow"));
    const r = addcow(d, "stream", "--json", "--in-flight", "4", "layer0.add-cow");
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const events = r.stdout
      .trim()
      .split("\n")
      .map(
        (l) => JSON.parse(l) as { event: string; done: number; total: number; message?: string },
      );
    expect(events[0]!.event).toBe("progress");
    const last = events[events.length - 1]!;
    expect(last.event).toBe("completed");
    expect(last.done).toBe(last.total);
    expect(last.message).toMatch(/standalone raw disk/);
    expect(fs.readFileSync(path.join(d, "layer0.raw")).equals(before)).toBe(true);
    const again = addcow(d, "stream", "layer0.add-cow");
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/complete already/);
  });

  it("gives one clear line for each refused job", async () => {
    const d = dir("clierr");
    await makeChain(d, 2 * MiB, 1);
    expect(addcow(d, "create", "-q", "solo.add-cow", "1M").code).toBe(0);
    const noBacking = addcow(d, "stream", "solo.add-cow");
    expect(noBacking.code).toBe(1);
    expect(noBacking.stderr).toMatch(
      /^addcow: solo\.add-cow has no backing file: there is nothing to stream[^\n]*\n$/,
    );
    const noCommit = addcow(d, "commit", "solo.add-cow");
    expect(noCommit.code).toBe(1);
    expect(noCommit.stderr).toMatch(/has no backing file: there is nothing to commit into/);

    expect(addcow(d, "snapshot", "layer0.add-cow", "snap.add-cow").code).toBe(0);
    const over = addcow(d, "snapshot", "layer0.add-cow", "snap.add-cow");
    expect(over.code).toBe(1);
    expect(over.stderr).toMatch(
      /^addcow: snap\.add-cow already exists; a snapshot never reuses a file[^\n]*\n$/,
    );

    const bad = addcow(d, "stream", "--in-flight", "0", "layer0.add-cow");
    expect(bad.code).toBe(1);
    expect(bad.stderr).toMatch(/invalid --in-flight "0"/);
    const gran = addcow(d, "stream", "--granularity", "5K", "layer0.add-cow");
    expect(gran.code).toBe(1);
    expect(gran.stderr).toMatch(
      /granularity 5120: must be a multiple of the disk's cluster size 65536/,
    );
  });

  it("refuses to commit onto a read-only backing file", async () => {
    const d = dir("cliro");
    const { base } = await makeChain(d, 2 * MiB, 1);
    await scribble(path.join(d, "layer0.add-cow"), 4, 5);
    const before = fs.readFileSync(base);
    // root ignores file modes; the immutable attribute stops root too.
    if (process.getuid?.() === 0) {
      const r = spawnSync("chattr", ["+i", base]);
      if (r.status !== 0) return; // this file system has no attributes: nothing to test here
      immutable.push(base);
    } else {
      fs.chmodSync(base, 0o444);
    }
    const r = addcow(d, "commit", "layer0.add-cow");
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /^addcow: cannot commit layer0\.add-cow: backing file .*base\.raw cannot be opened for writing \((permission denied|read-only file system)\); commit writes into the backing file, so make it writable[^\n]*\n$/,
    );
    expect(fs.readFileSync(base).equals(before)).toBe(true);
  });

  it("commits through the CLI and keeps the disk's content", async () => {
    const d = dir("clicommit");
    const { base } = await makeChain(d, 4 * MiB, 1);
    await scribble(path.join(d, "layer0.add-cow"), 5, 10);
    const before = await readDisk(path.join(d, "layer0.add-cow"));
    const r = addcow(d, "commit", "layer0.add-cow");
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/emptied the overlay/);
    expect(fs.readFileSync(base).equals(before)).toBe(true);
  });

  it("runs the README's sequence (snapshot, commit, stream); commit after stream says what to do", async () => {
    const d = dir("cliseq");
    await makeChain(d, 4 * MiB, 1);
    await scribble(path.join(d, "layer0.add-cow"), 6, 10);
    const before = await readDisk(path.join(d, "layer0.add-cow"));
    for (const args of [
      ["snapshot", "layer0.add-cow", "snap.add-cow"],
      ["commit", "snap.add-cow"],
      ["stream", "layer0.add-cow"],
    ]) {
      const r = addcow(d, ...args);
      expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(0);
    }
    expect(fs.readFileSync(path.join(d, "layer0.raw")).equals(before)).toBe(true);
    const late = addcow(d, "commit", "layer0.add-cow");
    expect(late.code).toBe(1);
    expect(late.stderr).toMatch(
      /^addcow: layer0\.add-cow was streamed: .* so there is nothing to commit; use \S*layer0\.raw as the disk[^\n]*\n$/,
    );
  });
});

describe("interrupted stream", () => {
  // kill -9 at random moments; each partial result must read as the whole disk, and the last run completes it.
  const rounds = Number(process.env.ADDCOW_KILL_ROUNDS ?? (process.env.CI ? 6 : 12));

  it(`resumes after kill -9 (${rounds} rounds) and ends identical`, async () => {
    const d = dir("kill9");
    const size = 32 * MiB;
    await makeChain(d, size, 1, 4 * KiB);
    const top = path.join(d, "layer0.add-cow");
    await scribble(top, 8, 30);
    const before = await readDisk(top);
    const counts: number[] = [];
    const start = await openDisk(top);
    const initial = await start.countAllocated();
    await start.close();
    for (let i = 0; i < rounds; i++) {
      const child = spawn(
        process.execPath,
        [ADDCOW, "stream", "--speed", "24M", "--in-flight", String(1 + (i % 16)), top],
        { stdio: ["ignore", "ignore", "pipe"] },
      );
      children.push(child);
      const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
      // Kill at a random moment after it started copying (its first progress line).
      const started = new Promise<void>((resolve) => child.stderr!.once("data", () => resolve()));
      await Promise.race([started, exited]);
      // Odd rounds die early (often before a checkpoint), even rounds after at least one.
      const delay = i % 2 ? Math.random() * 600 : 700 + Math.random() * 600;
      await new Promise((r) => setTimeout(r, Math.floor(delay)));
      child.kill("SIGKILL");
      await exited;
      const dev = await openDisk(top);
      try {
        counts.push(await dev.countAllocated());
      } finally {
        await dev.close();
      }
      expect((await readDisk(top)).equals(before)).toBe(true);
    }
    // Progress was kept across kills: the allocated count only grew.
    for (let i = 1; i < counts.length; i++)
      expect(counts[i]!).toBeGreaterThanOrEqual(counts[i - 1]!);
    expect(counts[counts.length - 1]!).toBeGreaterThan(initial);
    const r = addcow(d, "stream", "-q", top);
    expect(r.code).toBe(0);
    const expected = path.join(d, "expected.raw");
    fs.writeFileSync(expected, before);
    execFileSync("cmp", [path.join(d, "layer0.raw"), expected]);
    qemuCompareRaw(path.join(d, "layer0.raw"), expected);
  });

  it("stops cleanly on SIGINT and keeps its progress", async () => {
    const d = dir("sigint");
    await makeChain(d, 16 * MiB, 1, 4 * KiB);
    const top = path.join(d, "layer0.add-cow");
    const child = spawn(process.execPath, [ADDCOW, "stream", "--speed", "8M", top], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    children.push(child);
    let out = "";
    let err = "";
    child.stdout!.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr!.on("data", (b: Buffer) => (err += b.toString()));
    const code = new Promise<number | null>((resolve) => child.once("exit", (c) => resolve(c)));
    // Interrupt once it has started copying (its first progress line).
    while (!/stream .*%/.test(err)) await new Promise((r) => setTimeout(r, 20));
    await new Promise((r) => setTimeout(r, 300));
    child.kill("SIGINT");
    expect(await code).toBe(130);
    expect(err).toMatch(/stopping cleanly/);
    expect(out).toMatch(/stopped with .* left to copy; progress is kept/);
    const dev = await openDisk(top);
    try {
      const n = await dev.countAllocated();
      expect(n).toBeGreaterThan(0);
      expect(n).toBeLessThan(dev.numClusters);
    } finally {
      await dev.close();
    }
  });
});
