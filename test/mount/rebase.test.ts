import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { openDisk } from "../../src/chain/open-chain";
import { Job } from "../../src/jobs/job";
import { rebaseAtRest } from "../../src/jobs/at-rest";
import type { MapExtent } from "../../src/ops/map";
import { addcow, fingerprint } from "../helpers/cli";
import { cleanupAll, mountDisk, tempDir } from "../helpers/mount";
import { MiB, pattern, readDisk } from "../helpers/jobs";

afterEach(cleanupAll);
const dir = (tag: string) => tempDir(`addcow-${tag}-`);

const CLUSTER = 64 * 1024;
/** Writes (offset, length, byte) made the same way into the add-cow disk and the qcow2 one. */
const WRITES: Array<[number, number, number]> = [
  [100 * 1024, 10 * 1024, 7],
  [1 * MiB + 5, 70 * 1024, 8],
  [3 * MiB, 64 * 1024, 9],
];

function writeRawAt(file: string, data: Buffer, pos: number) {
  const fd = fs.openSync(file, "r+");
  fs.writeSync(fd, data, 0, data.length, pos);
  fs.closeSync(fd);
}

/**
 * base1.raw and base2.raw: 4 MiB that differ in a few places (one a whole
 * cluster of zeros in base2, one a hole in base1 that has data in base2),
 * base2 512 KiB shorter. disk.add-cow and disk.qcow2 over base1 with the same writes.
 */
async function twins(d: string) {
  const base1 = path.join(d, "base1.raw");
  const base2 = path.join(d, "base2.raw");
  fs.writeFileSync(base1, pattern(4 * MiB, 1));
  fs.writeFileSync(base2, pattern(4 * MiB, 1));
  writeRawAt(base2, pattern(3000, 2), 700 * 1024);
  writeRawAt(base2, Buffer.alloc(CLUSTER), 2 * MiB);
  writeRawAt(base1, Buffer.alloc(CLUSTER), 2 * MiB + CLUSTER); // zeros in the old one
  fs.truncateSync(base2, 3.5 * MiB);
  expect(addcow(d, "create", "-q", "-b", "base1.raw", "-F", "raw", "disk.add-cow").code).toBe(0);
  const dev = await openDisk(path.join(d, "disk.add-cow"), { writable: true });
  for (const [off, len, byte] of WRITES) await dev.write(Buffer.alloc(len, byte), off);
  await dev.close();
  execFileSync("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-b",
    base1,
    "-F",
    "raw",
    path.join(d, "disk.qcow2"),
    "4M",
  ]);
  for (const [off, len, byte] of WRITES) {
    execFileSync("qemu-io", [
      "-f",
      "qcow2",
      "-c",
      `write -P ${byte} ${off} ${len}`,
      path.join(d, "disk.qcow2"),
    ]);
  }
  return { base1, base2, file: path.join(d, "disk.add-cow"), qcow2: path.join(d, "disk.qcow2") };
}

/** Clusters the overlay holds itself: add-cow map "image" extents, qemu-img map depth 0. */
function ownClusters(d: string, t: { file: string; qcow2: string }) {
  const ours = (JSON.parse(addcow(d, "map", "--json", t.file).stdout) as MapExtent[])
    .filter((e) => e.source === "image")
    .flatMap((e) => range(e.start, e.length));
  const qemu = (
    JSON.parse(
      execFileSync("qemu-img", ["map", "--output=json", t.qcow2], { encoding: "utf8" }),
    ) as Array<{
      start: number;
      length: number;
      depth: number;
    }>
  )
    .filter((e) => e.depth === 0)
    .flatMap((e) => range(e.start, e.length));
  return { ours, qemu };
}

function range(start: number, length: number): number[] {
  const out: number[] = [];
  for (let c = Math.floor(start / CLUSTER); c * CLUSTER < start + length; c++) out.push(c);
  return out;
}

