import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, makeOverlay, mountDisk, run, sh, tempDir } from "../helpers/mount";

// Real clients on the mounted file: qemu-img, qemu-io and fio.
afterEach(cleanupAll);

const MiB = 1 << 20;

describe("addcow-mount with qemu-img and qemu-io", () => {
  it("qemu-img compare sees the backing data, and the same qemu-io writes as a plain copy", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: 8 * MiB, clusterSize: 4096 });
    const m = await mountDisk(o.addcow, path.join(dir, "mnt"));
    await sh("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", m.file, o.backing!]);

    const copy = path.join(dir, "copy.raw");
    fs.copyFileSync(o.backing!, copy);
    // Patterns at odd offsets, an aio burst, and an O_DIRECT (cache=none) pass, each read back.
    const script = [
      "write -P 0xab 1000 70000",
      "read -P 0xab 1000 70000",
      "aio_write -P 0x11 131072 65536",
      "aio_write -P 0x22 262144 131072",
      "aio_write -P 0x33 6291455 12345",
      "aio_flush",
      "read -P 0x11 131072 65536",
      "read -P 0x22 262144 131072",
      "read -P 0x33 6291455 12345",
      "write -z 2097152 8192",
      "read -P 0 2097152 8192",
      "flush",
    ];
    for (const target of [m.file, copy]) {
      const r = await sh("qemu-io", ["-f", "raw", ...script.flatMap((c) => ["-c", c]), target]);
      expect(r.stdout).not.toMatch(/Pattern verification failed|error|failed/i);
    }
    const direct = ["write -P 0xcd 4096 65536", "read -P 0xcd 4096 65536"];
    for (const target of [m.file, copy]) {
      const r = await sh("qemu-io", [
        "-t",
        "none",
        "-f",
        "raw",
        ...direct.flatMap((c) => ["-c", c]),
        target,
      ]);
      expect(r.stdout).not.toMatch(/Pattern verification failed/);
    }
    await sh("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", m.file, copy]);
    // The comparison can fail: the backing file no longer matches the disk.
    const differs = await run("qemu-img", [
      "compare",
      "-q",
      "-f",
      "raw",
      "-F",
      "raw",
      m.file,
      o.backing!,
    ]);
    expect(differs.code).toBe(1);
    // A wrong pattern is noticed through the mount too.
    const wrong = await run("qemu-io", ["-f", "raw", "-c", "read -P 0x99 1000 512", m.file]);
    expect(wrong.stdout + wrong.stderr).toMatch(/Pattern verification failed/);

    await m.unmount();
    const m2 = await mountDisk(o.addcow, path.join(dir, "mnt"));
    await sh("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", m2.file, copy]);
  });
});

describe("addcow-mount with fio", () => {
  it("fio --verify=crc32c with several jobs, then a verify-only pass after a remount", async () => {
    const dir = tempDir();
    const o = await makeOverlay(dir, "disk", { backingBytes: 16 * MiB });
    const mnt = path.join(dir, "mnt");
    const m = await mountDisk(o.addcow, mnt);
    const job = (file: string) => [
      "--name=verify",
      `--filename=${file}`,
      "--rw=randwrite",
      "--bsrange=4k-64k",
      "--size=4M",
      "--numjobs=4",
      "--offset_increment=4M", // each job owns its own 4 MiB
      "--ioengine=libaio",
      "--iodepth=8",
      "--direct=1",
      "--verify=crc32c",
      "--verify_fatal=1",
      "--randrepeat=1",
      "--randseed=1234",
      "--group_reporting",
      "--verify_state_save=0", // no state file in the working directory
    ];
    const write = await sh("fio", job(m.file));
    expect(write.stdout).toMatch(/err= 0/);
    await m.unmount();

    const m2 = await mountDisk(o.addcow, mnt);
    const verify = await sh("fio", [...job(m2.file), "--verify_only"]);
    expect(verify.stdout).toMatch(/err= 0/);
    expect(verify.stdout).toMatch(/READ: bw=/);
    // Not vacuous: the overlay holds the data, the backing file was only read.
    expect(fs.statSync(o.image).blocks * 512).toBeGreaterThan(4 * MiB);
    await m2.unmount();

    // And the same verification fails against the untouched backing data.
    const r = await run("fio", [
      ...job(o.backing!).filter((a) => !a.startsWith("--filename")),
      `--filename=${o.backing!}`,
      "--verify_only",
      "--readonly",
    ]);
    expect(r.code).not.toBe(0);
  });
});
