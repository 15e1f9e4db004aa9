import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { cleanupAll, makeOverlay, mountDisk, run, tempDir } from "../helpers/mount";
import { readAll, readDisk, withDisk } from "../helpers/jobs";

/**
 * Live jobs on a disk mounted by addcow-mount: fio writes with verification
 * through the mounted file while a stream, a snapshot or a commit runs in the
 * daemon; afterwards every fio block verifies and the disk is complete.
 */
const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");
const MiB = 1 << 20;
let runtime = "";
const savedRuntime = process.env.ADDCOW_RUNTIME_DIR;

beforeAll(() => {
  // Control sockets of this test's daemons live in a private directory (inherited by the daemons).
  runtime = tempDir("addcow-jobs-run-");
  process.env.ADDCOW_RUNTIME_DIR = runtime;
});
afterAll(() => {
  // cleanupAll removes it after each test; the next test's daemon makes it again.
  fs.rmSync(runtime, { recursive: true, force: true });
  if (savedRuntime === undefined) delete process.env.ADDCOW_RUNTIME_DIR;
  else process.env.ADDCOW_RUNTIME_DIR = savedRuntime;
});
const kids: ChildProcess[] = [];
afterEach(async () => {
  for (const k of kids.splice(0)) if (k.exitCode === null) k.kill("SIGKILL");
  await cleanupAll();
});

function addcow(...args: string[]) {
  return run(process.execPath, [ADDCOW, ...args]);
}

/** fio job with verification: every 4K block written once, checksummed, read back. */
function fioArgs(file: string, size: number, extra: string[] = []): string[] {
  return [
    "--name=verify",
    `--filename=${file}`,
    `--size=${size}`,
    "--rw=randwrite",
    "--bs=4k",
    "--ioengine=psync",
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
    "--randseed=1234",
    "--end_fsync=1",
    ...extra,
  ];
}

function startFio(file: string, size: number): { done: Promise<{ code: number; out: string }> } {
  // Rate-limited so the writes overlap the job (a few seconds of writing).
  const child = spawn("fio", fioArgs(file, size, ["--rate=4m"]), {
    stdio: ["ignore", "pipe", "pipe"],
  });
  kids.push(child);
  let out = "";
  child.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  child.stderr!.on("data", (b: Buffer) => (out += b.toString()));
  return {
    done: new Promise((resolve) =>
      child.once("exit", (code) => resolve({ code: code ?? -1, out })),
    ),
  };
}

async function verifyOnly(file: string, size: number): Promise<void> {
  const r = await run("fio", fioArgs(file, size, ["--verify_only"]));
  expect(r.code, r.stdout + r.stderr).toBe(0);
  expect(r.stdout).not.toMatch(/verify: bad/i);
}

