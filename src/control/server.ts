import * as fs from "node:fs";
import * as net from "node:net";
import type { BlockDevice } from "../block/block-device";
import { AddCowDevice } from "../addcow/addcow-device";
import { AddCowError, describeError } from "../util/errors";
import { CommitMirror } from "../ops/commit-mirror";
import { checkBackingWritable, checkCommittable, commitDisk } from "../ops/commit";
import { explainReadOnlyBacking } from "../ops/offline";
import type { CopyOptions } from "../ops/copy-engine";
import { Job, type JobKind, type JobStatus } from "../ops/job";
import { liveSnapshot } from "../ops/live";
import { checkStreamable, streamDisk } from "../ops/stream";
import { openDisk } from "../open/open-disk";
import { log } from "../util/log";
import { diskKey, ensureRuntimeDir, socketPathFor } from "./paths";
import {
  type ControlRequest,
  type ControlResponse,
  type JobOptionsWire,
  LineParser,
  type WatchEvent,
} from "./protocol";

/** What the control server needs from a mounted disk (the daemon's DiskEntry). */
export interface LiveDisk {
  readonly file: string;
  readonly device: BlockDevice;
  /** Runs fn with no request running and none starting. */
  exclusive<T>(fn: () => Promise<T>): Promise<T>;
  /** Swaps the device (inside exclusive); returns the old one. */
  replaceDevice(dev: BlockDevice): BlockDevice;
}

export interface ControlHost {
  readonly entries: readonly LiveDisk[];
  readonly mountDir: string;
}

interface Served {
  disk: LiveDisk;
  /** The .add-cow file on top of the mounted disk (changes with a live snapshot). */
  top: string;
  job: Job | null;
}

/** Finished jobs stay listed a while so `addcow jobs` can show how they ended. */
const KEEP_FINISHED = 16;

/**
 * The daemon side of live jobs: one unix socket per mounted disk (mode 0600
 * in a 0700 runtime directory), newline-delimited JSON, one job per disk at a time.
 */
export class ControlServer {
  private readonly served: Served[];
  private readonly byKey = new Map<string, Served>();
  /** Keys of files that were the top before a live snapshot: now only read. */
  private readonly retired = new Map<string, string>();
  private readonly jobs = new Map<string, { job: Job; served: Served }>();
  private readonly servers: Array<{ server: net.Server; path: string }> = [];
  private readonly sockets = new Set<net.Socket>();

  private constructor(private readonly host: ControlHost) {
    this.served = host.entries.map((disk) => ({ disk, top: disk.file, job: null }));
  }

  static async start(host: ControlHost): Promise<ControlServer> {
    const server = new ControlServer(host);
    ensureRuntimeDir();
    try {
      for (const s of server.served) await server.listenFor(s, s.top);
    } catch (err) {
      await server.stop();
      throw err;
    }
    return server;
  }

