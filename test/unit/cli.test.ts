import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import type { CheckReport } from "../../src/ops/check";
import type { DiskInfo } from "../../src/ops/info";
import type { MapExtent } from "../../src/ops/map";
import { openDisk } from "../../src/chain/open-chain";
import { encodeHeader } from "../../src/addcow/header";
import { addcow, addcowEnv, snapshotDir, stderrLines, tempDir } from "../helpers/cli";

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
    // Header + one 64 KiB bitmap cluster + the backing pin (two 4 KiB slots).
    expect(fs.statSync(path.join(dir, "disk.add-cow")).size).toBe(65536 + 65536 + 8192);
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
    expectFailure(
      1,
      ["create", "-b", "base.raw", "disk.add-cow"],
      /-F raw, -F qcow2 or -F add-cow/,
    );
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
    rawFile("base.raw", 1 << 20, Buffer.alloc(1 << 20, 0xb5));
    rawFile("disk.raw", 3 << 20, Buffer.from("keep me"));
    const r = addcow(dir, "create", "-b", "base.raw", "-F", "raw", "disk.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/size 3 MiB .*kept existing/);
    expect(fs.statSync(path.join(dir, "disk.raw")).size).toBe(3 << 20);
    expect(fs.readFileSync(path.join(dir, "disk.raw")).subarray(0, 7).toString()).toBe("keep me");
    // Past the backing file's end the disk reads zeros.
    const map = JSON.parse(addcow(dir, "map", "--json", "disk.add-cow").stdout) as MapExtent[];
    expect(map.map((e) => [e.start, e.length, e.source])).toEqual([
      [0, 1 << 20, "backing"],
      [1 << 20, 2 << 20, "zero"],
    ]);
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

  it("adds a stack trace only when DEBUG=addcow:* is set", () => {
    const plain = addcow(dir, "create", "disk.add-cow", "0");
    expect(stderrLines(plain)).toHaveLength(1);
    const traced = addcowEnv(dir, { DEBUG: "addcow:*" }, "create", "disk.add-cow", "0");
    expect(traced.code).toBe(1);
    // After the addcow:cli line naming the program and its Node.js.
    expect(traced.stderr).toMatch(
      /^\S+ addcow:cli addcow \S+ on Node\.js v[\d.]+ \(.*\)\naddcow: invalid size/,
    );
    expect(traced.stderr).toMatch(/\n\s+at .*ops\/create/);
  });

  it("prints help and version", () => {
    const help = addcow(dir, "create", "--help");
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/Usage: addcow create \[options\] <file> \[size\]/);
    for (const sub of ["info", "map", "check"]) {
      const r = addcow(dir, sub, "--help");
      expect(r.code).toBe(0);
      expect(r.stdout).toMatch(new RegExp(`Usage: addcow ${sub} \\[options\\] <file>`));
      expect(r.stdout).toMatch(/--json/);
    }
    const version = addcow(dir, "--version");
    expect(version.code).toBe(0);
    expect(version.stdout.trim()).toMatch(/^\d+\.\d+\.\d+/);
  });
});

/** Writes through the engine, as the FUSE daemon would, and closes (flushes) the disk. */
async function writeDisk(file: string, writes: Array<[number, number, number]>): Promise<void> {
  const disk = await openDisk(path.join(dir, file), { writable: true });
  try {
    for (const [offset, length, byte] of writes) {
      await disk.write(Buffer.alloc(length, byte), offset);
    }
  } finally {
    await disk.close();
  }
}

function json<T>(args: string[]): T {
  const r = addcow(dir, ...args);
  expect(r.code, r.stderr).toBe(0);
  expect(r.stderr).toBe("");
  return JSON.parse(r.stdout) as T;
}