describe("addcow rebase (safe), with qemu-img rebase as the reference", () => {
  it("reads the same before and after, copies the clusters qemu-img copies, and names the new backing", async () => {
    const d = dir("rebase");
    const t = await twins(d);
    const before = await readDisk(t.file);
    const b1 = fingerprint(t.base1);
    const b2 = fingerprint(t.base2);
    const r = addcow(
      d,
      "rebase",
      "-f",
      "add-cow",
      "--json",
      "-b",
      "base2.raw",
      "-F",
      "raw",
      "disk.add-cow",
    );
    expect(r.code, r.stderr).toBe(0);
    const events = r.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { event: string; kind: string; message?: string });
    expect(events.at(-1)).toMatchObject({ event: "completed", kind: "rebase" });
    expect(events.at(-1)!.message).toMatch(
      /now has backing file .*base2\.raw \(raw\); .* copied into image file/,
    );
    execFileSync("qemu-img", ["rebase", "-b", t.base2, "-F", "raw", t.qcow2]);
    // The same disk as before, and as qemu-img's rebased overlay.
    const after = await readDisk(t.file);
    expect(after.equals(before)).toBe(true);
    const dump = path.join(d, "after.raw");
    fs.writeFileSync(dump, after);
    execFileSync("qemu-img", ["compare", "-q", "-f", "raw", "-F", "qcow2", dump, t.qcow2]);
    const own = ownClusters(d, t);
    expect(own.ours).toEqual(own.qemu);
    // The header names base2 as given (relative), the backing files were only read.
    const info = JSON.parse(addcow(d, "info", "--json", "disk.add-cow").stdout) as {
      backing: { stored: string };
    };
    expect(info.backing.stored).toBe("base2.raw");
    expect(fingerprint(t.base1)).toBe(b1);
    expect(fingerprint(t.base2)).toBe(b2);
    expect(addcow(d, "check", "disk.add-cow").code).toBe(0);
    // Rebasing onto it again finds nothing to copy.
    const again = addcow(d, "rebase", "-b", "base2.raw", "-F", "raw", "disk.add-cow");
    expect(again.stdout).toMatch(/nothing had to be copied/);
  });

  it("onto a layer further down the chain: the middle layer's data moves up, the middle can go", async () => {
    const d = dir("rebase-chain");
    const t = await twins(d);
    expect(addcow(d, "snapshot", "-q", "disk.add-cow", "top.add-cow").code).toBe(0);
    const top = path.join(d, "top.add-cow");
    const dev = await openDisk(top, { writable: true });
    await dev.write(Buffer.alloc(5000, 0x44), 2 * MiB + 100);
    await dev.close();
    const before = await readDisk(top);
    const r = addcow(d, "rebase", "-b", "base1.raw", "-F", "raw", "top.add-cow");
    expect(r.code, r.stderr).toBe(0);
    fs.rmSync(t.file);
    fs.rmSync(path.join(d, "disk.raw"));
    expect((await readDisk(top)).equals(before)).toBe(true);
  });

  it("onto a qcow2 image (any backing format, through block status and reads)", async () => {
    const d = dir("rebase-qcow2");
    const t = await twins(d);
    const before = await readDisk(t.file);
    // A qcow2 base holding base2's bytes, with zero clusters where base2 has zeros.
    execFileSync("qemu-img", [
      "convert",
      "-f",
      "raw",
      "-O",
      "qcow2",
      t.base2,
      path.join(d, "base2.qcow2"),
    ]);
    const r = addcow(d, "rebase", "-b", "base2.qcow2", "-F", "qcow2", "disk.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect((await readDisk(t.file)).equals(before)).toBe(true);
    const info = JSON.parse(addcow(d, "info", "--json", "disk.add-cow").stdout) as {
      backing: { stored: string; format: string };
    };
    expect(info.backing).toMatchObject({ stored: "base2.qcow2", format: "qcow2" });
    // -F raw on it is refused: its header would read as disk data.
    const wrong = addcow(d, "rebase", "-u", "-b", "base2.qcow2", "-F", "raw", "disk.add-cow");
    expect(wrong.stderr).toMatch(/base2\.qcow2 is a qcow2 image, not raw: use -F qcow2/);
  });

  it("resumes after a cancel: the clusters copied stay, a rerun finishes and reads the same", async () => {
    const d = dir("rebase-resume");
    const t = await twins(d);
    const before = await readDisk(t.file);
    const job = new Job("rebase", t.file);
    const first = job.start(async (j) => {
      const run = rebaseAtRest(t.file, { backing: t.base2, format: "raw" }, j, {
        inFlight: 1,
        bufSize: CLUSTER,
        speed: 512 * 1024,
      });
      setTimeout(() => j.cancel(), 300);
      return run;
    });
    const stopped = await first;
    expect(stopped.state).toBe("cancelled");
    expect(stopped.message).toMatch(/stopped; it still reads from its old backing file/);
    expect(
      (
        JSON.parse(addcow(d, "info", "--json", "disk.add-cow").stdout) as {
          backing: { stored: string };
        }
      ).backing.stored,
    ).toBe("base1.raw");
    expect((await readDisk(t.file)).equals(before)).toBe(true);
    const r = addcow(d, "rebase", "-b", "base2.raw", "-F", "raw", "disk.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect((await readDisk(t.file)).equals(before)).toBe(true);
  });

  it("-b '' makes the disk standalone: streamed, sparse, and no backing file named", async () => {
    const d = dir("rebase-none");
    const t = await twins(d);
    const before = await readDisk(t.file);
    const r = addcow(d, "rebase", "-b", "", "disk.add-cow");
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/has no backing file now: every cluster is in image file .*disk\.raw/);
    expect(fs.readFileSync(path.join(d, "disk.raw")).equals(before)).toBe(true);
    const info = JSON.parse(addcow(d, "info", "--json", "disk.add-cow").stdout) as {
      backing: unknown;
      chainDepth: number;
    };
    expect(info.backing).toBe(null);
    // base1 can go now.
    fs.rmSync(t.base1);
    expect((await readDisk(t.file)).equals(before)).toBe(true);
  });
});

