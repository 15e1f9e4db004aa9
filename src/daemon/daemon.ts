import * as fs from "node:fs";
import * as path from "node:path";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import type { AddCowLayer } from "../addcow/addcow-layer";
import { type OpenOptions, openDisk } from "../chain/open-chain";
import { AddCowError, describeError, errnoCode } from "../util/errors";
import { DiskEntry } from "./disk-entry";
import { type FuseFrontEnd, createFuseFrontEnd } from "./fuse-fs";
import type { MountOptions } from "./mount-options";
import type { Confinement } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";
import { log } from "../util/log";
import {
  type MountEntry,
  deviceId,
  prepareMountDir,
  readMountTable,
  readMountTableAsync,
} from "../os/mount-table";
import { MountWatch } from "./mount-watch";
import { waitingForExitingDaemon } from "../chain/exiting-daemon";
import type { FileOpener } from "../block/file-io";

const execFileAsync = promisify(execFile);

export interface DiskSpec {
  /** The .add-cow file. */
  file: string;
  /** File name inside the mount directory. */
  name: string;
}

export interface DaemonConfig {
  disks: DiskSpec[];
  mountDir: string;
  options: MountOptions;
  /** cache=writeback: how often dirty disks are flushed (default 5 s). */
  writebackIntervalMs?: number;
  /** How often the mount table is checked for an external unmount (default 200 ms). */
  pollIntervalMs?: number;
  /** Where problems after start go (failed flushes, a failed disk, ...); default: nowhere. */
  reporter?: DaemonReporter;
  /**
   * How long the final flush at unmount is retried when it fails (a full file
   * system may get room again) before the daemon gives up and exits 1. Default 10 s.
   */
  finalFlushRetryMs?: number;
  /** How the disks' files are opened (default: plain POSIX files; fault tests wrap it). */
  opener?: FileOpener;
  /** Extra parts to run while mounted (the control socket for live jobs). */
  services?: readonly DaemonServiceFactory[];
  /** The mount-table reader shared by the mounts of a host daemon (default: one of its own). */
  mountWatch?: MountWatch;
}

/**
 * Something a daemon runs while mounted. A factory is called once the disks
 * are mounted, before the daemon reports ready; a factory that throws fails
 * the mount. stop() is called first when the daemon stops, before the disks
 * are flushed and closed.
 */
export interface DaemonService {
  stop(): Promise<void>;
}

export type DaemonServiceFactory = (daemon: MountDaemon) => Promise<DaemonService>;

/** A daemon's messages for people (see DaemonLog). */
export interface DaemonReporter {
  warn(message: string): void;
  error(message: string): void;
}

const MOUNT_TIMEOUT_MS = 20_000;
const FINAL_FLUSH_RETRY_MS = 10_000;
const FINAL_FLUSH_RETRY_INTERVAL_MS = 500;

/**
 * One mounted directory and its disks: opens the disks, mounts, keeps
 * cache=writeback data flowing to disk, notices an external unmount, and
 * stops cleanly (flush, unmount, close).
 */
export class MountDaemon {
  readonly entries: Array<DiskEntry<AddCowLayer>>;
  readonly mountDir: string;
  /** The mount's confinement (-o confine): reopens of a disk's files for jobs apply it too. */
  get confine(): Confinement | null {
    return this.config.options.confine;
  }
  /** The mount's URL rules (-o allow_url=, url_auth=): reopens apply them too. */
  get urls(): UrlRules {
    return this.config.options.urls;
  }
  private readonly services: DaemonService[] = [];
  private timers: NodeJS.Timeout[] = [];
  private unwatch: (() => void) | null = null;
  private mountDevice: string | null = null;
  private stopping: Promise<void> | null = null;
  private stoppedResolve!: (code: number) => void;
  /** Resolves with the exit code once the daemon has stopped. */
  readonly stopped: Promise<number>;
  private exitCode = 0;
  private frontEnd: FuseFrontEnd | null = null;
  /** The last failure of each disk's periodic write-back that was said, until it works again. */
  private readonly writeBackProblems = new Map<DiskEntry, string>();
  /** Set once the mount left the mount table while files were still open (a lazy unmount). */
  private detached = false;

  private constructor(
    readonly config: DaemonConfig,
    entries: Array<DiskEntry<AddCowLayer>>,
  ) {
    this.entries = entries;
    this.mountDir = config.mountDir;
    this.stopped = new Promise((resolve) => (this.stoppedResolve = resolve));
    for (const e of entries) e.onFailure = (err) => this.diskFailed(e, err);
  }

