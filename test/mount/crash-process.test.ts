import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { BlockDevice } from "../../src/block/block-device";
import { DiskModel } from "../helpers/crash-model";
import { writeData } from "../helpers/crash-writer";
import { cleanupAll, makeOverlay, mountDisk, run, tempDir, waitFor } from "../helpers/mount";
import { Rng, SECTOR } from "../helpers/power-loss";

// The writer runs as its own process from the build: npm test builds before vitest.
const WRITER = path.resolve(__dirname, "../../dist/test/helpers/crash-writer.js");
const CS = 4096;
const SIZE = 2 << 20;
// 100 rounds in a row must pass when run by hand (CRASH_ROUNDS=100); CI runs fewer.
const ROUNDS = Number(process.env.CRASH_ROUNDS ?? 8);

afterAll(cleanupAll);

/** The mounted disk file as a BlockDevice, so the model can read it. */
function fileDevice(file: string): BlockDevice & { fd: number } {
  const fd = fs.openSync(file, "r");
  return {
    fd,
    size: fs.fstatSync(fd).size,
    readOnly: true,
    backing: null,
    blockStatus: async (start, length) => [{ start, length, kind: "data" }],
    describe: () => ({ format: "raw", name: file, storage: file, files: [file] }),
    hasUnsavedMetadata: () => false,
    info: async () => ({}),
    storageStat: () => null,
    identity: async () => null,
    async read(buf: Buffer, offset: number) {
      let done = 0;
      while (done < buf.length) {
        const n = fs.readSync(fd, buf, done, buf.length - done, offset + done);
        if (n === 0) throw new Error(`short read at ${offset + done}`);
        done += n;
      }
    },
    async write() {
      throw new Error("read-only");
    },
    async flush() {},
    async close() {
      fs.closeSync(fd);
    },
  };
}

/** Rebuilds what the writer did from its log. */
function modelFromLog(logText: string, seed: number, backing: Buffer, writethrough: boolean) {
  const model = new DiskModel(
    SIZE,
    (s) => backing.subarray(s * SECTOR, (s + 1) * SECTOR),
    writethrough,
  );
  const ids = new Map<number, number>();
  const flushStarts = new Map<number, number>();
  let acked = 0;
  let flushed = 0;
  const lines = logText.split("\n").filter((l) => l !== "");
  lines.forEach((line, seq) => {
    const [kind, a, b, c] = line.split(" ");
    const n = Number(a);
    if (kind === "I") ids.set(n, model.issue(Number(b), writeData(seed, n, Number(c)), seq));
    else if (kind === "A") {
      model.ack(ids.get(n)!, seq);
      acked++;
    } else if (kind === "S") flushStarts.set(n, seq);
    else if (kind === "D") {
      model.flushed(flushStarts.get(n)!, seq);
      flushed++;
    }
  });
  return { model, point: lines.length, acked, flushed };
}

/**
 * One round: mount, start the writer, then either kill -9 the daemon (a crash)
 * or kill the writer and unmount cleanly (every acknowledged write must stay).
 */
async function crashRound(
  round: number,
  options: string | undefined,
  ending: "kill-daemon" | "clean-unmount" = "kill-daemon",
): Promise<void> {
  const seed = 1000 + round;
  const rng = new Rng(seed);
  const dir = tempDir("addcow-crash-");
  const disk = await makeOverlay(dir, "disk", { backingBytes: SIZE, clusterSize: CS });
  const backing = fs.readFileSync(disk.backing!);
  const mnt = path.join(dir, "mnt");
  const m = await mountDisk(disk.addcow, mnt, { options });
  const logPath = path.join(dir, "writer.log");
  const writer = spawn(process.execPath, [WRITER, m.file, logPath, String(seed), String(CS)], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let writerErr = "";
  writer.stderr!.on("data", (d: Buffer) => (writerErr += d.toString()));
  const writerDone = new Promise<void>((resolve) => writer.once("exit", () => resolve()));
  try {
    // Kill the daemon at a random moment once the writer is under way.
    await waitFor(
      "the writer to start",
      () => fs.existsSync(logPath) && fs.statSync(logPath).size > 0,
    );
    await new Promise((r) => setTimeout(r, rng.int(10, 400)));
    if (ending === "kill-daemon") {
      await m.kill("SIGKILL");
      await run("fusermount", ["-uz", m.dir]);
      await writerDone;
    } else {
      writer.kill("SIGKILL");
      await writerDone;
      await m.unmount();
    }
  } finally {
    if (writer.exitCode === null && writer.signalCode === null) writer.kill("SIGKILL");
  }

  if (!fs.existsSync(logPath)) throw new Error(`the writer did not start: ${writerErr}`);
  const { model, point, acked, flushed } = modelFromLog(
    fs.readFileSync(logPath, "utf8"),
    seed,
    backing,
    options === "cache=writethrough" || ending === "clean-unmount",
  );
  const again = await mountDisk(disk.addcow, mnt, { options });
  const dev = fileDevice(again.file);
  let problems: string[];
  try {
    problems = (await model.check(dev, point, [[0, SIZE]])).map((v) => v.message);
  } finally {
    await dev.close();
    await again.unmount();
  }
  expect(fs.readFileSync(disk.backing!).equals(backing)).toBe(true);
  expect(
    problems.slice(0, 5),
    `round ${round} (seed ${seed}, ${acked} writes acknowledged, ${flushed} fsyncs)`,
  ).toEqual([]);
  fs.rmSync(dir, { recursive: true, force: true });
  if (process.env.CRASH_VERBOSE) {
    console.log(`round ${round}: ${acked} writes acknowledged, ${flushed} fsyncs returned`);
  }
}

// One test per round, so a long manual run (CRASH_ROUNDS=100) never hits a timeout.
describe("kill -9 of the mount daemon while a writer runs (cache=writeback)", () => {
  beforeAll(() => {
    if (!fs.existsSync(WRITER)) throw new Error(`${WRITER} is missing: run npm run build first`);
  });
  for (let round = 0; round < ROUNDS; round++) {
    it(`round ${round}: promises 1 and 2 hold`, () => crashRound(round, undefined), 120_000);
  }
});

describe("kill -9 of the mount daemon while a writer runs (cache=writethrough)", () => {
  for (let round = 0; round < Math.ceil(ROUNDS / 2); round++) {
    it(
      `round ${round}: every acknowledged write survives`,
      () => crashRound(500 + round, "cache=writethrough"),
      120_000,
    );
  }
});

describe("clean unmount with the writer killed mid-way", () => {
  for (let round = 0; round < 2; round++) {
    it(
      `round ${round}: every acknowledged write is there`,
      () => crashRound(900 + round, undefined, "clean-unmount"),
      120_000,
    );
  }
});
