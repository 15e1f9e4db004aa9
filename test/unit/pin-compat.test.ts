/**
 * Older addcow versions and the backing pin (docs/specs/add-cow.md, "The
 * backing pin"): the pin is a compatible feature and lives after the bitmap,
 * where an older reader's open accepts a longer bitmap and ignores it. The
 * older CLI is built from the commit before the pin (helpers/older-addcow.ts).
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { spawnSync } from "node:child_process";
import { beforeAll, describe, expect, it } from "vitest";
import { openDisk } from "../../src/chain/open-chain";
import { AddCowError } from "../../src/util/errors";
import { addcow, tempDir } from "../helpers/cli";
import { KiB, MiB, pattern, readDisk, withDisk, writeRaw } from "../helpers/jobs";
import { olderAddcow } from "../helpers/older-addcow";

let OLD = "";

beforeAll(() => {
  OLD = olderAddcow();
}, 120_000);

function old(cwd: string, ...args: string[]) {
  const env = { ...process.env };
  delete env.DEBUG;
  const r = spawnSync(process.execPath, [OLD, ...args], { cwd, env, encoding: "utf8" });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function pinnedDisk() {
  const dir = tempDir("addcow-compat-");
  writeRaw(path.join(dir, "base.raw"), pattern(4 * MiB, 1));
  expect(addcow(dir, "create", "-q", "-b", "base.raw", "-F", "raw", "vm.add-cow").code).toBe(0);
  const disk = path.join(dir, "vm.add-cow");
  await withDisk(disk, { writable: true }, async (dev) => {
    await dev.write(pattern(200 * KiB, 2), 1 * MiB + 4096);
  });
  return { dir, disk, reads: await readDisk(disk) };
}

describe("an older addcow and a pinned disk", () => {
  it("opens it and reads it as this one does: info, map, the bytes (stream makes them standalone)", async () => {
    const { dir, disk, reads } = await pinnedDisk();
    expect(old(dir, "--version").code).toBe(0);
    const info = old(dir, "info", "--json", "vm.add-cow");
    expect(info.code, info.stderr).toBe(0);
    expect(JSON.parse(info.stdout)).toMatchObject({
      virtualSize: 4 * MiB,
      allocatedClusters: 4,
      features: { compatibleBits: [1], unknownCompatibleBits: [1] },
    });
    const oldMap = old(dir, "map", "--json", "vm.add-cow");
    expect(oldMap.code, oldMap.stderr).toBe(0);
    expect(JSON.parse(oldMap.stdout)).toEqual(
      JSON.parse(addcow(dir, "map", "--json", "vm.add-cow").stdout),
    );
    // The older version writes through it too: a stream copies every cluster into the image file.
    const s = old(dir, "stream", "vm.add-cow");
    expect(s.code, s.stderr).toBe(0);
    expect(fs.readFileSync(path.join(dir, "vm.raw")).equals(reads)).toBe(true);
    // ... and this version still finds its pin afterwards.
    expect(JSON.parse(addcow(dir, "info", "--json", "vm.add-cow").stdout).pin).toMatchObject({
      state: "pinned",
    });
    expect(fs.existsSync(disk)).toBe(true);
  });

  it("what it cannot do: its check reports the pin as bits past the end; its resize loses the pin, which this version then says", async () => {
    const { dir, disk } = await pinnedDisk();
    const c = old(dir, "check", "vm.add-cow");
    expect(c.code).toBe(2);
    expect(c.stdout).toMatch(/unknown compatible feature bits 0x2 are set \(ignored\)/);
    expect(c.stdout).toMatch(/bits set past the end of the disk/);
    expect(addcow(dir, "check", "vm.add-cow").code).toBe(0);

    const r = old(dir, "resize", "vm.add-cow", "64M");
    expect(r.code, r.stderr).toBe(0);
    let err: unknown;
    try {
      await openDisk(disk);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(AddCowError);
    expect((err as AddCowError).message).toMatch(
      /vm\.add-cow: the pin of backing file .*base\.raw \(compatible feature bit 1\) cannot be read: .*an addcow without pins resized the disk.*addcow rebase -u -b .*base\.raw -F raw .*vm\.add-cow/,
    );
    const u = addcow(dir, "rebase", "-u", "-b", "base.raw", "-F", "raw", "vm.add-cow");
    expect(u.code, u.stderr).toBe(0);
    expect(addcow(dir, "check", "vm.add-cow").code).toBe(0);
  });

  it("a rebase by an older addcow leaves a pin for the old backing name: refused until re-pinned", async () => {
    const { dir } = await pinnedDisk();
    fs.copyFileSync(path.join(dir, "base.raw"), path.join(dir, "copy.raw"));
    const r = old(dir, "rebase", "-u", "-b", "copy.raw", "-F", "raw", "vm.add-cow");
    expect(r.code, r.stderr).toBe(0);
    const info = addcow(dir, "info", "vm.add-cow");
    expect(info.code).toBe(1);
    expect(info.stderr).toMatch(
      /its pin was taken for another backing file than .*copy\.raw \(an addcow without pins changed the backing name\)/,
    );
    expect(addcow(dir, "rebase", "-u", "-b", "copy.raw", "-F", "raw", "vm.add-cow").code).toBe(0);
    expect(addcow(dir, "info", "vm.add-cow").code).toBe(0);
  });
});