describe("qemu-img spellings", () => {
  it("--output=json|human is --json or the text; -f add-cow is accepted, any other format refused", () => {
    rawFile("base.raw", 1 << 20, Buffer.alloc(1 << 20, 3));
    expect(addcow(dir, "create", "-q", "-b", "base.raw", "-F", "raw", "d.add-cow").code).toBe(0);
    for (const cmd of ["info", "map", "check"]) {
      const json = addcow(dir, cmd, "--output=json", "-f", "add-cow", "d.add-cow");
      expect(json.code, json.stderr).toBe(0);
      expect(json.stdout).toBe(addcow(dir, cmd, "--json", "d.add-cow").stdout);
      const human = addcow(dir, cmd, "--output", "human", "d.add-cow");
      expect(human.stdout).toBe(addcow(dir, cmd, "d.add-cow").stdout);
    }
    for (const args of [
      ["info", "-f", "qcow2", "d.add-cow"],
      ["map", "-f", "raw", "d.add-cow"],
      ["check", "-f", "vmdk", "d.add-cow"],
      ["stream", "-f", "qcow2", "d.add-cow"],
      ["commit", "-f", "qcow2", "d.add-cow"],
      ["snapshot", "-f", "qcow2", "d.add-cow", "s.add-cow"],
      ["rebase", "-f", "qcow2", "-b", "", "d.add-cow"],
      ["resize", "-f", "qcow2", "d.add-cow", "+1M"],
    ]) {
      expectFailure(1, args, /addcow works on add-cow disks only \(-f add-cow\)/);
    }
    expectFailure(1, ["info", "--output=xml", "d.add-cow"], /Allowed choices are json, human/);
    expectFailure(1, ["map", "--json", "--output=human", "d.add-cow"], /contradict/);
    const jobs = addcow(dir, "jobs", "--output=json");
    expect(jobs.code, jobs.stderr).toBe(0);
    expect(JSON.parse(jobs.stdout)).toBeInstanceOf(Array);
  });
});

