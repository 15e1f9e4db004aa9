/**
 * Shared by the tests of the rules for other users' disks (trust.test.ts,
 * tenant.test.ts): the commands run as root, programs run as tenant users,
 * one-line refusals, refused mounts that leave nothing behind.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { expect } from "vitest";
import { writeRaw } from "./bad-files";
import { MOUNT_BIN, type RunResult, daemonPid, run, trackMount, waitFor } from "./mount";

export const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");
export const NOBODY = 65534;
export const KiB = 1024;
export const env: NodeJS.ProcessEnv = { ...process.env };
delete env.DEBUG;

export function addcow(
  args: string[],
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number; cwd?: string } = {},
): Promise<RunResult> {
  return run(process.execPath, [ADDCOW, ...args], {
    env: opts.env ?? env,
    timeoutMs: opts.timeoutMs ?? 60_000,
    ...(opts.cwd ? { cwd: opts.cwd } : {}),
  });
}

/** Runs a program as uid (gid the same), without supplementary groups; the uid needs no account. */
export function asUser(uid: number, cmd: string, args: string[]): Promise<RunResult> {
  return run("setpriv", [`--reuid=${uid}`, `--regid=${uid}`, "--clear-groups", cmd, ...args], {
    env,
  });
}

export function asNobody(cmd: string, args: string[]): Promise<RunResult> {
  return asUser(NOBODY, cmd, args);
}

export function mountedAt(dir: string): boolean {
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .some((line) => line.split(" ")[4] === dir);
}

/** Exit 1 and exactly one line "<prog>: message" on stderr; returns the message. */
export function oneLine(r: RunResult, prog: string): string {
  expect(r.code, `${prog} stderr: ${r.stderr} stdout: ${r.stdout}`).toBe(1);
  const lines = r.stderr.replace(/\n$/, "").split("\n");
  expect(lines, r.stderr).toHaveLength(1);
  expect(lines[0]!.startsWith(`${prog}: `), r.stderr).toBe(true);
  return lines[0]!.slice(prog.length + 2);
}

/** addcow-mount must refuse: one line, nothing mounted, no daemon left. */
export async function mountRefused(
  args: string[],
  mnt: string,
  opts: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
): Promise<string> {
  trackMount(mnt);
  const r = await run(process.execPath, [MOUNT_BIN, ...args, mnt], {
    env: opts.env ?? env,
    timeoutMs: opts.timeoutMs ?? 60_000,
  });
  expect(mountedAt(mnt), `mounted: ${r.stderr}`).toBe(false);
  // A background daemon that reported its error may take a moment to exit.
  await waitFor("the refused daemon to exit", () => daemonPid(mnt) === null, 10_000);
  return oneLine(r, "addcow-mount");
}

export function spawnOk(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")}: ${r.stderr}`);
}

/** A raw file of `size` bytes of `fill`, owned by root with `mode`. */
export function rootFile(file: string, size: number, mode: number, fill = 0x33): string {
  writeRaw(file, size, fill);
  fs.chmodSync(file, mode);
  return file;
}

/** Gives files (symbolic links themselves, not their targets) to uid. */
export function chownTo(uid: number, ...files: string[]): void {
  for (const f of files) fs.lchownSync(f, uid, uid);
}

export function chownNobody(...files: string[]): void {
  chownTo(NOBODY, ...files);
}
