import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { createDisk } from "../../src/ops/create";
import { socketPathFor } from "../../src/control/paths";
import { cleanupAll, deferCleanup, run, tempDir } from "../helpers/mount";

/**
 * A daemon that accepts connections but never answers (stopped with SIGSTOP,
 * or stuck) must not hang the commands that ask it: `addcow jobs` leaves it
 * out, a job command on its disk fails with one line.
 */
const ADDCOW = path.resolve(__dirname, "../../dist/src/cli/addcow.js");

afterEach(cleanupAll);

/** A unix socket at `socketPath` that takes connections and reads, never writes. */
async function silentDaemon(socketPath: string): Promise<void> {
  const held: net.Socket[] = [];
  const server = net.createServer((sock) => {
    held.push(sock);
    sock.on("error", () => undefined);
    sock.resume();
  });
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
  deferCleanup(
    () =>
      new Promise<void>((resolve) => {
        for (const s of held) s.destroy();
        server.close(() => resolve());
      }),
  );
}

describe("a daemon that does not answer", () => {
  it("addcow jobs leaves it out and a job command on its disk fails in one line, neither hangs", async () => {
    const dir = tempDir("addcow-silent-");
    const runtime = path.join(dir, "run");
    fs.mkdirSync(runtime, { mode: 0o700 });
    const disk = path.join(dir, "d.add-cow");
    await createDisk({ file: disk, size: 1 << 20 });
    const env: NodeJS.ProcessEnv = { ...process.env, ADDCOW_RUNTIME_DIR: runtime };
    delete env.DEBUG;
    process.env.ADDCOW_RUNTIME_DIR = runtime;
    try {
      await silentDaemon(socketPathFor(disk));
    } finally {
      delete process.env.ADDCOW_RUNTIME_DIR;
    }

    const jobs = await run(process.execPath, [ADDCOW, "jobs"], { env, timeoutMs: 30_000 });
    expect(jobs.code, jobs.stderr).toBe(0);
    expect(jobs.stdout).toMatch(/no jobs|^$/i);

    const stream = await run(process.execPath, [ADDCOW, "stream", disk], {
      env,
      timeoutMs: 30_000,
    });
    expect(stream.code).toBe(1);
    const lines = stream.stderr.trim().split("\n");
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^addcow: the daemon at .* did not answer within 10 s/);
  }, 60_000);
});
