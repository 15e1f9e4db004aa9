/**
 * The layer rules of .dependency-cruiser.cjs (run by `npm run lint`): the real
 * tree passes, and a tree with an upward import, a sideways import between
 * formats, a cycle or an unknown folder fails, naming the rule.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cleanupAll, run, tempDir } from "../helpers/mount";

const ROOT = path.resolve(__dirname, "../..");
const DEPCRUISE = path.join(ROOT, "node_modules/.bin/depcruise");
const CONFIG = path.join(ROOT, ".dependency-cruiser.cjs");

afterAll(cleanupAll);

/** depcruise on the src/ folder of `cwd` with the project's rules. */
function cruiseIn(cwd: string) {
  return run(DEPCRUISE, ["src", "--config", CONFIG, "--output-type", "err"], {
    cwd,
    // Plain text: the rule names are matched below.
    env: { ...process.env, FORCE_COLOR: "0", NO_COLOR: "1" },
    timeoutMs: 120_000,
  });
}

/** A tiny src/ tree with the given files (path -> contents). */
function fixture(files: Record<string, string>): string {
  const dir = tempDir("addcow-layers-");
  fs.writeFileSync(
    path.join(dir, "tsconfig.json"),
    JSON.stringify({ compilerOptions: { module: "commonjs", strict: true }, include: ["src"] }),
  );
  for (const [name, text] of Object.entries(files)) {
    fs.mkdirSync(path.dirname(path.join(dir, name)), { recursive: true });
    fs.writeFileSync(path.join(dir, name), text);
  }
  return dir;
}

describe("layer rules", () => {
  it("the project's own tree has no cycle and no upward or sideways import", async () => {
    const r = await cruiseIn(ROOT);
    expect(r.stdout + r.stderr).not.toMatch(/error/);
    expect(r.code).toBe(0);
  });

  it("fail on an upward import, naming the layer", async () => {
    const dir = fixture({
      "src/block/device.ts": `import { x } from "../ops/job";\nexport const y = x;\n`,
      "src/ops/job.ts": `export const x = 1;\n`,
    });
    const r = await cruiseIn(dir);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/layer-block: src\/block\/device\.ts → src\/ops\/job\.ts/);
  });

  it("fail on an import between two formats", async () => {
    const dir = fixture({
      "src/qcow2/device.ts": `import { x } from "../addcow/header";\nexport const y = x;\n`,
      "src/addcow/header.ts": `export const x = 1;\n`,
    });
    const r = await cruiseIn(dir);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/layer-qcow2/);
  });

  it("fail on a cycle inside one layer", async () => {
    const dir = fixture({
      "src/ops/a.ts": `import { b } from "./b";\nexport const a = () => b;\n`,
      "src/ops/b.ts": `import { a } from "./a";\nexport const b = () => a;\n`,
    });
    const r = await cruiseIn(dir);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/no-cycles/);
  });

  it("fail on a folder that is not a layer", async () => {
    const dir = fixture({
      "src/misc/thing.ts": `import { x } from "../util/log";\nexport const y = x;\n`,
      "src/util/log.ts": `export const x = 1;\n`,
    });
    const r = await cruiseIn(dir);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/known-layers-only/);
  });
});
