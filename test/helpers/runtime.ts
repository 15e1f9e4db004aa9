import * as fs from "node:fs";
import * as path from "node:path";
import { execFileSync } from "node:child_process";
import { expect } from "vitest";
import { run } from "./mount";

/**
 * Which Node.js the addcow programs run on. With DEBUG=addcow:cli every
 * program (and a daemon's background child) prints one line at start:
 * "addcow:cli addcow-mount 0.1.0 on Node.js v24.22.3 (/path/to/node)".
 * The tests run on the checkout's Node.js (npm test runs vitest on
 * node_modules/.bin/node, the one .ci/setup provides); what addcow starts
 * must run on that one too, whatever PATH it was started with.
 */
export interface Runtime {
  program: string;
  version: string;
  execPath: string;
}

export function runtimesIn(text: string): Runtime[] {
  return [...text.matchAll(/addcow:cli (\S+) \S+ on Node\.js (v[\d.]+) \((.+)\)/g)].map((m) => ({
    program: m[1]!,
    version: m[2]!,
    execPath: m[3]!,
  }));
}

/** Expects each program named to have started at least once, every start on the tests' Node.js. */
export function expectOwnRuntime(text: string, programs: string[]): void {
  const seen = runtimesIn(text);
  expect(
    seen.map((r) => r.program),
    `the addcow:cli start lines in:\n${text.slice(-3000)}`,
  ).toEqual(expect.arrayContaining(programs));
  const own = fs.realpathSync(process.execPath);
  for (const r of seen) {
    expect(r, `${r.program} ran on another Node.js`).toEqual({
      program: r.program,
      version: process.version,
      execPath: own,
    });
  }
}

/**
 * The PATH of a shell that did not come through npm: this one without
 * npm's node_modules/.bin and node-gyp-bin entries, so the machine's own
 * node (/usr/bin/node) is the one a plain `node` finds.
 */
export function shellPath(): string {
  return (process.env.PATH ?? "")
    .split(path.delimiter)
    .filter(
      (p) => !p.endsWith(`${path.sep}node_modules${path.sep}.bin`) && !/node-gyp-bin$/.test(p),
    )
    .join(path.delimiter);
}

/** The machine's node as such a shell finds it, and its version (null when there is none). */
export function machineNode(): { file: string; version: string } | null {
  for (const dir of shellPath().split(path.delimiter)) {
    const file = path.join(dir, "node");
    try {
      fs.accessSync(file, fs.constants.X_OK);
    } catch {
      continue;
    }
    return { file, version: execFileSync(file, ["--version"], { encoding: "utf8" }).trim() };
  }
  return null;
}

/**
 * What .ci/setup does to put the commands on the PATH, into a prefix of the
 * test's own: wrappers in DIR/prefix/bin (returned), mount.fuse.addcow also
 * linked into `sbin` (default DIR/prefix/sbin).
 */
export async function installCommands(dir: string, sbin?: string): Promise<string> {
  const prefix = path.join(dir, "prefix");
  const helperDir = sbin ?? path.join(prefix, "sbin");
  fs.mkdirSync(helperDir, { recursive: true });
  const repo = path.resolve(__dirname, "../..");
  const r = await run("bash", [path.join(repo, ".ci/install-commands"), prefix], {
    env: { ...process.env, ADDCOW_SBIN: helperDir },
    timeoutMs: 120_000,
  });
  expect(r.code, r.stderr).toBe(0);
  return path.join(prefix, "bin");
}
