import * as fs from "node:fs";
import * as net from "node:net";
import { AddCowError, errnoCode } from "../util/errors";
import type { JobStatus } from "../jobs/job";
import {
  type ControlRequest,
  type ControlResponse,
  type HelloResponse,
  LineParser,
  type WatchEvent,
} from "./protocol";
import { allSockets, checkRuntimeDir, socketPathFor } from "./paths";
import { readMountTable } from "../os/mount-table";

/**
 * How long a daemon may take to answer one request. Every request is
 * answered at once (a job starts in the background), so a daemon silent for
 * this long is stopped or stuck: the command says so instead of hanging.
 */
export const ANSWER_TIMEOUT_MS = 10_000;

/** Talks to one daemon's control socket; one connection per request. */
export class ControlClient {
  constructor(
    readonly socketPath: string,
    private readonly answerTimeoutMs = ANSWER_TIMEOUT_MS,
  ) {}

  private open(): Promise<net.Socket> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection(this.socketPath);
      sock.setEncoding("utf8");
      sock.once("connect", () => {
        sock.off("error", reject);
        resolve(sock);
      });
      sock.once("error", reject);
    });
  }

  /** Sends a request; resolves with the single response line, or fails after the answer timeout. */
  async request(req: ControlRequest): Promise<ControlResponse> {
    const sock = await this.open();
    return new Promise((resolve, reject) => {
      let done = false;
      const timer = setTimeout(() => {
        done = true;
        sock.destroy();
        reject(
          new AddCowError(
            `the daemon at ${this.socketPath} did not answer within ${this.answerTimeoutMs / 1000} s (stopped or stuck?); check it with ps, or stop it`,
            { code: "ETIMEDOUT" },
          ),
        );
      }, this.answerTimeoutMs);
      const parser = new LineParser((msg) => {
        done = true;
        clearTimeout(timer);
        sock.end();
        resolve(msg as ControlResponse);
      });
      sock.on("data", (chunk: string) => parser.push(chunk));
      sock.on("error", (err) => {
        if (done) return;
        clearTimeout(timer);
        reject(err);
      });
      sock.on("close", () => {
        if (done) return;
        clearTimeout(timer);
        reject(new AddCowError(`the daemon at ${this.socketPath} closed the connection`));
      });
      sock.write(JSON.stringify(req) + "\n");
    });
  }

  /** Like request, but an { ok: false } answer becomes an AddCowError. */
  async call<T extends ControlResponse>(req: ControlRequest): Promise<T> {
    const res = await this.request(req);
    if (!res.ok) throw new AddCowError(res.error);
    return res as T;
  }

  /** Follows a job until it ends; resolves with its final status. */
  async watch(id: string, onEvent: (e: WatchEvent) => void): Promise<JobStatus> {
    const sock = await this.open();
    return new Promise((resolve, reject) => {
      let last: JobStatus | null = null;
      let failed: string | null = null;
      const parser = new LineParser((msg) => {
        const m = msg as WatchEvent | { ok: false; error: string };
        if ("ok" in m) {
          failed = m.error;
          return;
        }
        last = m.job;
        onEvent(m);
      });
      sock.on("data", (chunk: string) => parser.push(chunk));
      sock.on("error", (err) => reject(err));
      sock.on("close", () => {
        if (failed) reject(new AddCowError(failed));
        else if (
          last &&
          (last.state === "completed" || last.state === "cancelled" || last.state === "failed")
        )
          resolve(last);
        else
          reject(
            new AddCowError(
              `lost the connection to the daemon at ${this.socketPath} while following job ${id}`,
            ),
          );
      });
      sock.write(JSON.stringify({ op: "watch", id } satisfies ControlRequest) + "\n");
    });
  }
}

/**
 * The daemon serving this disk, or null when it is not mounted: no socket, a
 * stale one, or a daemon whose mount is gone already (right after umount it
 * answers for a moment while it flushes and exits; the disk is then opened
 * as a disk at rest, which waits for that daemon to let go of it).
 */
export async function findDaemon(
  file: string,
): Promise<{ client: ControlClient; hello: HelloResponse } | null> {
  checkRuntimeDir();
  const socketPath = socketPathFor(file);
  if (!fs.existsSync(socketPath)) return null;
  const client = new ControlClient(socketPath);
  try {
    const hello = await client.call<HelloResponse>({ op: "hello" });
    const mounted = readMountTable().some(
      (m) => m.mountPoint === hello.mountDir && m.fsType === "fuse.addcow",
    );
    return mounted ? { client, hello } : null;
  } catch (err) {
    const code = errnoCode(err);
    if (code === "ECONNREFUSED" || code === "ENOENT") return null;
    throw err;
  }
}

const LIST_TIMEOUT_MS = 2_000;

/** Every live daemon in the runtime directory that answers. */
export async function allDaemons(): Promise<
  Array<{ client: ControlClient; hello: HelloResponse }>
> {
  const out: Array<{ client: ControlClient; hello: HelloResponse }> = [];
  const seen = new Set<number>();
  for (const socketPath of allSockets()) {
    // A listing does not wait long for a stopped daemon: it is left out.
    const client = new ControlClient(socketPath, LIST_TIMEOUT_MS);
    try {
      const hello = await client.call<HelloResponse>({ op: "hello" });
      // A daemon serving several disks has one socket per disk.
      if (seen.has(hello.pid)) continue;
      seen.add(hello.pid);
      out.push({ client, hello });
    } catch {
      // A stale socket of a daemon that died: skip it.
    }
  }
  return out;
}
