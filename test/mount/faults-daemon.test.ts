import * as fs from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import {
  bitAfterRemountWrite,
  bitOnDisk as bitAt,
  mountWithFaults,
  syscall,
} from "../helpers/faulty-mount";
import { cleanupAll, processAlive } from "../helpers/mount";

// addcow-mount started through a test launcher whose daemon opens files through a fault injector.
const CS = 4096;
const SIZE = 1 << 20;

afterEach(cleanupAll);

const mountFaulty = (options?: string) =>
  mountWithFaults({ clusterSize: CS, backingBytes: SIZE, ...(options ? { options } : {}) });
const bitOnDisk = (addcow: string, c: number) => bitAt(addcow, c, 4096);

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
    const s = await mountFaulty();
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
      const s = await mountFaulty();
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

  it("a failing image sync reaches fsync; later fsyncs fail until remount; no bit without its data", async () => {
    const s = await mountFaulty();
    const fd = fs.openSync(s.m.file, "r+");
    try {
      const data = Buffer.alloc(CS, 0x77);
      fs.writeSync(fd, data, 0, CS, 5 * CS);
      s.setFaults([{ file: "disk.raw", op: "sync", code: "EIO", times: 1 }]);
      expect(syscall(() => fs.fdatasyncSync(fd))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 5)).toBe(0);
      expect(processAlive(s.m.pid)).toBe(true);
      // The kernel may have dropped those pages: no later fsync succeeds until a remount.
      expect(syscall(() => fs.fdatasyncSync(fd))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 5)).toBe(0);
    } finally {
      syscall(() => fs.closeSync(fd));
    }
    await s.m.unmount();
    expect(await bitAfterRemountWrite(s, 5, CS, 4096)).toBe(1);
  });

  it("with cache=writethrough a failing sync reaches the write itself", async () => {
    const s = await mountFaulty("cache=writethrough");
    const fd = fs.openSync(s.m.file, "r+");
    try {
      s.setFaults([{ file: "disk.raw", op: "sync", code: "EIO", times: 1 }]);
      const data = Buffer.alloc(CS, 0x33);
      expect(syscall(() => fs.writeSync(fd, data, 0, CS, 6 * CS))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 6)).toBe(0);
      // Until a remount, every write fails too: none of them can be made durable.
      expect(syscall(() => fs.writeSync(fd, data, 0, CS, 6 * CS))).toBe("EIO");
      expect(bitOnDisk(s.addcow, 6)).toBe(0);
    } finally {
      syscall(() => fs.closeSync(fd));
    }
    await s.m.unmount();
  });
});
