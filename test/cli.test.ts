import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { addcow, snapshotDir, stderrLines, tempDir } from "./cli-helpers";

let dir: string;
beforeEach(() => {
  dir = tempDir();
});
afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

/** A sparse raw file of the given size, optionally with some bytes at the start. */
function rawFile(name: string, size: number, head?: Buffer): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, head ?? Buffer.alloc(0));
  fs.truncateSync(file, size);
  return file;
}

/** Runs a command expected to fail: exit code, one stderr line, no file changed. */
function expectFailure(code: number, args: string[], pattern: RegExp): string {
  const before = snapshotDir(dir);
  const r = addcow(dir, ...args);
  expect(r.code, r.stderr).toBe(code);
  const lines = stderrLines(r);
  expect(lines).toHaveLength(1);
  expect(lines[0]).toMatch(/^addcow: /);
  expect(lines[0]).toMatch(pattern);
  expect(r.stdout).toBe("");
  expect(snapshotDir(dir)).toEqual(before);
  return lines[0]!;
}

describe("addcow create", () => {
  it("creates an overlay over a raw backing file, sized like the backing file", () => {
    rawFile("base.raw", 8 << 20);
    const r = addcow(dir, "create", "-b", "base.raw", "-F", "raw", "disk.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^Formatting 'disk.add-cow', size 8 MiB \(8388608 bytes\)/);
    expect(r.stderr).toBe("");
    expect(fs.statSync(path.join(dir, "disk.raw")).size).toBe(8 << 20);
    // Header + one 64 KiB bitmap cluster.
    expect(fs.statSync(path.join(dir, "disk.add-cow")).size).toBe(65536 + 65536);
    // The image file is sparse.
    expect(fs.statSync(path.join(dir, "disk.raw")).blocks).toBe(0);
  });

  it("creates a disk without backing file from SIZE", () => {
    const r = addcow(dir, "create", "-c", "4K", "solo.add-cow", "1G");
    expect(r.code, r.stderr).toBe(0);
    expect(fs.statSync(path.join(dir, "solo.raw")).size).toBe(1 << 30);
    // 4 KiB header + 262144 clusters / 8 = 32 KiB of bitmap.
    expect(fs.statSync(path.join(dir, "solo.add-cow")).size).toBe(4096 + 32768);
  });

  it("stores relative names relative to the .add-cow file's directory", () => {
    rawFile("base.raw", 1 << 20);
    fs.mkdirSync(path.join(dir, "sub"));
    const r = addcow(dir, "create", "-b", "base.raw", "-F", "raw", "sub/top.add-cow");
    expect(r.code, r.stderr).toBe(0);
    const header = fs.readFileSync(path.join(dir, "sub/top.add-cow")).subarray(76, 76 + 32);
    expect(header.toString("latin1")).toMatch(/^\.\.\/base\.rawtop\.raw\0/);
  });

  it("refuses a backing file without -F and names the flag", () => {
    rawFile("base.raw", 1 << 20);
    expectFailure(1, ["create", "-b", "base.raw", "disk.add-cow"], /-F raw or -F add-cow/);
  });

  it("refuses an image file that is the backing file", () => {
    rawFile("base.raw", 1 << 20);
    expectFailure(
      1,
      ["create", "-b", "base.raw", "-F", "raw", "-i", "base.raw", "disk.add-cow"],
      /same file/,
    );
  });

  it("refuses an existing .add-cow file and leaves it unchanged", () => {
    expect(addcow(dir, "create", "disk.add-cow", "1M").code).toBe(0);
    fs.appendFileSync(path.join(dir, "disk.add-cow"), "x");
    expectFailure(1, ["create", "disk.add-cow", "2M"], /already exists/);
  });

  it("never truncates an existing image file: a larger image makes the disk larger", () => {
    rawFile("base.raw", 1 << 20);
    rawFile("disk.raw", 3 << 20, Buffer.from("keep me"));
    const r = addcow(dir, "create", "-b", "base.raw", "-F", "raw", "disk.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/size 3 MiB .*kept existing/);
    expect(fs.statSync(path.join(dir, "disk.raw")).size).toBe(3 << 20);
    expect(fs.readFileSync(path.join(dir, "disk.raw")).subarray(0, 7).toString()).toBe("keep me");
  });

  it("refuses a SIZE smaller than an existing image file", () => {
    rawFile("disk.raw", 3 << 20);
    expectFailure(1, ["create", "disk.add-cow", "1M"], /never shrunk/);
  });

  it.each([
    ["-1", /invalid size "-1"/],
    ["12Q", /invalid size "12Q"/],
    ["0", /size .*0/],
    ["1.3K", /not a whole number/],
  ])("rejects the size %s", (size, pattern) => {
    expectFailure(1, ["create", "disk.add-cow", size], pattern);
  });

  it("rejects a bad cluster size", () => {
    expectFailure(1, ["create", "-c", "3000", "disk.add-cow", "1M"], /cluster size 3000/);
    expectFailure(1, ["create", "-c", "4M", "disk.add-cow", "1M"], /cluster size/);
  });

  it("needs a size when there is no backing file", () => {
    expectFailure(1, ["create", "disk.add-cow"], /no size given/);
  });

  it("reports usage errors in one line with exit code 1", () => {
    expectFailure(
      1,
      ["create", "--frobnicate", "disk.add-cow", "1M"],
      /unknown option '--frobnicate'/,
    );
    expectFailure(1, ["create"], /missing required argument 'file'/);
    expectFailure(1, ["create", "a.add-cow", "1M", "extra"], /too many arguments/);
    expectFailure(1, ["create", "-b"], /argument missing/);
    expectFailure(1, ["creat", "x"], /unknown command 'creat'/);
  });

  it("prints help and version", () => {
    const help = addcow(dir, "create", "--help");
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/Usage: addcow create \[options\] <file> \[size\]/);
    const version = addcow(dir, "--version");
    expect(version.code).toBe(0);
    expect(version.stdout.trim()).toMatch(/^\d+\.\d+\.\d+/);
  });
});
