import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { createDisk } from "../../src/ops/create";
import { Job } from "../../src/jobs/job";
import { streamAtRest } from "../../src/jobs/at-rest";
import { MiB, pattern, readDisk, scribble, tempDir } from "../helpers/jobs";

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) fs.rmSync(d, { recursive: true, force: true });
});

/** Bytes a file really takes on disk (what du counts). */
function allocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

function writeAt(file: string, data: Buffer, pos: number): void {
  const fd = fs.openSync(file, "r+");
  try {
    fs.writeSync(fd, data, 0, data.length, pos);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * A 256 MiB disk half of which reads as zeros: 64 MiB of zeros written into
 * the base (data blocks that are zero: found by reading), 64 MiB of hole
 * (found by SEEK_HOLE, never read), and 128 MiB of data. The image file was
 * there before the disk and holds old bytes in both zero areas: there the
 * zeros must really be written.
 */
async function halfZeroDisk(d: string) {
  const size = 256 * MiB;
  const base = path.join(d, "base.raw");
  fs.writeFileSync(base, "");
  fs.truncateSync(base, size);
  writeAt(base, pattern(64 * MiB, 11), 0);
  writeAt(base, Buffer.alloc(64 * MiB), 64 * MiB);
  writeAt(base, pattern(64 * MiB, 12), 128 * MiB);
  const image = path.join(d, "disk.raw");
  fs.writeFileSync(image, "");
  fs.truncateSync(image, size);
  writeAt(image, pattern(MiB, 13), 70 * MiB);
  writeAt(image, pattern(MiB, 14), 200 * MiB);
  const file = path.join(d, "disk.add-cow");
  await createDisk({ file, image, backing: base, backingFormat: "raw" });
  return { base, image, file, size };
}

describe("stream keeps the image file sparse", () => {
  it("a 256 MiB disk, half zeros: du of the image is the data, not the disk; it reads the same", async () => {
    const d = tempDir("sparse");
    dirs.push(d);
    const { base, image, file } = await halfZeroDisk(d);
    // Some of the overlay's own writes, also in the zero areas.
    await scribble(file, 21, 12, 256 * 1024);
    const before = await readDisk(file);
    const status = await new Job("stream", file).start((job) => streamAtRest(file, job, {}));
    expect(status.error).toBeUndefined();
    expect(status.state).toBe("completed");
    // The image file alone is the disk, byte for byte.
    expect(fs.readFileSync(image).equals(before)).toBe(true);
    const used = allocated(image);
    // What qemu-img convert makes of the same disk, as a yardstick.
    const converted = path.join(d, "converted.raw");
    execFileSync("qemu-img", ["convert", "-f", "raw", "-O", "raw", base, converted]);
    console.log(
      `du after stream: image ${(used / MiB).toFixed(1)} MiB of 256 MiB; qemu-img convert of the base: ${(allocated(converted) / MiB).toFixed(1)} MiB`,
    );
    // 128 MiB of data, plus the old bytes overwritten with zeros, plus the scribbles.
    expect(used).toBeGreaterThanOrEqual(128 * MiB);
    expect(used).toBeLessThan(140 * MiB);
  });

  it("writes zeros where the image file holds old bytes, also over zero clusters of an add-cow layer", async () => {
    const d = tempDir("sparse2");
    dirs.push(d);
    const size = 8 * MiB;
    const base = path.join(d, "base.raw");
    fs.writeFileSync(base, "");
    fs.truncateSync(base, size);
    const mid = path.join(d, "mid.add-cow");
    await createDisk({ file: mid, backing: base, backingFormat: "raw" });
    // The top's image file already exists, full of old bytes.
    const image = path.join(d, "top.raw");
    fs.writeFileSync(image, pattern(size, 5));
    const top = path.join(d, "top.add-cow");
    await createDisk({ file: top, image, backing: mid, backingFormat: "add-cow" });
    const status = await new Job("stream", top).start((job) => streamAtRest(top, job, {}));
    expect(status.error).toBeUndefined();
    expect(fs.readFileSync(image).equals(Buffer.alloc(size))).toBe(true);
  });
});