describe("addcow rebase -u (the backing file moved)", () => {
  it("renames only, checked: the file exists, opens as the format, has the old size; no loops", async () => {
    const d = dir("rebase-u");
    const t = await twins(d);
    const before = await readDisk(t.file);
    // The base moves out of the disk's directory, to shared base images.
    const golden = dir("golden");
    const moved = path.relative(d, path.join(golden, "base1.raw"));
    // Same size, other data: -u trusts the user (like qemu-img -u) but checks the size.
    expect(
      addcow(d, "rebase", "-u", "-b", "base2.raw", "-F", "raw", "disk.add-cow").stderr,
    ).toMatch(
      /base2\.raw has 3670016 bytes, the current backing file .*base1\.raw has 4194304: with -u the new backing must hold the same data, so the same size; drop -u/,
    );
    // A chain that leads back to the disk itself is refused, with or without -u.
    expect(
      addcow(d, "create", "-q", "-b", "disk.add-cow", "-F", "add-cow", "top.add-cow").code,
    ).toBe(0);
    for (const args of [
      ["-u", "-b", "top.add-cow", "-F", "add-cow", "disk.add-cow"],
      ["-b", "top.add-cow", "-F", "add-cow", "disk.add-cow"],
      ["-u", "-b", "disk.add-cow", "-F", "add-cow", "disk.add-cow"],
    ]) {
      const loop = addcow(d, "rebase", ...args);
      expect(loop.code).toBe(1);
      expect(loop.stderr).toMatch(
        /^addcow: the backing chain would loop: .*disk\.add-cow[^\n]*\n$/,
      );
    }
    // The backing file moves: the disk cannot be opened, the message says how to fix it.
    fs.renameSync(t.base1, path.join(golden, "base1.raw"));
    const broken = addcow(d, "info", "disk.add-cow");
    expect(broken.stderr).toMatch(/addcow rebase -u -b NEW -F FORMAT/);
    const refusals: Array<[string[], RegExp]> = [
      [["-u", "-b", moved, "disk.add-cow"], /needs its format: add -F raw or -F add-cow/],
      [
        ["-u", "-b", `${golden}/nope.raw`, "-F", "raw", "disk.add-cow"],
        /nope\.raw .*does not exist/,
      ],
      [["-u", "-b", moved, "-F", "add-cow", "disk.add-cow"], /magic is 0x/],
      [
        ["-u", "-b", "disk.add-cow", "-F", "raw", "disk.add-cow"],
        /is an add-cow image, not raw: use -F add-cow/,
      ],
      [["-u", "-b", moved, "-F", "qcow9", "disk.add-cow"], /unsupported backing format "qcow9"/],
      [
        ["-u", "-b", "", "disk.add-cow"],
        /still reads .* from its backing file; with -u -b '' that would read as zeros: drop -u/,
      ],
      // Confined, a name outside the disk's directory needs --allow-dir.
      [["-u", "-b", moved, "-F", "raw", "--confine", "disk.add-cow"], /is refused: .*security\.md/],
    ];
    const disk = fingerprint(t.file);
    for (const [args, pattern] of refusals) {
      const r = addcow(d, "rebase", ...args);
      expect(r.code, `${args.join(" ")}: ${r.stdout}`).toBe(1);
      expect(r.stderr, args.join(" ")).toMatch(pattern);
      expect(r.stderr.trim().split("\n"), args.join(" ")).toHaveLength(1);
      expect(fingerprint(t.file), `${args.join(" ")} changed the disk`).toBe(disk);
    }
    const ok = addcow(
      d,
      "rebase",
      "-u",
      "-b",
      moved,
      "-F",
      "raw",
      "--allow-dir",
      golden,
      "disk.add-cow",
    );
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(
      /now names .*golden-\w+\/base1\.raw \(raw\) as its backing file; nothing was copied \(-u\) \(the current backing file .* does not exist, so its size was not compared\)/,
    );
    expect((await readDisk(t.file)).equals(before)).toBe(true);
    const info = JSON.parse(addcow(d, "info", "--json", "disk.add-cow").stdout) as {
      backing: { stored: string };
    };
    expect(info.backing.stored).toBe(moved);
    // The .add-cow file kept its mode (the new one replaced it whole).
    expect(fs.statSync(t.file).mode & 0o777).toBe(0o644);
    expect(fs.readdirSync(d).filter((n) => n.endsWith(".tmp"))).toEqual([]);
  });

  it("refuses a mounted disk: unmount first", async () => {
    const d = dir("rebase-mounted");
    const t = await twins(d);
    const m = await mountDisk(t.file, path.join(d, "mnt"));
    const r = addcow(d, "rebase", "-b", "base2.raw", "-F", "raw", "disk.add-cow");
    expect(r.code).toBe(1);
    expect(r.stderr).toContain(
      `is mounted at ${m.dir} (addcow-mount, pid ${m.pid}): unmount it first`,
    );
    await m.unmount();
  });
});
