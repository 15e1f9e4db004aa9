import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, run, tempDir } from "../helpers/mount";
import { machineNode } from "../helpers/runtime";

afterEach(cleanupAll);

const REPO = path.resolve(__dirname, "../..");
const ENGINES = (
  JSON.parse(fs.readFileSync(path.join(REPO, "package.json"), "utf8")) as {
    engines: { node: string };
  }
).engines.node;

/** True when Node.js `version` ("v24.1.0") is inside the package's ">=MAJOR.MINOR". */
function supported(version: string): boolean {
  const [want, have] = [ENGINES.slice(2), version.slice(1)].map((v) => v.split(".").map(Number));
  return have![0]! > want![0]! || (have![0] === want![0] && have![1]! >= want![1]!);
}

describe("the Node.js addcow runs on", () => {
  it("the tests run on a supported Node.js, and check-node says which in one line", async () => {
    expect(ENGINES).toMatch(/^>=\d+\.\d+$/);
    expect(supported(process.version), `tests run on ${process.version}`).toBe(true);
    const r = await run(process.execPath, [path.join(REPO, ".ci/check-node.cjs"), "--report"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toBe(
      `addcow runs on Node.js ${process.version} (${fs.realpathSync(process.execPath)})\n`,
    );
    // Where npm ci linked a Node.js for this checkout, npm test started vitest on it.
    const own = path.join(REPO, "node_modules/.bin/node");
    if (fs.existsSync(own)) expect(fs.realpathSync(own)).toBe(fs.realpathSync(process.execPath));
  });

  it("check-node refuses the machine's own node when it is too old, in one line saying what to run", async (ctx) => {
    const machine = machineNode();
    if (!machine || supported(machine.version)) {
      ctx.skip(); // this machine's node is supported: nothing to refuse
      return;
    }
    const r = await run(machine.file, [path.join(REPO, ".ci/check-node.cjs")]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      new RegExp(
        `^node is Node\\.js ${machine.version} \\(.*\\); addcow needs ${ENGINES}: bash \\.ci/setup .*installs Node\\.js 24 beside it\\n$`,
      ),
    );
  });

  it(".ci/install-node PREFIX installs Node.js 24 from the npm registry's node-linux-* package into the prefix; again is fine", async () => {
    const prefix = path.join(tempDir("addcow-node-"), "node");
    for (let i = 0; i < 2; i++) {
      const r = await run("bash", [path.join(REPO, ".ci/install-node"), prefix], {
        timeoutMs: 240_000,
      });
      expect(r.code, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/^install-node: Node\.js v24\.\d+\.\d+ in .*\/bin\/node\n$/);
    }
    const node = path.join(prefix, "bin/node");
    const v = await run(node, [
      "-p",
      "process.version + ' ' + typeof require('zlib').zstdDecompressSync",
    ]);
    expect(v.stdout).toMatch(/^v24\.\d+\.\d+ function\n$/);
    // Nothing else on the machine changed: the machine's node is what it was.
    const machine = machineNode();
    if (machine) expect(fs.realpathSync(machine.file)).not.toBe(fs.realpathSync(node));
  }, 300_000);

  it(".ci/link-node (npm ci's prepare) links the installed Node.js as node_modules/.bin/node, and drops the link once it is gone", async () => {
    const dir = tempDir();
    const prefix = path.join(dir, "node");
    fs.mkdirSync(path.join(prefix, "bin"), { recursive: true });
    fs.writeFileSync(path.join(prefix, "bin/node"), "#!/bin/sh\necho fake\n", { mode: 0o755 });
    const env = { ...process.env, ADDCOW_NODE_PREFIX: prefix };
    const link = path.join(dir, "node_modules/.bin/node");
    for (let i = 0; i < 2; i++) {
      const r = await run("sh", [path.join(REPO, ".ci/link-node")], { cwd: dir, env });
      expect(r.code, r.stderr).toBe(0);
      expect(fs.readlinkSync(link)).toBe(path.join(prefix, "bin/node"));
    }
    fs.rmSync(prefix, { recursive: true });
    const r = await run("sh", [path.join(REPO, ".ci/link-node")], { cwd: dir, env });
    expect(r.code, r.stderr).toBe(0);
    expect(fs.existsSync(link) || fs.lstatSync(link, { throwIfNoEntry: false })).toBeFalsy();
  });
});