describe("addcow info and map", () => {
  it("describes a fresh overlay over a 2 GiB sparse raw backing file", () => {
    rawFile("base.raw", 2 * 2 ** 30);
    expect(addcow(dir, "create", "-b", "base.raw", "-F", "raw", "disk.add-cow").code).toBe(0);
    const info = json<DiskInfo>(["info", "--json", "disk.add-cow"]);
    expect(info).toMatchObject({
      file: "disk.add-cow",
      format: "add-cow",
      virtualSize: 2 * 2 ** 30,
      clusterSize: 65536,
      clusterBits: 16,
      headerSize: 65536,
      clusters: 32768,
      allocatedClusters: 0,
      allocatedPercent: 0,
      chainDepth: 1,
      image: { stored: "disk.raw", path: path.join(dir, "disk.raw"), format: "raw" },
      backing: { stored: "base.raw", path: path.join(dir, "base.raw"), format: "raw" },
      // Bit 1: the backing's identity is pinned.
      features: { allAllocated: false, compatibleBits: [1], incompatibleBits: [] },
      pin: { state: "pinned", identity: { kind: "file", format: "raw", size: 2 * 2 ** 30 } },
    });
    expect(info.backingChain).toBeUndefined();
    // The backing file is one hole: block status knows it reads as zeros (SEEK_HOLE).
    expect(json<MapExtent[]>(["map", "--json", "disk.add-cow"])).toEqual([
      { start: 0, length: 2 * 2 ** 30, source: "zero", depth: null, file: null },
    ]);
    // Data in it shows where it is.
    const fd = fs.openSync(path.join(dir, "base.raw"), "r+");
    fs.writeSync(fd, Buffer.alloc(8192, 1), 0, 8192, 1 << 20);
    fs.closeSync(fd);
    // The base changed under the disk: its pin refuses it until that is accepted.
    expect(addcow(dir, "map", "disk.add-cow").stderr).toMatch(/fingerprint was .*, now /);
    expect(addcow(dir, "rebase", "-u", "-b", "base.raw", "-F", "raw", "disk.add-cow").code).toBe(0);
    expect(json<MapExtent[]>(["map", "--json", "disk.add-cow"])).toEqual([
      { start: 0, length: 1 << 20, source: "zero", depth: null, file: null },
      {
        start: 1 << 20,
        length: 8192,
        source: "backing",
        depth: 1,
        file: path.join(dir, "base.raw"),
      },
      {
        start: (1 << 20) + 8192,
        length: 2 * 2 ** 30 - (1 << 20) - 8192,
        source: "zero",
        depth: null,
        file: null,
      },
    ]);
  });

  it("reports allocation and extents after writes through the engine", async () => {
    rawFile("base.raw", 1 << 20, Buffer.alloc(1 << 20, 0x5a));
    expect(
      addcow(dir, "create", "-c", "4K", "-b", "base.raw", "-F", "raw", "d.add-cow", "2M").code,
    ).toBe(0);
    // Cluster 1 (partial write: copy-on-write fills it) and clusters 3..4.
    await writeDisk("d.add-cow", [
      [4096 + 100, 10, 1],
      [3 * 4096, 2 * 4096, 2],
    ]);
    const info = json<DiskInfo>(["info", "--json", "d.add-cow"]);
    expect(info.virtualSize).toBe(2 << 20);
    expect(info.clusters).toBe(512);
    expect(info.allocatedClusters).toBe(3);
    expect(info.allocatedPercent).toBe(0.58);
    const image = path.join(dir, "d.raw");
    const base = path.join(dir, "base.raw");
    expect(json<MapExtent[]>(["map", "--json", "d.add-cow"])).toEqual([
      { start: 0, length: 4096, source: "backing", depth: 1, file: base },
      { start: 4096, length: 4096, source: "image", depth: 0, file: image },
      { start: 8192, length: 4096, source: "backing", depth: 1, file: base },
      { start: 12288, length: 8192, source: "image", depth: 0, file: image },
      { start: 20480, length: (1 << 20) - 20480, source: "backing", depth: 1, file: base },
      { start: 1 << 20, length: 1 << 20, source: "zero", depth: null, file: null },
    ]);
    const text = addcow(dir, "map", "d.add-cow");
    expect(text.code).toBe(0);
    expect(text.stdout.split("\n")[0]).toMatch(/^Offset\s+Length\s+Source\s+Depth\s+File$/);
    expect(text.stdout).toMatch(/^0x1000\s+0x1000\s+image\s+0\s+\S+d\.raw$/m);
    expect(text.stdout).toMatch(/^0x100000\s+0x100000\s+zero\s+-\s+-$/m);
    const human = addcow(dir, "info", "d.add-cow");
    expect(human.stdout).toMatch(/^virtual size: 2 MiB \(2097152 bytes\)$/m);
    expect(human.stdout).toMatch(/^allocated: 3 of 512 clusters \(0\.58%\)$/m);
  });

  it("walks an add-cow backing chain (--backing-chain, map depths)", async () => {
    rawFile("base.raw", 1 << 20, Buffer.alloc(1 << 20, 0x5a));
    expect(
      addcow(dir, "create", "-c", "4K", "-b", "base.raw", "-F", "raw", "mid.add-cow").code,
    ).toBe(0);
    await writeDisk("mid.add-cow", [[0, 8192, 3]]);
    expect(
      addcow(dir, "create", "-c", "4K", "-b", "mid.add-cow", "-F", "add-cow", "top.add-cow").code,
    ).toBe(0);
    await writeDisk("top.add-cow", [[4096, 4096, 4]]);
    const info = json<DiskInfo>(["info", "--json", "--backing-chain", "top.add-cow"]);
    expect(info.chainDepth).toBe(2);
    expect(info.backing).toMatchObject({ stored: "mid.add-cow", format: "add-cow", inUse: true });
    expect(info.backingChain).toHaveLength(2);
    expect(info.backingChain![0]).toMatchObject({
      depth: 1,
      format: "add-cow",
      allocatedClusters: 2,
    });
    expect(info.backingChain![1]).toMatchObject({ depth: 2, format: "raw", virtualSize: 1 << 20 });
    expect(json<MapExtent[]>(["map", "--json", "top.add-cow"])).toEqual([
      { start: 0, length: 4096, source: "backing", depth: 1, file: path.join(dir, "mid.raw") },
      { start: 4096, length: 4096, source: "image", depth: 0, file: path.join(dir, "top.raw") },
      {
        start: 8192,
        length: (1 << 20) - 8192,
        source: "backing",
        depth: 2,
        file: path.join(dir, "base.raw"),
      },
    ]);
  });

  it("fails cleanly on a missing or non-add-cow file", () => {
    expectFailure(1, ["info", "missing.add-cow"], /missing\.add-cow does not exist/);
    rawFile("plain.raw", 8192, Buffer.from("hello"));
    expectFailure(1, ["map", "plain.raw"], /not an add-cow file/);
    expectFailure(1, ["info"], /missing required argument/);
  });
});