  /** Opens every disk and mounts; on failure nothing stays open or mounted. */
  static async start(config: DaemonConfig): Promise<MountDaemon> {
    let mountDir = path.resolve(config.mountDir);
    config = { ...config, mountDir };
    checkNames(config.disks);
    const createdDir = prepareMountDir(mountDir);
    // The mount table names the real path; compare with that (MOUNTDIR may be reached by a symlink).
    mountDir = fs.realpathSync(mountDir);
    config.mountDir = mountDir;
    const entries: Array<DiskEntry<AddCowLayer>> = [];
    let mounted = false;
    try {
      // One set of options per mount: the disks open with it, and so do their live reopens.
      const open: OpenOptions = {
        writable: !config.options.readOnly,
        cacheMode: config.options.cacheMode,
        copyOnRead: config.options.copyOnRead,
        confine: config.options.confine,
        urls: config.options.urls,
        ...(config.options.verify ? { verify: config.options.verify } : {}),
        ...(config.opener ? { opener: config.opener } : {}),
      };
      for (const disk of config.disks) {
        const device = await waitingForExitingDaemon(disk.file, () => openDisk(disk.file, open));
        entries.push(new DiskEntry(disk.name, disk.file, device, open));
      }
      const daemon = new MountDaemon(config, entries);
      const frontEnd = createFuseFrontEnd(mountDir, entries, config.options);
      daemon.frontEnd = frontEnd;
      await withTimeout(
        frontEnd.mount().catch((err: unknown) => {
          throw mountError(err, mountDir);
        }),
        MOUNT_TIMEOUT_MS,
        `mounting ${mountDir} timed out`,
      );
      mounted = true;
      // A stat through the mount proves the kernel reaches us (async: it is served on this thread).
      const st = await fs.promises.stat(mountDir);
      daemon.mountDevice = deviceId(st.dev);
      await fs.promises.stat(path.join(mountDir, entries[0]!.name));
      for (const factory of config.services ?? []) daemon.services.push(await factory(daemon));
      daemon.startTimers();
      log.daemon(
        "mounted %s at %s (device %s)",
        config.disks.map((d) => d.file).join(", "),
        mountDir,
        daemon.mountDevice,
      );
      return daemon;
    } catch (err) {
      if (mounted || isMountedAt(mountDir)) await unmountDir(mountDir, true).catch(() => undefined);
      for (const e of entries) await e.close().catch(() => undefined);
      // Awaited: a background child exits right after reporting the failure.
      if (createdDir) await fs.promises.rmdir(mountDir).catch(() => undefined);
      throw err;
    }
  }

  /** Stops the daemon: services, flush, unmount (when still mounted), close. Idempotent. */
  stop(reason: string): Promise<void> {
    if (!this.stopping) this.stopping = this.doStop(reason);
    return this.stopping;
  }

  private async doStop(reason: string): Promise<void> {
    log.daemon("stopping: %s", reason);
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    this.unwatch?.();
    this.unwatch = null;
    for (const s of this.services.reverse()) {
      await s
        .stop()
        .catch((err: unknown) => this.warn(`stopping a service: ${describeError(err)}`));
    }
    // Flush before unmounting so the data is durable even if the unmount fails.
    await this.finalFlush();
    if (this.mountDevice !== null && (await this.stillMounted())) {
      await unmountDir(this.mountDir, false).catch((err: unknown) => {
        this.warn(`unmounting ${this.mountDir}: ${describeError(err)}`);
      });
    }
    for (const e of this.entries) {
      await e.close().catch((err: unknown) => {
        this.exitCode = 1;
        if (!e.failure) this.error(`closing ${e.file}: ${describeError(err)}`);
      });
    }
    if (this.exitCode !== 0) {
      this.error(
        `stopped (${reason}) with errors: see the messages above; exit status ${this.exitCode}`,
      );
    }
    log.daemon("stopped");
    this.stoppedResolve(this.exitCode);
  }

  private warn(message: string): void {
    log.daemon("warning: %s", message);
    this.config.reporter?.warn(message);
  }

  private error(message: string): void {
    log.daemon("error: %s", message);
    this.config.reporter?.error(message);
  }

  /** Said once per disk, loudly: its flushes fail from now on. */
  private diskFailed(e: DiskEntry, err: AddCowError): void {
    this.exitCode = 1;
    this.error(
      `DISK FAILED: ${e.file} (${this.mountDir}/${e.name}): ${describeError(err)}. Writes acknowledged since the last successful fsync may be lost, and every fsync now fails with EIO. Stop the programs using it, unmount, check the file system holding the image file, and mount again`,
    );
  }

  /**
   * The flush before unmount. A failure that may pass (a full file system, an
   * I/O error on the .add-cow file) is retried for finalFlushRetryMs; a failed
   * data sync is final at once. Either way a failure makes the exit status 1.
   */
  private async finalFlush(): Promise<void> {
    const limit = this.config.finalFlushRetryMs ?? FINAL_FLUSH_RETRY_MS;
    for (const e of this.entries) {
      if (e.target.readOnly) continue;
      const end = Date.now() + limit;
      for (let attempt = 1; ; attempt++) {
        try {
          await e.flushIfDirty();
          if (attempt > 1) this.warn(`flushing ${e.file} worked on attempt ${attempt}`);
          break;
        } catch (err) {
          if (e.failure) break;
          if (Date.now() >= end) {
            this.exitCode = 1;
            this.error(
              `flushing ${e.file} before unmount failed for ${Math.round(limit / 1000)} s, giving up: ${describeError(err)}; writes since the last successful fsync may be lost`,
            );
            break;
          }
          if (attempt === 1) {
            this.warn(
              `flushing ${e.file} before unmount failed: ${describeError(err)}; retrying for up to ${Math.round(limit / 1000)} s`,
            );
          }
          await new Promise((resolve) => setTimeout(resolve, FINAL_FLUSH_RETRY_INTERVAL_MS));
        }
      }
    }
  }

