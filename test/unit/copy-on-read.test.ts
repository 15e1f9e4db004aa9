import { describe, expect, it } from "vitest";
import type { FileOpener } from "../../src/block/file-io";
import { MemoryFs, createMemoryDisk, openDiskVia } from "../helpers/memory-io";
import { pattern } from "../helpers/pattern";

const CS = 4096;
const SIZE = 16 * CS;

async function disk(opts: { copyOnRead: boolean; opener?: (o: FileOpener) => FileOpener }) {
  const mfs = new MemoryFs();
  const base = pattern(SIZE - 3 * CS, 5); // the last three clusters lie past the backing's end
  const paths = createMemoryDisk(mfs, { clusterBits: 12, size: SIZE, backing: base });
  const opener = opts.opener ? opts.opener(mfs.opener) : mfs.opener;
  const dev = await openDiskVia(opener, paths.addcow, {
    writable: true,
    copyOnRead: opts.copyOnRead,
  });
  return { mfs, dev, base, paths };
}

describe("copy-on-read in the engine", () => {
  it("reads of backing clusters land in the image file and set their bits; the bytes read do not change", async () => {
    const { mfs, dev, base, paths } = await disk({ copyOnRead: true });
    const buf = Buffer.alloc(2 * CS + 100);
    await dev.read(buf, CS + 50); // touches clusters 1, 2 and 3 (1 and 3 partly)
    expect(buf.equals(base.subarray(CS + 50, CS + 50 + buf.length))).toBe(true);
    expect(await dev.countAllocated()).toBe(3);
    await dev.flush();
    const image = Buffer.alloc(3 * CS);
    mfs.get(paths.image).read(image, CS);
    expect(image.equals(base.subarray(CS, 4 * CS))).toBe(true);
    // Clusters past the backing's end read as zeros and are not copied.
    await dev.read(Buffer.alloc(3 * CS), SIZE - 3 * CS);
    expect(await dev.countAllocated()).toBe(3);
    await dev.close();
  });

  it("without the option a read allocates nothing", async () => {
    const { dev } = await disk({ copyOnRead: false });
    await dev.read(Buffer.alloc(4 * CS), 0);
    expect(await dev.countAllocated()).toBe(0);
    await dev.close();
  });

  it("a user's write that lands while the copy-on-read is under way is never overwritten", async () => {
    // Hold the first backing read until the user's write is done.
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    let held = false;
    // Armed once the disk is open: opening reads the base too (its pin's fingerprint).
    let armed = false;
    const { dev } = await disk({
      copyOnRead: true,
      opener: (inner) => async (p, mode) => {
        const f = await inner(p, mode);
        if (!p.endsWith("base.raw")) return f;
        const read = f.read.bind(f);
        f.read = async (b, pos) => {
          if (armed && !held) {
            held = true;
            await gate;
          }
          return read(b, pos);
        };
        return f;
      },
    });
    armed = true;
    const reading = dev.read(Buffer.alloc(CS), 2 * CS);
    await new Promise((r) => setTimeout(r, 10));
    const mine = Buffer.alloc(CS, 0xab);
    await dev.write(mine, 2 * CS);
    release();
    await reading;
    const after = Buffer.alloc(CS);
    await dev.read(after, 2 * CS);
    expect(after.equals(mine)).toBe(true);
    await dev.close();
  });
});