  private async listenFor(served: Served, file: string): Promise<void> {
    const key = diskKey(file);
    this.byKey.set(key, served);
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
    const running = [...this.jobs.values()].filter((j) => !j.job.finished);
    for (const { job } of running) job.cancel();
    await Promise.all(running.map(({ job }) => job.wait()));
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
          disks: this.served.map((s) => s.top),
          mountDir: this.host.mountDir,
        });
      case "list":
        return reply(sock, { ok: true, jobs: [...this.jobs.values()].map((j) => j.job.status()) });
      case "pause":
      case "resume":
      case "cancel": {
        const job = this.findJob(req.id);
        job[req.op]();
        return reply(sock, { ok: true, job: job.status() });
      }
      case "watch":
        return this.watch(this.findJob(req.id), sock);
      case "start":
        return reply(sock, { ok: true, job: this.startJob(req.kind, req.disk, req.options) });
      default:
        return reply(sock, {
          ok: false,
          error: `unknown request ${JSON.stringify((req as { op?: unknown }).op)}`,
        });
    }
  }

  private findJob(id: string): Job {
    const found = this.jobs.get(id);
    if (!found) throw new AddCowError(`no job ${id} in daemon ${process.pid}`);
    return found.job;
  }

  private watch(job: Job, sock: net.Socket): void {
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

  private servedFor(disk: string): Served {
    const key = diskKey(disk);
    const served = this.byKey.get(key);
    const newer = this.retired.get(key);
    if (newer !== undefined) {
      throw new AddCowError(
        `${disk} is now a backing layer of ${newer} (live snapshot) and is only read; run the job on ${newer}`,
      );
    }
    if (!served) throw new AddCowError(`${disk} is not served by daemon ${process.pid}`);
    return served;
  }

  private startJob(kind: JobKind, disk: string, wire: JobOptionsWire): JobStatus {
    const served = this.servedFor(disk);
    if (served.job && !served.job.finished) {
      throw new AddCowError(
        `${served.top} already runs job ${served.job.id}; wait for it or cancel it (addcow job cancel ${served.job.id})`,
      );
    }
    const dev = served.disk.device;
    if (!(dev instanceof AddCowDevice)) {
      throw new AddCowError(`${served.top} is busy with another operation; try again`);
    }
    if (dev.readOnly) {
      throw new AddCowError(
        `${served.top} is mounted read-only; remount it writable to run ${kind}`,
      );
    }
    // Refusals that need no work are answered at once, as one line.
    if (kind === "stream") checkStreamable(dev);
    if (kind === "commit") {
      checkCommittable(dev);
      checkBackingWritable(dev);
    }
    const opts: CopyOptions = {
      ...(wire.inFlight === undefined ? {} : { inFlight: wire.inFlight }),
      ...(wire.bufSize === undefined ? {} : { bufSize: wire.bufSize }),
      ...(wire.granularity === undefined ? {} : { granularity: wire.granularity }),
      ...(wire.speed === undefined ? {} : { speed: wire.speed }),
    };
    const job = new Job(kind, served.top, `${kind}-${process.pid}-${++jobCounter}`);
    served.job = job;
    this.jobs.set(job.id, { job, served });
    this.forgetOldJobs();
    void job.start(async (j) => {
      switch (kind) {
        case "stream":
          return streamDisk(dev, j, opts);
        case "commit":
          return this.liveCommit(served, j, { ...opts, keep: wire.keep === true });
        case "snapshot": {
          if (!wire.newFile) throw new AddCowError("snapshot needs the new file name");
          const newFile = wire.newFile;
          const msg = await liveSnapshot(served.disk, served.top, newFile, {
            ...(wire.image === undefined ? {} : { image: wire.image }),
            ...(wire.clusterSize === undefined ? {} : { clusterSize: wire.clusterSize }),
          });
          this.retired.set(diskKey(served.top), newFile);
          served.top = newFile;
          await this.listenFor(served, newFile);
          return msg;
        }
      }
    });
    return job.status();
  }

  private forgetOldJobs(): void {
    const finished = [...this.jobs.values()].filter((j) => j.job.finished);
    for (const j of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) {
      this.jobs.delete(j.job.id);
    }
  }

  /**
   * Live commit: reopen the disk with its backing writable (in place, while
   * requests wait), mirror user writes into the backing during the copy, then
   * sync the backing and empty the overlay with requests held back.
   */
  private async liveCommit(
    served: Served,
    job: Job,
    opts: CopyOptions & { keep: boolean },
  ): Promise<string> {
    const live = served.disk;
    const file = served.top;
    let dev!: AddCowDevice;
    let mirror!: CommitMirror;
    await live.exclusive(async () => {
      const old = live.device;
      await old.flush();
      await old.close();
      try {
        dev = await openDisk(file, {
          writable: true,
          writableBacking: true,
          cacheMode: (old as AddCowDevice).cacheMode,
        });
      } catch (err) {
        // Back to the disk as it was mounted; the commit is refused.
        live.replaceDevice(
          await openDisk(file, { writable: true, cacheMode: (old as AddCowDevice).cacheMode }),
        );
        throw await explainReadOnlyBacking(file, err);
      }
      if (!dev.backing || dev.backing.readOnly) {
        live.replaceDevice(dev);
        return;
      }
      mirror = new CommitMirror(dev, dev.backing);
      live.replaceDevice(mirror);
    });
    try {
      return await commitDisk(dev, job, {
        ...opts,
        copyLock: mirror?.lock,
        quiesce: (finish) =>
          live.exclusive(async () => {
            await mirror?.flush();
            await finish();
            live.replaceDevice(dev);
          }),
      });
    } finally {
      if (live.device === mirror) {
        await live.exclusive(async () => {
          live.replaceDevice(dev);
        });
      }
    }
  }
}

let jobCounter = 0;

function reply(sock: net.Socket, res: ControlResponse): void {
  if (!sock.destroyed) sock.write(JSON.stringify(res) + "\n");
}

/** The daemon service addcow-mount runs: live jobs over the control socket. */
export async function startControlService(host: ControlHost): Promise<{ stop(): Promise<void> }> {
  return ControlServer.start(host);
}
