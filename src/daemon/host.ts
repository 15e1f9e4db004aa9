import * as path from "node:path";
import type { FileOpener } from "../block/file-io";
import { AddCowError, describeError } from "../util/errors";
import { log } from "../util/log";
import {
  type DaemonReporter,
  type DaemonServiceFactory,
  type DiskSpec,
  MountDaemon,
} from "./daemon";
import type { MountOptions } from "./mount-options";
import { MountWatch } from "./mount-watch";

export interface HostConfig {
  /** The host daemon's name (addcow-mount --serve NAME, -o host=NAME). */
  name: string;
  /** Where the host's own messages go, and a disk's unless its -o log= says otherwise. */
  reporter: DaemonReporter;
  /** A disk's reporter for its own -o log= destination. */
  reporterFor?: (options: MountOptions) => DaemonReporter;
  /** How the disks' files are opened (default: plain POSIX files; fault tests wrap it). */
  opener?: FileOpener;
}

/** What attach serves: like the arguments of one addcow-mount. */
export interface AttachSpec {
  disks: DiskSpec[];
  mountDir: string;
  options: MountOptions;
}

/**
 * One process serving many mounts, attached and detached while it runs (as
 * qemu-storage-daemon adds and removes exports): each mount is a MountDaemon
 * of its own, with its own FUSE session, options, log, flushes and failure,
 * so `fusermount -u` of one directory flushes and detaches only that one.
 * What they share: the process (one Node runtime instead of one each), the
 * mount-table reader, and remote bases opened by several disks (one device
 * and one memory cache per base, src/remote/shared-remote.ts).
 */
export class HostDaemon {
  private readonly mounts = new Map<string, MountDaemon>();
  /** Directories being attached right now (by resolved path). */
  private readonly pending = new Set<string>();
  private readonly watch = new MountWatch();
  private stopping: Promise<void> | null = null;
  private exitCode = 0;
  private stoppedResolve!: (code: number) => void;
  /** Resolves with the exit code once every mount is stopped: 1 if any ended with errors. */
  readonly stopped: Promise<number>;
  /** Run with every mount (the control service that puts its disks on the host's sockets). */
  mountServices: DaemonServiceFactory[] = [];

  constructor(private readonly config: HostConfig) {
    this.stopped = new Promise((resolve) => (this.stoppedResolve = resolve));
  }

  get name(): string {
    return this.config.name;
  }

  /** Opens the disks and mounts them at spec.mountDir; a failure leaves nothing behind. */
  async attach(spec: AttachSpec): Promise<MountDaemon> {
    if (this.stopping) throw new AddCowError(`host daemon ${this.name} is stopping`);
    if (spec.options.debug) {
      throw new AddCowError(
        `-o debug cannot be used with host=${this.name}: trace the host daemon instead (addcow-mount --serve ${this.name} -d)`,
      );
    }
    const dir = path.resolve(spec.mountDir);
    if (this.pending.has(dir)) {
      throw new AddCowError(`${dir} is being attached to host daemon ${this.name} already`);
    }
    this.pending.add(dir);
    try {
      const daemon = await MountDaemon.start({
        disks: spec.disks,
        mountDir: dir,
        options: spec.options,
        reporter: this.config.reporterFor?.(spec.options) ?? this.config.reporter,
        services: this.mountServices,
        mountWatch: this.watch,
        ...(this.config.opener ? { opener: this.config.opener } : {}),
      });
      this.mounts.set(daemon.mountDir, daemon);
      void daemon.stopped.then((code) => {
        this.mounts.delete(daemon.mountDir);
        if (code !== 0) this.exitCode = 1;
        log.daemon("host %s: %s detached (%d left)", this.name, daemon.mountDir, this.mounts.size);
      });
      log.daemon("host %s: attached %s (%d mounts)", this.name, daemon.mountDir, this.mounts.size);
      return daemon;
    } finally {
      this.pending.delete(dir);
    }
  }

  /** Flushes, unmounts and closes the mount at mountDir, as `fusermount -u` would. */
  async detach(mountDir: string): Promise<void> {
    const daemon = this.find(mountDir);
    await daemon.stop("detached on request");
    await daemon.stopped;
  }

  private find(mountDir: string): MountDaemon {
    const want = path.resolve(mountDir);
    for (const d of this.mounts.values()) {
      if (d.mountDir === want || d.config.mountDir === want) return d;
    }
    throw new AddCowError(`host daemon ${this.name} does not serve ${want}`);
  }

  /** Every mount: its directory and disks. */
  list(): Array<{ mountDir: string; disks: string[] }> {
    return [...this.mounts.values()].map((d) => ({
      mountDir: d.mountDir,
      disks: d.entries.map((e) => e.file),
    }));
  }

  /** Stops every mount (flush, unmount, close), then resolves `stopped`. Idempotent. */
  stop(reason: string): Promise<void> {
    this.stopping ??= (async () => {
      log.daemon("host %s stopping: %s", this.name, reason);
      const all = [...this.mounts.values()];
      await Promise.all(
        all.map((d) =>
          d.stop(reason).catch((err: unknown) => {
            this.exitCode = 1;
            this.config.reporter.error(`stopping ${d.mountDir}: ${describeError(err)}`);
          }),
        ),
      );
      for (const d of all) if ((await d.stopped) !== 0) this.exitCode = 1;
      this.stoppedResolve(this.exitCode);
    })();
    return this.stopping;
  }
}
