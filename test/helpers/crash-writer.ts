/**
 * The writer for the process-crash tests:
 *   node dist/test/helpers/crash-writer.js FILE LOG SEED CLUSTER_SIZE
 * Writes random patterns into FILE (a mounted disk) with random fsyncs until a
 * write fails (the daemon was killed) or 2000 operations are done. Every step
 * is appended to LOG before and after it happens, so the test knows what was
 * issued, acknowledged and made durable:
 *   I id offset length   write issued      A id   write acknowledged
 *   S n                  fsync started     D n    fsync returned
 * The data of write `id` is writeData(seed, id, length).
 */
import * as fs from "node:fs";
import { Rng } from "./power-loss";

export function writeData(seed: number, id: number, length: number): Buffer {
  return new Rng((seed * 1_000_003 + id * 7919) >>> 0).bytes(length);
}

function main(): void {
  const [file, logPath, seedText, csText] = process.argv.slice(2);
  const seed = Number(seedText);
  const cs = Number(csText);
  const rng = new Rng(seed);
  const log = fs.openSync(logPath!, "a");
  const fd = fs.openSync(file!, "r+");
  const size = fs.fstatSync(fd).size;
  const note = (line: string) => fs.writeSync(log, line + "\n");
  try {
    for (let id = 0; id < 2000; id++) {
      if (rng.chance(0.2)) {
        note(`S ${id}`);
        fs.fdatasyncSync(fd);
        note(`D ${id}`);
        continue;
      }
      const k = rng.next();
      const length = k < 0.4 ? rng.int(1, 1024) : k < 0.8 ? rng.int(1, cs) : rng.int(cs, 3 * cs);
      const aligned = rng.chance(0.5);
      let offset = rng.int(0, size - 1);
      if (aligned) offset -= offset % 512;
      const len = Math.min(length, size - offset);
      const data = writeData(seed, id, len);
      note(`I ${id} ${offset} ${len}`);
      let done = 0;
      while (done < len) done += fs.writeSync(fd, data, done, len - done, offset + done);
      note(`A ${id}`);
    }
  } catch {
    // The daemon is gone (ENOTCONN/EIO): that is what the test does to us.
  }
  process.exit(0);
}

if (require.main === module) main();
