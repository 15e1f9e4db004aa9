import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export function median(values: number[]): number {
  if (values.length === 0) return NaN;
  const s = [...values].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? (s[mid] as number) : ((s[mid - 1] as number) + (s[mid] as number)) / 2;
}

/** Absolute path of `name` on PATH, or null. */
export function which(name: string): string | null {
  for (const dir of (process.env.PATH ?? "").split(":")) {
    if (!dir) continue;
    const p = path.join(dir, name);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // keep looking
    }
  }
  return null;
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion; rejects with its stderr when it fails (unless allowFail). */
export function run(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: opts.env });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.on("error", reject);
    child.on("close", (code) => {
      if (code !== 0 && !opts.allowFail) {
        const msg = stderr.trim().split("\n").slice(-3).join(" | ");
        reject(new Error(`${cmd} ${args.join(" ")} exited ${code}: ${msg}`));
      } else resolve({ code, stdout, stderr });
    });
  });
}

/** True when `p` is a mount point (also works for files used as mount points). */
export function isMounted(p: string): boolean {
  const abs = path.resolve(p);
  const info = fs.readFileSync("/proc/self/mountinfo", "utf8");
  for (const line of info.split("\n")) {
    const mp = line.split(" ")[4];
    if (mp !== undefined && mp.replace(/\\040/g, " ") === abs) return true;
  }
  return false;
}

/** Polls until `check` returns a value (not undefined) or the time runs out. */
export async function waitFor<T>(
  what: string,
  timeoutMs: number,
  check: () => T | undefined,
  intervalMs = 5,
): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = check();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(intervalMs);
  }
}

/** Lazy FUSE unmount; quiet when nothing is mounted there. */
export async function lazyUnmount(p: string): Promise<void> {
  if (isMounted(p)) await run("fusermount", ["-uz", p], { allowFail: true });
}

/** Resolves when the child has exited (at once if it already has). */
export function exited(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once("exit", () => resolve()));
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves once the child is gone. */
export async function stopChild(child: ChildProcess, graceMs = 15_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
  await exited(child);
  clearTimeout(timer);
}

/** PIDs of processes whose command line contains `needle` (a unique temp path of ours). */
export function pidsWithArg(needle: string): number[] {
  const pids: number[] = [];
  for (const entry of fs.readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const cmdline = fs.readFileSync(`/proc/${entry}/cmdline`, "utf8");
      const state = fs.readFileSync(`/proc/${entry}/stat`, "utf8").split(") ")[1]?.[0];
      if (state !== "Z" && cmdline.split("\0").some((a) => a.includes(needle))) {
        pids.push(Number(entry));
      }
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

/** Peak resident set size of a running process in bytes (VmHWM), or NaN. */
export function peakRss(pid: number): number {
  try {
    const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) * 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** Writes `size` bytes of random data to `file` (1 MiB at a time). */
export function writeRandomFile(file: string, size: number): void {
  const fd = fs.openSync(file, "w");
  try {
    const chunk = Buffer.alloc(MiB);
    const crypto = require("node:crypto") as typeof import("node:crypto");
    for (let off = 0; off < size; off += MiB) {
      crypto.randomFillSync(chunk);
      fs.writeSync(fd, chunk, 0, Math.min(MiB, size - off), off);
    }
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Copies a file (the kernel copies; reflinks where the file system can). */
export async function copyFile(src: string, dst: string): Promise<void> {
  await fs.promises.copyFile(src, dst, fs.constants.COPYFILE_FICLONE);
}

/** CPU seconds (user + system, all threads) a process has used so far, or NaN. */
export function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const fields = fs.readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1]?.split(" ") ?? [];
    // utime and stime are fields 14 and 15 (1-based), i.e. 11 and 12 after "(comm) ".
    return (Number(fields[11]) + Number(fields[12])) / 100;
  } catch {
    return NaN;
  }
}

/** Runs fn; returns seconds to its end and to the end of a following `sync` (data on disk). */
export async function timed(fn: () => Promise<unknown>): Promise<[number, number]> {
  const t0 = process.hrtime.bigint();
  await fn();
  const t1 = process.hrtime.bigint();
  await run("sync", []);
  const t2 = process.hrtime.bigint();
  return [Number(t1 - t0) / 1e9, Number(t2 - t0) / 1e9];
}
