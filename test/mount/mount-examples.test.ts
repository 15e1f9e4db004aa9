import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { afterEach } from "vitest";
import { cleanupAll, run, tempDir } from "../helpers/mount";

afterEach(cleanupAll);

// The runnable examples users copy from, and `npm run demo` (the README's first command).
const dir = path.join(__dirname, "../..", "mount-examples");

function mountsUnder(prefix: string): string[] {
  const fs = require("node:fs") as typeof import("node:fs");
  return fs
    .readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[4] ?? "")
    .filter((p) => p.startsWith(prefix));
}

describe("mount-examples", () => {
  for (const script of [
    "dd-in-and-out.sh",
    "partitioned-disk.sh",
    "qemu.sh",
    "discard-overlay.sh",
  ]) {
    it(`${script} runs to the end and leaves nothing mounted`, async () => {
      const tmp = tempDir();
      const r = await run("bash", [path.join(dir, script)], {
        timeoutMs: 120_000,
        env: { ...process.env, TMPDIR: tmp },
      });
      expect(r.code, r.stdout.slice(-2000) + r.stderr).toBe(0);
      expect(mountsUnder(tmp)).toEqual([]);
    }, 150_000);
  }

  it("fleet.sh: three overlays on one base over HTTP, the second boots from the shared cache, one streamed to standalone", async () => {
    const tmp = tempDir();
    const r = await run("bash", [path.join(dir, "fleet.sh")], {
      timeoutMs: 240_000,
      env: { ...process.env, TMPDIR: tmp },
    });
    expect(r.code, r.stdout.slice(-3000) + r.stderr).toBe(0);
    expect(mountsUnder(tmp)).toEqual([]);
    expect(r.stdout).toMatch(/vm2 boot: 0 requests to the server/);
    expect(r.stdout).toMatch(/^vm1: vm1$/m);
    expect(r.stdout).toMatch(/^vm2: vm2$/m);
    expect(r.stdout).toMatch(/^base: golden$/m);
    expect(r.stdout).toMatch(/vm3\.raw: vm3 \(standalone\)/);
  }, 300_000);

  it("demo.sh (npm run demo) shows the base unchanged and the overlay's writes persisting", async () => {
    const tmp = tempDir();
    const r = await run("bash", [path.join(dir, "demo.sh")], {
      timeoutMs: 120_000,
      env: { ...process.env, TMPDIR: tmp },
    });
    expect(r.code, r.stdout.slice(-2000) + r.stderr).toBe(0);
    expect(mountsUnder(tmp)).toEqual([]);
    expect(r.stdout).toMatch(/identical to base\.raw/);
    expect(r.stdout).toMatch(/base\.raw: unchanged/);
    expect(r.stdout).toMatch(/overlay's writes persisted/);
  }, 150_000);
});