  /**
   * The periodic write-back of bits; a failure is retried by the next round.
   * It is said when it starts or changes, and when it is over, not every round.
   */
  private async writeBackAll(): Promise<void> {
    for (const e of this.entries) {
      if (e.target.readOnly) continue;
      const said = this.writeBackProblems.get(e);
      try {
        await e.writeBackIfNeeded();
        if (said !== undefined) {
          this.writeBackProblems.delete(e);
          this.warn(`periodic write-back of ${e.file} works again`);
        }
      } catch (err) {
        const text = describeError(err);
        if (e.failure || text === said) continue;
        this.writeBackProblems.set(e, text);
        this.warn(`periodic write-back of ${e.file} failed: ${text}; retrying every few seconds`);
      }
    }
  }

  /**
   * The mount left the mount table: stop, unless files are still open
   * through it (a lazy unmount while a program or VM uses the disk): those
   * keep being served, and the daemon stops once the last one is released,
   * as libfuse file systems do. The kernel may end the connection without
   * sending that last release; libfuse then closes /dev/fuse, which says the same.
   */
  private unmountedExternally(): void {
    const open = this.frontEnd?.openFiles() ?? 0;
    if (open === 0 || !this.frontEnd?.connectionOpen()) {
      void this.stop(`${this.mountDir} was unmounted`);
      return;
    }
    if (!this.detached) {
      this.detached = true;
      log.daemon(
        "%s was unmounted lazily; serving %d open file(s) until closed",
        this.mountDir,
        open,
      );
    }
  }

  private startTimers(): void {
    const watch = this.config.mountWatch ?? new MountWatch(this.config.pollIntervalMs ?? 200);
    this.unwatch = watch.watch((table) => {
      if (!this.mountedIn(table)) this.unmountedExternally();
    });
    if (!this.config.options.readOnly && this.config.options.cacheMode === "writeback") {
      let flushing = false;
      const writeback = setInterval(() => {
        if (flushing) return;
        flushing = true;
        void this.writeBackAll().finally(() => (flushing = false));
      }, this.config.writebackIntervalMs ?? 5000);
      // The mount-table poll keeps the process alive; this one need not.
      writeback.unref();
      this.timers.push(writeback);
    }
  }

  private async stillMounted(): Promise<boolean> {
    return this.mountedIn(await readMountTableAsync());
  }

  private mountedIn(table: MountEntry[]): boolean {
    return table.some((m) => m.mountPoint === this.mountDir && m.device === this.mountDevice);
  }
}

/** The names the disks get in the mount directory: plain, and one per disk. */
function checkNames(disks: DiskSpec[]): void {
  if (disks.length === 0) throw new AddCowError("no disk given: name at least one FILE.add-cow");
  const seen = new Map<string, string>();
  for (const d of disks) {
    if (d.name === "" || d.name === "." || d.name === ".." || d.name.includes("/")) {
      throw new AddCowError(
        `invalid file name ${JSON.stringify(d.name)} for ${d.file}: give a plain name without "/"`,
      );
    }
    const other = seen.get(d.name);
    if (other !== undefined) {
      throw new AddCowError(
        `${other} and ${d.file} would both appear as ${d.name}; mount them in separate directories`,
      );
    }
    seen.set(d.name, d.file);
  }
}

function isMountedAt(dir: string): boolean {
  try {
    return readMountTable().some((m) => m.mountPoint === dir && m.fsType.startsWith("fuse"));
  } catch {
    return false;
  }
}

/** fusermount -u; when that fails (busy) or `lazy` is asked for, a lazy unmount so nothing stays mounted. */
export async function unmountDir(dir: string, lazy: boolean): Promise<void> {
  if (!lazy) {
    try {
      await execFileAsync("fusermount", ["-u", dir]);
      return;
    } catch (err) {
      log.daemon("fusermount -u %s failed (%s); unmounting lazily", dir, describeError(err));
    }
  }
  await execFileAsync("fusermount", ["-uz", dir]);
}

function withTimeout<T>(p: Promise<T>, ms: number, message: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(new AddCowError(message, { code: "ETIMEDOUT" })), ms);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (err: unknown) => {
        clearTimeout(t);
        reject(err);
      },
    );
  });
}

/**
 * fuse-native's own mount failure carries no code ("fuse failed"): name the
 * directory and the likely cause. The directory itself was checked before
 * (prepareMountDir), so a file system error here is passed on with its code.
 */
function mountError(err: unknown, dir: string): unknown {
  if (err instanceof AddCowError || errnoCode(err) !== undefined) return err;
  return new AddCowError(
    `cannot mount ${dir}: the FUSE mount failed (is /dev/fuse there and are you allowed to use it? is the fuse package installed?)`,
    { file: dir, code: "EIO", cause: err },
  );
}