describe("live jobs on a mounted disk", () => {
  it("streams while fio writes and verifies; the disk ends complete", async () => {
    const dir = tempDir("addcow-jobs-live-");
    const size = 64 * MiB;
    const ov = await makeOverlay(dir, "disk", { backingBytes: size });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"));
    const fioSize = 24 * MiB;
    const fio = startFio(m.file, fioSize);
    const s = await addcow("stream", "--json", "--speed", "24M", "--in-flight", "8", ov.addcow);
    expect(s.code, s.stderr).toBe(0);
    const events = s.stdout
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as { event: string; message?: string });
    expect(events[events.length - 1]!.event).toBe("completed");
    expect(events.some((e) => e.event === "progress")).toBe(true);
    const f = await fio.done;
    expect(f.code, f.out).toBe(0);
    await verifyOnly(m.file, fioSize);
    const seen = fs.readFileSync(m.file);
    await m.unmount();

    await withDisk(ov.addcow, {}, async (dev) => {
      expect(dev.allAllocated).toBe(true);
    });
    // The image file alone is the disk: fio's blocks verify on it, and the rest is the base.
    const image = fs.readFileSync(ov.image);
    expect(image.equals(seen)).toBe(true);
    await verifyOnly(ov.image, fioSize);
    const base = fs.readFileSync(ov.backing!);
    expect(image.subarray(fioSize).equals(base.subarray(fioSize))).toBe(true);
  });

  it("snapshots while fio writes: no write is lost and the old layer stops changing", async () => {
    const dir = tempDir("addcow-jobs-snap-");
    const size = 32 * MiB;
    const ov = await makeOverlay(dir, "disk", { backingBytes: size });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"));
    const fioSize = 16 * MiB;
    const fio = startFio(m.file, fioSize);
    await new Promise((r) => setTimeout(r, 400));
    const snap = path.join(dir, "snap.add-cow");
    const s = await addcow("snapshot", ov.addcow, snap);
    expect(s.code, s.stderr).toBe(0);
    expect(s.stdout).toMatch(/mounted file switched to it/);
    const oldImage = fs.readFileSync(ov.image);
    const f = await fio.done;
    expect(f.code, f.out).toBe(0);
    await verifyOnly(m.file, fioSize);
    // The old layer is only read now; jobs on it are refused with a pointer to the new top.
    const refused = await addcow("stream", ov.addcow);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/is now a backing layer of .*snap\.add-cow/);
    const seen = fs.readFileSync(m.file);
    await m.unmount();
    expect(fs.readFileSync(ov.image).equals(oldImage)).toBe(true);
    // The new top reads what the mounted file showed; the new layer took the later writes.
    await withDisk(snap, {}, async (top) => {
      expect((await readAll(top)).equals(seen)).toBe(true);
      expect(await top.countAllocated()).toBeGreaterThan(0);
    });
  });

  it("a live snapshot stores the names as given, relative like create: the directory can move", async () => {
    const dir = tempDir("addcow-jobs-rel-");
    fs.writeFileSync(path.join(dir, "base.raw"), Buffer.alloc(4 * MiB, 0x3c));
    const made = await run(
      process.execPath,
      [ADDCOW, "create", "-q", "-b", "base.raw", "-F", "raw", "disk.add-cow"],
      { cwd: dir },
    );
    expect(made.code, made.stderr).toBe(0);
    const m = await mountDisk(path.join(dir, "disk.add-cow"), path.join(dir, "mnt"));
    fs.mkdirSync(path.join(dir, "snaps"));
    const s = await run(
      process.execPath,
      [ADDCOW, "snapshot", "disk.add-cow", "snaps/s1.add-cow"],
      {
        cwd: dir,
      },
    );
    expect(s.code, s.stderr).toBe(0);
    expect(s.stdout).toMatch(/mounted file switched to it/);
    const seen = fs.readFileSync(m.file);
    await m.unmount();
    const info = JSON.parse(
      (await run(process.execPath, [ADDCOW, "info", "--json", "snaps/s1.add-cow"], { cwd: dir }))
        .stdout,
    ) as { backing: { stored: string }; image: { stored: string } };
    // They were stored absolute before (the daemon got absolute paths).
    expect(info.backing.stored).toBe("../disk.add-cow");
    expect(info.image.stored).toBe("s1.raw");
    const moved = `${dir}-moved`;
    fs.renameSync(dir, moved);
    try {
      const again = await readDisk(path.join(moved, "snaps/s1.add-cow"));
      expect(again.equals(seen)).toBe(true);
    } finally {
      fs.renameSync(moved, dir);
    }
  });

  it("commits while fio writes; jobs can be listed, paused, resumed and cancelled", async () => {
    const dir = tempDir("addcow-jobs-commit-");
    const size = 32 * MiB;
    const ov = await makeOverlay(dir, "disk", { backingBytes: size });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"));
    // Some data in the overlay, then a slow stream to drive pause/resume/cancel.
    fs.writeFileSync(path.join(dir, "blob"), Buffer.alloc(8 * MiB, 0x5c));
    await run("dd", [
      `if=${path.join(dir, "blob")}`,
      `of=${m.file}`,
      "bs=1M",
      "seek=20",
      "conv=notrunc,fsync",
    ]);
    const started = await addcow("stream", "--detach", "--speed", "1M", ov.addcow);
    expect(started.code, started.stderr).toBe(0);
    const id = /started job (\S+)/.exec(started.stdout)![1]!;
    const list = await addcow("jobs", "--json");
    const jobs = JSON.parse(list.stdout) as Array<{ id: string; state: string }>;
    expect(jobs.find((j) => j.id === id)?.state).toBe("running");
    expect((await addcow("job", "pause", id)).stdout).toMatch(/paused/);
    expect((await addcow("job", "resume", id)).stdout).toMatch(/running/);
    // cancel waits for the job to stop and says how it ended (it answered "running" before).
    const cancelled = await addcow("job", "cancel", id);
    expect(cancelled.code).toBe(0);
    expect(cancelled.stdout).toMatch(
      new RegExp(`^job ${id}: cancelled \\(stream of .* stopped with .* left to copy.*\\)\\n$`),
    );
    const after = JSON.parse((await addcow("jobs", "--json")).stdout) as Array<{
      id: string;
      state: string;
    }>;
    expect(after.find((j) => j.id === id)?.state).toBe("cancelled");
    const busy = await addcow("job", "pause", "no-such-job");
    expect(busy.code).toBe(1);
    expect(busy.stderr).toMatch(/no running job no-such-job/);

    const fioSize = 16 * MiB;
    const fio = startFio(m.file, fioSize);
    await new Promise((r) => setTimeout(r, 300));
    const c = await addcow("commit", ov.addcow);
    expect(c.code, c.stderr).toBe(0);
    expect(c.stdout).toMatch(/emptied the overlay/);
    const f = await fio.done;
    expect(f.code, f.out).toBe(0);
    await verifyOnly(m.file, fioSize);
    const seen = fs.readFileSync(m.file);
    await m.unmount();
    // Writes after the commit are in the overlay; the disk still reads what was mounted.
    expect((await readDisk(ov.addcow)).equals(seen)).toBe(true);
    // The committed data reached the base: the 0x5c blob written before the commit.
    const base = fs.readFileSync(ov.backing!);
    expect(base.subarray(20 * MiB, 28 * MiB).every((b) => b === 0x5c)).toBe(true);
  });

  it("runs mount-examples/overlay-lifecycle.sh to the end", async () => {
    const dir = tempDir("addcow-jobs-lifecycle-");
    const script = path.resolve(__dirname, "../../mount-examples/overlay-lifecycle.sh");
    const r = await run("bash", [script, path.join(dir, "work")], { timeoutMs: 120_000 });
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/base\.raw was never modified/);
    expect(r.stdout).toMatch(/snap\.raw holds exactly what the mounted disk showed/);
  });

  it("refuses live jobs with one clear line and keeps serving the disk", async () => {
    const dir = tempDir("addcow-jobs-refuse-");
    const ov = await makeOverlay(dir, "disk", { backingBytes: 8 * MiB });
    const solo = await makeOverlay(dir, "solo", { size: 4 * MiB });
    const m = await mountDisk(ov.addcow, path.join(dir, "mnt"));
    const m2 = await mountDisk(solo.addcow, path.join(dir, "mnt2"));
    const noBacking = await addcow("stream", solo.addcow);
    expect(noBacking.code).toBe(1);
    expect(noBacking.stderr).toMatch(/^addcow: \S*solo\.add-cow has no backing file[^\n]*\n$/);
    await m2.unmount();

    fs.writeFileSync(path.join(dir, "blob"), Buffer.alloc(MiB, 0x33));
    await run("dd", [
      `if=${path.join(dir, "blob")}`,
      `of=${m.file}`,
      "bs=1M",
      "seek=2",
      "conv=notrunc,fsync",
    ]);
    let immutable = false;
    if (process.getuid?.() === 0) immutable = (await run("chattr", ["+i", ov.backing!])).code === 0;
    else fs.chmodSync(ov.backing!, 0o444);
    try {
      if (process.getuid?.() !== 0 || immutable) {
        const c = await addcow("commit", ov.addcow);
        expect(c.code).toBe(1);
        expect(c.stderr).toMatch(
          /^addcow: cannot commit \S*disk\.add-cow: backing file \S*disk-base\.raw cannot be opened for writing/,
        );
      }
    } finally {
      if (immutable) await run("chattr", ["-i", ov.backing!]);
    }
    // The disk is still served, with its data, and takes writes.
    const back = Buffer.alloc(MiB);
    const fd = fs.openSync(m.file, "r+");
    try {
      fs.readSync(fd, back, 0, MiB, 2 * MiB);
      fs.writeSync(fd, Buffer.alloc(4096, 0x44), 0, 4096, 0);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    expect(back.every((b) => b === 0x33)).toBe(true);
    await m.unmount();
  });
});
