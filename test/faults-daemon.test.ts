import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import type { FaultRule } from "./helpers/fault-io";
import {
  type MountHandle,
  cleanupAll,
  makeOverlay,
  mountDisk,
  processAlive,
  tempDir,
} from "./helpers/mount";

// addcow-mount started through a test launcher whose daemon opens files through a fault injector.
const FAULTY_MOUNT = path.resolve(__dirname, "../dist/test/helpers/faulty-addcow-mount.js");
const CS = 4096;
const SIZE = 1 << 20;

beforeAll(() => {
  if (!fs.existsSync(FAULTY_MOUNT)) throw new Error(`${FAULTY_MOUNT} is missing: npm run build`);
});
afterEach(cleanupAll);

interface Setup {
  m: MountHandle;
  control: string;
  backing: Buffer;
  addcow: string;
  setFaults(rules: FaultRule[]): void;
}

async function mountWithFaults(options?: string): Promise<Setup> {
  const dir = tempDir("addcow-faultd-");
  const disk = await makeOverlay(dir, "disk", { backingBytes: SIZE, clusterSize: CS });
  const control = path.join(dir, "faults.json");
  const setFaults = (rules: FaultRule[]) => {
    // Atomic replace: the daemon never reads a half-written rule file.
    fs.writeFileSync(control + ".tmp", JSON.stringify(rules));
    fs.renameSync(control + ".tmp", control);
  };
  setFaults([]);
  const m = await mountDisk(disk.addcow, path.join(dir, "mnt"), {
    options,
    bin: FAULTY_MOUNT,
    env: { ...process.env, ADDCOW_TEST_FAULTS: control },
  });
  return { m, control, backing: fs.readFileSync(disk.backing!), addcow: disk.addcow, setFaults };
}

function syscall<T>(fn: () => T): T | string {
  try {
    return fn();
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  }
}

function bitOnDisk(addcow: string, c: number): number {
  const meta = fs.readFileSync(addcow);
  return (meta[4096 + (c >> 3)]! >> (c & 7)) & 1;
}

function readAt(file: string, pos: number, len: number): Buffer {
  const fd = fs.openSync(file, "r");
  try {
    const b = Buffer.alloc(len);
    fs.readSync(fd, b, 0, len, pos);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

describe("the mount daemon under I/O errors", () => {
  it("EIO from the backing file reaches the reader; the daemon keeps serving", async () => {
    const s = await mountWithFaults();
    s.setFaults([{ file: "disk-base.raw", op: "read", code: "EIO" }]);
    expect(syscall(() => readAt(s.m.file, 8 * CS, CS))).toBe("EIO");
    expect(processAlive(s.m.pid)).toBe(true);
    s.setFaults([]);
    expect(readAt(s.m.file, 8 * CS, CS).equals(s.backing.subarray(8 * CS, 9 * CS))).toBe(true);
    await s.m.unmount();
    expect(bitOnDisk(s.addcow, 8)).toBe(0);
  });

  it.each(["EIO", "ENOSPC"] as const)(
    "%s on the image file reaches the writer; the bit stays 0; afterwards all works",
    async (code) => {
      const s = await mountWithFaults();
      const fd = fs.openSync(s.m.file, "r+");
      try {
        s.setFaults([{ file: "disk.raw", op: "write", code, partial: true }]);
        const data = Buffer.alloc(700, 0x5a);
        expect(syscall(() => fs.writeSync(fd, data, 0, data.length, 3 * CS + 100))).toBe(code);
        expect(syscall(() => fs.fdatasyncSync(fd))).toBeUndefined();
        expect(bitOnDisk(s.addcow, 3)).toBe(0);
        expect(processAlive(s.m.pid)).toBe(true);
        s.setFaults([]);
        expect(readAt(s.m.file, 3 * CS, CS).equals(s.backing.subarray(3 * CS, 4 * CS))).toBe(true);
        expect(fs.writeSync(fd, data, 0, data.length, 3 * CS + 100)).toBe(data.length);
        fs.fdatasyncSync(fd);
        expect(bitOnDisk(s.addcow, 3)).toBe(1);
      } finally {
        fs.closeSync(fd);
      }
      await s.m.unmount();
    },
  );

  it("a failing image sync reaches fsync, and no bit reaches the disk without its data", async () => {
    const s = await mountWithFaults();
    const fd = fs.openSync(s.m.file, "r+");
    try {
      const data = Buffer.alloc(CS, 0x77);
      fs.writeSync(fd, data, 0, CS, 5 * CS);
      s.setFaults([{ file: "disk.raw", op: "sync", code: "EIO", times: 1 }]);
      expect(syscall(() => fs.fdatasyncSync(fd))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 5)).toBe(0);
      expect(processAlive(s.m.pid)).toBe(true);
      // The next fsync works; a new write of the cluster is then durable.
      fs.fdatasyncSync(fd);
      fs.writeSync(fd, data, 0, CS, 5 * CS);
      fs.fdatasyncSync(fd);
      expect(bitOnDisk(s.addcow, 5)).toBe(1);
    } finally {
      fs.closeSync(fd);
    }
    await s.m.unmount();
  });

  it("with cache=writethrough a failing sync reaches the write itself", async () => {
    const s = await mountWithFaults("cache=writethrough");
    const fd = fs.openSync(s.m.file, "r+");
    try {
      s.setFaults([{ file: "disk.raw", op: "sync", code: "EIO", times: 1 }]);
      const data = Buffer.alloc(CS, 0x33);
      expect(syscall(() => fs.writeSync(fd, data, 0, CS, 6 * CS))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 6)).toBe(0);
      expect(fs.writeSync(fd, data, 0, CS, 6 * CS)).toBe(CS);
      expect(bitOnDisk(s.addcow, 6)).toBe(1);
    } finally {
      fs.closeSync(fd);
    }
    await s.m.unmount();
  });
});
