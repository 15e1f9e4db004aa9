import { describe, expect, it } from "vitest";
import type { BlockDevice } from "../../src/block/block-device";
import { DiskEntry } from "../../src/daemon/disk-entry";

function fakeDevice(unsaved: { bits: boolean }) {
  const calls = { flush: 0 };
  const dev: BlockDevice = {
    size: 1 << 20,
    readOnly: false,
    backing: null,
    blockStatus: async (start, length) => [{ start, length, kind: "data" }],
    describe: () => ({ format: "test", name: "fake", storage: "fake", files: [] }),
    read: async () => {},
    write: async () => {},
    flush: async () => {
      calls.flush++;
      unsaved.bits = false;
    },
    close: async () => {},
    hasUnsavedMetadata: () => unsaved.bits,
    info: async () => ({}),
    storageStat: () => null,
    identity: async () => null,
  };
  return { dev, calls };
}

describe("DiskEntry write-back", () => {
  it("the periodic write-back flushes only while bits are unsaved; unmount flushes any write", async () => {
    const unsaved = { bits: false };
    const { dev, calls } = fakeDevice(unsaved);
    const e = new DiskEntry("disk", "disk.add-cow", dev);

    // An overwrite: data written, no bit changed.
    e.dirty = true;
    await e.writeBackIfNeeded();
    expect(calls.flush).toBe(0);
    // Unmount (and fsync) still make the data durable.
    await e.flushIfDirty();
    expect(calls.flush).toBe(1);

    // A first write: a bit is set in memory.
    e.dirty = true;
    unsaved.bits = true;
    await e.writeBackIfNeeded();
    expect(calls.flush).toBe(2);
    // Nothing written since: nothing to do.
    await e.writeBackIfNeeded();
    await e.flushIfDirty();
    expect(calls.flush).toBe(2);
  });
});
