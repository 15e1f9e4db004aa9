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
import {
  type AttachRequest,
  type ControlRequest,
  type ControlResponse,
  type HostMount,
  LineParser,
  type WatchEvent,
} from "./protocol";

export interface ControlHost {
  readonly entries: readonly LiveDisk[];
  readonly mountDir: string;
  /** The mount's confinement: every reopen of a disk's files applies it too. */
  readonly confine: Confinement | null;
  /** The mount's URL rules (-o allow_url=, url_auth=). */
  readonly urls: UrlRules;
}

/** What a host daemon's own socket does besides jobs: attach and detach mounts. */
export interface HostHandlers {
  readonly name: string;
  attach(req: AttachRequest): Promise<HostMount>;
  detach(mountDir: string): Promise<void>;
  mounts(): HostMount[];
}

interface Listener {
  server: net.Server;
  path: string;
  /** The mount whose disk this socket is named after; null for a host daemon's own socket. */
  mount: ControlHost | null;
}

/**
 * The daemon side of live jobs, transport and dispatch only: one unix socket
 * per disk (mode 0600 in a 0700 runtime directory), newline-delimited JSON.
 * What the requests do is LiveJobs' business (src/jobs/live-jobs.ts). A host
 * daemon has one more socket, its own, for attaching disks, and adds and
 * removes the disks' sockets as mounts come and go.
 */
export class ControlServer {
  private readonly jobs: LiveJobs;
  private readonly listeners: Listener[] = [];
  private readonly sockets = new Set<net.Socket>();
  private readonly mountOf = new Map<LiveDisk, ControlHost>();

  private constructor(private readonly hostHandlers: HostHandlers | null) {
    this.jobs = new LiveJobs([], diskKey, (newFile, disk) => {
      const mount = this.mountOf.get(disk);
      return mount ? this.listenFor(socketPathFor(newFile), mount, newFile) : Promise.resolve();
    });
  }

  /** The control socket of one addcow-mount daemon and its disks. */
  static async start(host: ControlHost): Promise<ControlServer> {
    const server = new ControlServer(null);
    try {
      await server.addMount(host);
    } catch (err) {
      await server.stop();
      throw err;
    }
    return server;
  }

  /** A host daemon's socket (hostSocketPath): mounts are added by attach requests. */
  static async startHost(handlers: HostHandlers, socketPath: string): Promise<ControlServer> {
    const server = new ControlServer(handlers);
    await server.listenFor(socketPath, null, `host daemon ${handlers.name}`);
    return server;
  }

  /** Serves live jobs on a mount's disks: a socket per disk, named after it. */
  async addMount(mount: ControlHost): Promise<void> {
    ensureRuntimeDir();
    this.jobs.add(mount.entries);
    for (const disk of mount.entries) this.mountOf.set(disk, mount);
    for (const top of this.jobs.tops(mount.entries)) {
      // A socket left by a daemon that died: this daemon holds the disk's lock, so it is stale.
      await this.listenFor(socketPathFor(top), mount, top);
    }
  }

  /** Stops serving a mount's disks: their jobs are cancelled (they flush), their sockets closed. */
  async removeMount(mount: ControlHost): Promise<void> {
    await this.jobs.remove(mount.entries);
    for (const disk of mount.entries) this.mountOf.delete(disk);
    await this.close(this.listeners.filter((l) => l.mount === mount));
  }

  private async listenFor(socketPath: string, mount: ControlHost | null, what: string) {
    ensureRuntimeDir();
    fs.rmSync(socketPath, { force: true });
    const listener: Listener = { server: net.createServer(), path: socketPath, mount };
    listener.server.on("connection", (sock) => this.accept(sock, listener));
    const oldMask = process.umask(0o177);
    try {
      await new Promise<void>((resolve, reject) => {
        listener.server.once("error", reject);
        listener.server.listen(socketPath, () => {
          listener.server.off("error", reject);
          resolve();
        });
      });
    } finally {
      process.umask(oldMask);
    }
    fs.chmodSync(socketPath, 0o600);
    this.listeners.push(listener);
    log.daemon("control socket %s for %s", socketPath, what);
  }

  private async close(listeners: Listener[]): Promise<void> {
    for (const l of listeners) {
      this.listeners.splice(this.listeners.indexOf(l), 1);
      await new Promise<void>((resolve) => l.server.close(() => resolve()));
      fs.rmSync(l.path, { force: true });
    }
  }

  /** Cancels the running jobs (they flush), then closes the sockets. */
  async stop(): Promise<void> {
    await this.jobs.cancelAll();
    for (const sock of this.sockets) sock.destroy();
    await this.close([...this.listeners]);
  }

  private accept(sock: net.Socket, listener: Listener): void {
    this.sockets.add(sock);
    sock.setEncoding("utf8");
    sock.on("close", () => this.sockets.delete(sock));
    sock.on("error", () => undefined);
    const parser = new LineParser((msg) => {
      void this.handle(msg as ControlRequest, sock, listener).catch((err: unknown) => {
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

  private hostOnly(op: string): HostHandlers {
    if (!this.hostHandlers) {
      throw new AddCowError(
        `${op} is for a host daemon's socket (addcow-mount --serve NAME); daemon ${process.pid} serves one mount`,
      );
    }
    return this.hostHandlers;
  }

  private async handle(req: ControlRequest, sock: net.Socket, listener: Listener): Promise<void> {
    switch (req.op) {
      case "hello": {
        const mount = listener.mount;
        const host = this.hostHandlers;
        return reply(sock, {
          ok: true,
          pid: process.pid,
          disks: this.jobs.tops(mount?.entries),
          mountDir: mount?.mountDir ?? "",
          confine: mount?.confine ?? null,
          ...(mount?.urls ? { urls: mount.urls } : {}),
          ...(host && !mount ? { host: { name: host.name, mounts: host.mounts() } } : {}),
        });
      }
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
      case "attach":
        return reply(sock, { ok: true, mount: await this.hostOnly(req.op).attach(req) });
      case "detach":
        await this.hostOnly(req.op).detach(req.mountDir);
        return reply(sock, { ok: true, jobs: [] });
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

/** The same service for a mount of a host daemon: its disks join the host's control server. */
export function hostMountService(
  server: ControlServer,
): (mount: ControlHost) => Promise<{ stop(): Promise<void> }> {
  return async (mount) => {
    await server.addMount(mount);
    return { stop: () => server.removeMount(mount) };
  };
}
