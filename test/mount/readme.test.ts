import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, run, tempDir } from "../helpers/mount";
import { inNamespace, sbinWithHelper } from "../helpers/namespace";
import { expectOwnRuntime, installCommands, shellPath } from "../helpers/runtime";

afterEach(cleanupAll);

const REPO = path.resolve(__dirname, "../..");

/** The ```sh blocks of a markdown section, in order. */
export function shellBlocks(markdown: string, from: string, to: string): string[] {
  const section = markdown.slice(markdown.indexOf(from), markdown.indexOf(to));
  return [...section.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
}

describe("README", () => {
  it("every command of its Usage section runs as written, after the set-up's install step", async () => {
    const blocks = shellBlocks(
      fs.readFileSync(path.join(REPO, "README.md"), "utf8"),
      "## Usage",
      "## Command reference",
    );
    expect(blocks.length).toBeGreaterThanOrEqual(5);
    const dir = tempDir("addcow-readme-");
    // What .ci/setup does to put the commands on the PATH, into a prefix of this test's own,
    // and mount.fuse.addcow into a copy of /usr/sbin that the namespace below uses.
    const { sbin, prelude } = sbinWithHelper(dir);
    const bin = await installCommands(dir, sbin);
    const work = path.join(dir, "work");
    fs.mkdirSync(work);
    // A private mount namespace: /mnt is a tmpfs of its own, /usr/sbin has the helper.
    // The trap undoes what a failing block would leave (a loop device, a mount).
    const script = [
      "mount -t tmpfs tmpfs /mnt",
      prelude,
      `trap 'losetup -d "\${loop:-none}" 2>/dev/null || true; fusermount -uz /mnt/disk 2>/dev/null || true' EXIT`,
      `cd ${work}`,
      ...blocks.map((b, i) => `echo "== block ${i + 1}"\n${b}`),
      "echo README-DONE",
    ].join("\n");
    // A shell's PATH, where the machine's node comes first; each program's start line on
    // stderr (a background daemon's in ADDCOW_MOUNT_LOG) says which Node.js runs it.
    const daemonLog = path.join(dir, "daemons.log");
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      PATH: `${bin}:${shellPath()}`,
      DEBUG: "addcow:cli",
      ADDCOW_MOUNT_LOG: daemonLog,
    };
    const r = await inNamespace(script, { env, timeoutMs: 240_000 });
    expect(r.code, `${r.stdout.slice(-4000)}\n${r.stderr.slice(-4000)}`).toBe(0);
    expectOwnRuntime(`${r.stderr}\n${fs.readFileSync(daemonLog, "utf8")}`, [
      "addcow",
      "addcow-mount",
      "mount.fuse.addcow",
    ]);
    expect(r.stdout).toContain("README-DONE");
    expect(r.stdout).toMatch(/^clean$/m);
    // What the blocks say happens, happened.
    expect(fs.existsSync(path.join(work, "images/base.raw"))).toBe(true);
    const info = await run(path.join(bin, "addcow"), ["info", "--json", "vm2.add-cow"], {
      cwd: work,
    });
    expect(JSON.parse(info.stdout)).toMatchObject({
      backing: null,
      virtualSize: 3 * 2 ** 30,
      features: { allAllocated: true },
    });
  }, 300_000);
});
