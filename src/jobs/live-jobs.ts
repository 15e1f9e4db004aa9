import { AddCowError } from "../util/errors";
import type { CopyOptions } from "./copy-engine";
import { Job, type JobKind, type JobStatus } from "./job";
import type { LiveDisk } from "./live";

/**
 * The jobs themselves are loaded when the first one starts: a daemon that
 * never runs a job (most of them) does not pay for their code at mount time.
 */
const jobCode = () => ({
  ...(require("./live") as typeof import("./live")),
  ...(require("./stream") as typeof import("./stream")),
});

/** What a live job is asked to do: the control protocol's job options, as they travel. */
export interface LiveJobRequest extends CopyOptions {
  keep?: boolean;
  /** snapshot: the new overlay and its image file (absolute paths). */
  newFile?: string;
  image?: string;
  clusterSize?: number;
  /** snapshot: store these names relative to NEW's directory (the user gave them relative). */
  relative?: { backing: boolean; image: boolean };
}

interface Served {
  live: LiveDisk;
  /** The .add-cow file on top of the mounted disk (changes with a live snapshot). */
  topFile: string;
  job: Job | null;
  /** Keys of the files that were its top before a live snapshot. */
  retiredKeys: string[];
}

/** Finished jobs stay listed a while so `addcow jobs` can show how they ended. */
const KEEP_FINISHED = 16;

/**
 * The jobs of one daemon: at most one per mounted disk at a time, found by
 * id; disks are named by their top .add-cow file (by real path, `keyOf`).
 * A host daemon adds and removes disks while it runs.
 */
export class LiveJobs {
  private readonly served: Served[] = [];
  private readonly byKey = new Map<string, Served>();
  /** Keys of files that were the top before a live snapshot: now only read. */
  private readonly retired = new Map<string, string>();
  private readonly jobs = new Map<string, Job>();
  private counter = 0;

  constructor(
    disks: readonly LiveDisk[],
    private readonly keyOf: (file: string) => string,
    /** Called when a live snapshot put a new file on top of a disk. */
    private readonly onNewTop: (newFile: string, disk: LiveDisk) => Promise<void>,
  ) {
    this.add(disks);
  }

  /** Serves more disks (a host daemon attached them). */
  add(disks: readonly LiveDisk[]): void {
    for (const live of disks) {
      const s: Served = { live, topFile: live.file, job: null, retiredKeys: [] };
      this.served.push(s);
      this.byKey.set(this.keyOf(s.topFile), s);
    }
  }

  /** Stops serving these disks: their running job is cancelled and waited for (it flushes). */
  async remove(disks: readonly LiveDisk[]): Promise<void> {
    const gone = this.served.filter((s) => disks.includes(s.live));
    const running = gone.map((s) => s.job).filter((j): j is Job => j !== null && !j.finished);
    for (const job of running) job.cancel();
    await Promise.all(running.map((job) => job.wait()));
    for (const s of gone) {
      this.served.splice(this.served.indexOf(s), 1);
      this.byKey.delete(this.keyOf(s.topFile));
      for (const key of s.retiredKeys) this.retired.delete(key);
    }
  }

  /** The top file of every disk, or of the given ones. */
  tops(disks?: readonly LiveDisk[]): string[] {
    return this.served.filter((s) => !disks || disks.includes(s.live)).map((s) => s.topFile);
  }

  list(): JobStatus[] {
    return [...this.jobs.values()].map((j) => j.status());
  }

  find(id: string): Job {
    const job = this.jobs.get(id);
    if (!job) throw new AddCowError(`no job ${id} in daemon ${process.pid}`, { reason: "invalid" });
    return job;
  }

  /** Cancels the running jobs and waits until they have stopped (they flush). */
  async cancelAll(): Promise<void> {
    const running = [...this.jobs.values()].filter((j) => !j.finished);
    for (const job of running) job.cancel();
    await Promise.all(running.map((job) => job.wait()));
  }

  private servedFor(disk: string): Served {
    const key = this.keyOf(disk);
    const newer = this.retired.get(key);
    if (newer !== undefined) {
      throw new AddCowError(
        `${disk} is now a backing layer of ${newer} (live snapshot) and is only read; run the job on ${newer}`,
        { reason: "invalid" },
      );
    }
    const served = this.byKey.get(key);
    if (!served) {
      throw new AddCowError(`${disk} is not served by daemon ${process.pid}`, {
        reason: "invalid",
      });
    }
    return served;
  }

  /** Starts a job; refusals that need no work are thrown at once, as one line. */
  start(kind: JobKind, disk: string, req: LiveJobRequest): JobStatus {
    const served = this.servedFor(disk);
    if (served.job && !served.job.finished) {
      throw new AddCowError(
        `${served.topFile} already runs job ${served.job.id}; wait for it or cancel it (addcow job cancel ${served.job.id})`,
        { code: "EBUSY", reason: "invalid" },
      );
    }
    jobCode().checkLiveJob(kind, served.live, served.topFile);
    const job = new Job(kind, served.topFile, `${kind}-${process.pid}-${++this.counter}`);
    served.job = job;
    this.jobs.set(job.id, job);
    this.forgetOldJobs();
    void job.start((j) => this.run(kind, served, j, req));
    return job.status();
  }

  private async run(kind: JobKind, served: Served, job: Job, req: LiveJobRequest) {
    const { keep, newFile, image, clusterSize, relative, ...copy } = req;
    const { streamDisk, liveCommit, liveSnapshot } = jobCode();
    switch (kind) {
      case "stream":
        // Copies run beside user writes; the allocation lock keeps user data winning.
        return streamDisk(served.live.top, job, copy);
      case "commit":
        return liveCommit(served.live, served.topFile, job, { ...copy, keep: keep === true });
      case "snapshot": {
        if (!newFile) throw new AddCowError("snapshot needs the new file name");
        const msg = await liveSnapshot(served.live, served.topFile, newFile, {
          ...(image === undefined ? {} : { image }),
          ...(clusterSize === undefined ? {} : { clusterSize }),
          ...(relative === undefined ? {} : { relative }),
        });
        const oldKey = this.keyOf(served.topFile);
        this.retired.set(oldKey, newFile);
        served.retiredKeys.push(oldKey);
        this.byKey.delete(oldKey);
        served.topFile = newFile;
        this.byKey.set(this.keyOf(newFile), served);
        await this.onNewTop(newFile, served.live);
        return msg;
      }
      case "rebase":
        throw new AddCowError(`rebase works on a disk at rest; unmount ${served.topFile} first`);
    }
  }

  private forgetOldJobs(): void {
    const finished = [...this.jobs.values()].filter((j) => j.finished);
    for (const j of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) {
      this.jobs.delete(j.id);
    }
  }
}
