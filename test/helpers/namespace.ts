import * as fs from "node:fs";
import * as path from "node:path";
import { run } from "./mount";

/**
 * mount(8) runs helpers from /sbin only, and mount.fuse runs the type's
 * program with a fixed PATH: both are the system's. Tests that drive the real
 * mount(8) run a bash script in a private mount namespace (unshare) where a
 * directory of their own stands in for /usr/sbin: links to every program of
 * the real one (bound beside it first, so the links do not point at
 * themselves) except an installed mount.fuse.addcow, plus the one to test
 * (or none). Nothing changes outside.
 */
export function sbinWithHelper(dir: string, helper?: string): { sbin: string; prelude: string } {
  const real = path.join(dir, "real-sbin");
  const sbin = path.join(dir, "sbin");
  fs.mkdirSync(real);
  fs.mkdirSync(sbin);
  for (const name of fs.readdirSync("/usr/sbin")) {
    // The system's own helper (.ci/setup installs one) never stands in for the one under test.
    if (name === "mount.fuse.addcow") continue;
    fs.symlinkSync(path.join(real, name), path.join(sbin, name));
  }
  if (helper) fs.symlinkSync(helper, path.join(sbin, "mount.fuse.addcow"));
  return { sbin, prelude: `mount --bind /usr/sbin ${real}\nmount --bind ${sbin} /usr/sbin` };
}

/** Runs a bash script (errexit, pipefail) in a private mount namespace. */
export function inNamespace(
  script: string,
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {},
) {
  return run(
    "unshare",
    ["--mount", "--propagation", "private", "bash", "-euo", "pipefail", "-c", script],
    { timeoutMs: 120_000, ...opts },
  );
}
