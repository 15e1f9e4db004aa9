import * as fs from "node:fs";
import * as net from "node:net";
import type { LiveDisk } from "../jobs/live";
import { type LiveJobRequest, LiveJobs } from "../jobs/live-jobs";
import type { Job, JobStatus } from "../jobs/job";
import { AddCowError, describeError } from "../util/errors";
import type { Confinement } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";
import { log } from "../util/log";
import { diskKey, ensureRuntimeDir, socketPathFor } from "./paths";
import { type ControlRequest, type ControlResponse, LineParser, type WatchEvent } from "./protocol";

export interface ControlHost {
  readonly entries: readonly LiveDisk[];
  readonly mountDir: string;
  /** The mount's confinement: every reopen of a disk's files applies it too. */
  readonly confine: Confinement | null;
  /** The mount's URL rules (-o allow_url=, url_auth=). */
  readonly urls: UrlRules;
}

/**
 * The daemon side of live jobs, transport and dispatch only: one unix socket
 * per disk (mode 0600 in a 0700 runtime directory), newline-delimited JSON.
 * What the requests do is LiveJobs' business (src/ops/live-jobs.ts).
 */
export class ControlServer {
  private readonly jobs: LiveJobs;
  private readonly servers: Array<{ server: net.Server; path: string }> = [];
  private readonly sockets = new Set<net.Socket>();

  private constructor(private readonly host: ControlHost) {
    this.jobs = new LiveJobs(host.entries, diskKey, (newFile) => this.listenFor(newFile));
  }

  static async start(host: ControlHost): Promise<ControlServer> {
    const server = new ControlServer(host);
    ensureRuntimeDir();
    try {
      for (const top of server.jobs.tops()) await server.listenFor(top);
    } catch (err) {
      await server.stop();
      throw err;
    }
    return server;
  }

  private async listenFor(file: string): Promise<void> {
    const socketPath = socketPathFor(file);
    // A socket left by a daemon that died: this daemon holds the disk's lock, so it is stale.
    fs.rmSync(socketPath, { force: true });
    const server = net.createServer((sock) => this.accept(sock));
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(socketPath, () => {
          server.off("error", reject);
          resolve();
        });
      });
    } finally {
      process.umask(oldMask);
    }
    fs.chmodSync(socketPath, 0o600);
    this.servers.push({ server, path: socketPath });
    log.daemon("control socket %s for %s", socketPath, file);
  }

  /** Cancels the running jobs (they flush), then closes the sockets. */
  async stop(): Promise<void> {
    await this.jobs.cancelAll();
    for (const sock of this.sockets) sock.destroy();
    for (const { server, path } of this.servers) {
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(path, { force: true });
    }
    this.servers.length = 0;
  }

  private accept(sock: net.Socket): void {
    this.sockets.add(sock);
    sock.setEncoding("utf8");
    sock.on("close", () => this.sockets.delete(sock));
    sock.on("error", () => undefined);
    const parser = new LineParser((msg) => {
      void this.handle(msg as ControlRequest, sock).catch((err: unknown) => {
        reply(sock, { ok: false, error: describeError(err) });
      });
    });
    sock.on("data", (chunk: string) => {
      try {
        parser.push(chunk);
      } catch (err) {
        reply(sock, { ok: false, error: `bad request: ${describeError(err)}` });
        sock.destroy();
      }
    });
  }

  private async handle(req: ControlRequest, sock: net.Socket): Promise<void> {
    switch (req.op) {
      case "hello":
        return reply(sock, {
          ok: true,
          pid: process.pid,
          disks: this.jobs.tops(),
          mountDir: this.host.mountDir,
          confine: this.host.confine,
          urls: this.host.urls,
        });
      case "list":
        return reply(sock, { ok: true, jobs: this.jobs.list() });
      case "pause":
      case "resume":
      case "cancel": {
        const job = this.jobs.find(req.id);
        job[req.op]();
        return reply(sock, { ok: true, job: job.status() });
      }
      case "watch":
        return watch(this.jobs.find(req.id), sock);
      case "start":
        return reply(sock, {
          ok: true,
          job: this.jobs.start(req.kind, req.disk, decodeOptions(req.options)),
        });
      default:
        throw new AddCowError(`unknown request ${JSON.stringify((req as { op?: unknown }).op)}`);
    }
  }
}

/** Only the options the protocol knows, each only when given. */
function decodeOptions(wire: LiveJobRequest): LiveJobRequest {
  const pick = <K extends keyof LiveJobRequest>(k: K) =>
    wire[k] === undefined ? {} : { [k]: wire[k] };
  return {
    ...pick("inFlight"),
    ...pick("bufSize"),
    ...pick("granularity"),
    ...pick("speed"),
    ...pick("keep"),
    ...pick("newFile"),
    ...pick("image"),
    ...pick("clusterSize"),
    ...pick("relative"),
  };
}

/** Streams a job's events to the socket until it ends, then closes it. */
function watch(job: Job, sock: net.Socket): void {
  const send = (event: WatchEvent["event"]) => (status: JobStatus) => {
    if (!sock.destroyed) sock.write(JSON.stringify({ event, job: status }) + "\n");
  };
  if (job.finished) {
    send("done")(job.status());
    sock.end();
    return;
  }
  const onProgress = send("progress");
  const onState = send("state");
  const onDone = (status: JobStatus) => {
    send("done")(status);
    sock.end();
  };
  job.on("progress", onProgress);
  job.on("state", onState);
  job.once("done", onDone);
  sock.once("close", () => {
    job.off("progress", onProgress);
    job.off("state", onState);
    job.off("done", onDone);
  });
  onProgress(job.status());
}

function reply(sock: net.Socket, res: ControlResponse): void {
  if (!sock.destroyed) sock.write(JSON.stringify(res) + "\n");
}

/** The daemon service addcow-mount runs: live jobs over the control socket. */
export async function startControlService(host: ControlHost): Promise<{ stop(): Promise<void> }> {
  return ControlServer.start(host);
}
