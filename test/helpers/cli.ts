import { spawnSync } from "node:child_process";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

/** The built CLI, run the way a user runs it (npm test builds before vitest). */
export const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");

export interface CliResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs `addcow ...args` in cwd with DEBUG unset, so errors are the plain one-liners. */
export function addcow(cwd: string, ...args: string[]): CliResult {
  return addcowEnv(cwd, {}, ...args);
}

/** Like addcow(), with extra environment variables (e.g. DEBUG). */
export function addcowEnv(
  cwd: string,
  extra: Record<string, string>,
  ...args: string[]
): CliResult {
  if (!fs.existsSync(ADDCOW)) {
    throw new Error(`${ADDCOW} is missing: run npm run build first`);
  }
  const env = { ...process.env };
  delete env.DEBUG;
  Object.assign(env, extra);
  const r = spawnSync(process.execPath, [ADDCOW, ...args], { cwd, env, encoding: "utf8" });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

export function tempDir(prefix = "addcow-cli-"): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** A cheap fingerprint of a file (size + content hash), to prove it was not modified. */
export function fingerprint(file: string): string {
  if (!fs.existsSync(file)) return "missing";
  const h = crypto.createHash("sha256");
  const fd = fs.openSync(file, "r");
  try {
    const buf = Buffer.alloc(1 << 20);
    let pos = 0;
    for (;;) {
      const n = fs.readSync(fd, buf, 0, buf.length, pos);
      if (n === 0) break;
      h.update(buf.subarray(0, n));
      pos += n;
    }
    return `${pos}:${h.digest("hex")}`;
  } finally {
    fs.closeSync(fd);
  }
}

/** Fingerprints of every file in dir (recursively), keyed by relative path. */
export function snapshotDir(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const name of fs.readdirSync(dir, { recursive: true }) as string[]) {
    const full = path.join(dir, name);
    if (fs.statSync(full).isFile()) out[name] = fingerprint(full);
  }
  return out;
}

/** Asserts-friendly view of a failure: exactly one line on stderr. */
export function stderrLines(r: CliResult): string[] {
  return r.stderr.split("\n").filter((l) => l.length > 0);
}