describe("addcow check", () => {
  function setup(): void {
    rawFile("base.raw", 1 << 20);
    expect(addcow(dir, "create", "-c", "4K", "-b", "base.raw", "-F", "raw", "d.add-cow").code).toBe(
      0,
    );
  }

  /** Runs check, expecting findings (exit 2), and proves nothing was modified. */
  function checkCorrupt(): { report: CheckReport; lines: string[] } {
    const before = snapshotDir(dir);
    const r = addcow(dir, "check", "--json", "d.add-cow");
    expect(r.code, r.stdout + r.stderr).toBe(2);
    expect(r.stderr).toBe("");
    const text = addcow(dir, "check", "d.add-cow");
    expect(text.code).toBe(2);
    expect(snapshotDir(dir)).toEqual(before);
    return { report: JSON.parse(r.stdout) as CheckReport, lines: text.stdout.trim().split("\n") };
  }

  it("passes a clean disk with exit 0", async () => {
    setup();
    await writeDisk("d.add-cow", [[5000, 3, 7]]);
    const r = addcow(dir, "check", "d.add-cow");
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toMatch(/^No errors were found on the disk\.$/m);
    expect(r.stdout).toMatch(/^1\/256 = 0\.39% allocated$/m);
    const report = json<CheckReport>(["check", "--json", "d.add-cow"]);
    expect(report).toMatchObject({
      clean: true,
      findings: [],
      clusters: 256,
      allocatedClusters: 1,
    });
  });

  it("finds a padding bit set past the end of the disk", () => {
    setup();
    // 256 clusters use bitmap bytes 4096..4127; byte 4200 is padding.
    const fd = fs.openSync(path.join(dir, "d.add-cow"), "r+");
    fs.writeSync(fd, Buffer.from([0x10]), 0, 1, 4200);
    fs.closeSync(fd);
    const { report, lines } = checkCorrupt();
    expect(report.findings).toEqual([
      expect.objectContaining({
        severity: "corruption",
        offset: 4200,
        field: "bitmap",
        file: "d.add-cow",
      }),
    ]);
    expect(report.findings[0]!.message).toMatch(/bits set past the end of the disk/);
    expect(lines[0]).toMatch(/^d\.add-cow: corruption: bitmap at byte 4200: bits set past the end/);
  });

  it("finds a truncated bitmap", () => {
    setup();
    fs.truncateSync(path.join(dir, "d.add-cow"), 4096 + 10);
    const { report } = checkCorrupt();
    expect(report.findings).toEqual([
      expect.objectContaining({ severity: "corruption", offset: 4106, field: "bitmap" }),
      // The pin at the end of the file went with it.
      expect.objectContaining({ severity: "corruption", field: "backing pin" }),
    ]);
    expect(report.findings[0]!.message).toMatch(/bitmap is truncated/);
  });

  it("lists every finding: bad header field, missing backing file", () => {
    setup();
    fs.rmSync(path.join(dir, "base.raw"));
    let r = checkCorrupt();
    expect(r.report.findings.map((f) => f.field)).toEqual(["backing file"]);
    expect(r.lines[0]).toMatch(/backing file .*base\.raw.* does not exist/);
    const fd = fs.openSync(path.join(dir, "d.add-cow"), "r+");
    fs.writeSync(fd, Buffer.from([30]), 0, 1, 20); // cluster_bits 30
    fs.closeSync(fd);
    r = checkCorrupt();
    expect(r.report.findings).toEqual([
      expect.objectContaining({ offset: 20, field: "cluster_bits" }),
    ]);
  });

  it("finds the all-allocated feature set while bits are 0", () => {
    setup();
    const fd = fs.openSync(path.join(dir, "d.add-cow"), "r+");
    fs.writeSync(fd, Buffer.from([1 | 2]), 0, 1, 32); // all allocated; the pin (bit 1) stays
    fs.closeSync(fd);
    const { report } = checkCorrupt();
    expect(report.findings).toEqual([
      expect.objectContaining({ offset: 32, field: "compatible features" }),
    ]);
    expect(report.findings[0]!.message).toMatch(/256 of 256 clusters have bit 0/);
  });

  it("finds a missing image file and a backing chain that loops", () => {
    setup();
    expect(addcow(dir, "create", "-b", "d.add-cow", "-F", "add-cow", "top.add-cow").code).toBe(0);
    // Make d.add-cow name top.add-cow as its backing file: top -> d -> top.
    const file = path.join(dir, "d.add-cow");
    const header = encodeHeader({
      clusterBits: 12,
      headerSize: 4096,
      incompatibleFeatures: 0n,
      compatibleFeatures: 2n, // its pin stays (for base.raw: stale, but the loop comes first)
      backingName: "top.add-cow",
      backingFormat: "add-cow",
      imageName: "d.raw",
      imageFormat: "raw",
    });
    const fd = fs.openSync(file, "r+");
    fs.writeSync(fd, header, 0, header.length, 0);
    fs.closeSync(fd);
    const { report, lines } = checkCorrupt();
    expect(report.findings.map((f) => f.field)).toEqual(["backing chain"]);
    expect(lines[0]).toMatch(/^d\.add-cow: corruption: backing chain: .*(same file|loop)/);
    fs.rmSync(path.join(dir, "d.raw"));
    const again = checkCorrupt();
    expect(again.report.findings[0]).toMatchObject({ field: "image file" });
    expect(again.report.findings[0]!.message).toMatch(/d\.raw.* does not exist/);
  });

  it("refuses to check a disk open for writing (exit 1) unless -U is given", async () => {
    setup();
    const disk = await openDisk(path.join(dir, "d.add-cow"), { writable: true });
    try {
      expectFailure(1, ["check", "d.add-cow"], /in use by process/);
      expectFailure(1, ["info", "d.add-cow"], /in use by process/);
      const r = addcow(dir, "check", "-U", "d.add-cow");
      expect(r.code, r.stdout + r.stderr).toBe(0);
      expect(addcow(dir, "map", "-U", "d.add-cow").code).toBe(0);
    } finally {
      await disk.close();
    }
  });

  it("accepts a fully allocated disk whose backing file is gone", async () => {
    setup();
    const disk = await openDisk(path.join(dir, "d.add-cow"), { writable: true });
    try {
      await disk.write(Buffer.alloc(1 << 20, 9), 0);
      await disk.markAllAllocated();
    } finally {
      await disk.close();
    }
    fs.rmSync(path.join(dir, "base.raw"));
    const r = addcow(dir, "check", "d.add-cow");
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toMatch(/^256\/256 = 100\.00% allocated$/m);
    const info = json<DiskInfo>(["info", "--json", "d.add-cow"]);
    expect(info).toMatchObject({
      allocatedClusters: 256,
      allocatedPercent: 100,
      chainDepth: 0,
      backing: { stored: "base.raw", inUse: false },
      features: { allAllocated: true, compatibleBits: [0, 1] },
    });
    expect(json<MapExtent[]>(["map", "--json", "d.add-cow"])).toEqual([
      { start: 0, length: 1 << 20, source: "image", depth: 0, file: path.join(dir, "d.raw") },
    ]);
  });

  it("exits 1 when it cannot check at all", () => {
    expectFailure(
      1,
      ["check", "nothere.add-cow"],
      /cannot check nothere\.add-cow: it does not exist/,
    );
    fs.mkdirSync(path.join(dir, "adir.add-cow"));
    expectFailure(1, ["check", "adir.add-cow"], /not a regular file/);
  });
});
