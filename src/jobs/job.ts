import { EventEmitter } from "node:events";
import { AddCowError, describeError, errnoCode, errorPath, isNoSpace } from "../util/errors";
import { log } from "../util/log";
import type { CopyEngine, CopyOutcome, CopyProgress } from "./copy-engine";

export type JobKind = "stream" | "commit" | "snapshot" | "rebase";
export type JobState = "running" | "paused" | "completed" | "cancelled" | "failed";

/** What `addcow jobs` lists and what --json progress events carry. */
export interface JobStatus {
  id: string;
  kind: JobKind;
  disk: string;
  state: JobState;
  /** Bytes handled so far and in total. */
  done: number;
  total: number;
  /** Bytes per second over the last seconds. */
  rate: number;
  inFlight: number;
  peakInFlight: number;
  /** Set when the job ends: what happened, for people. */
  message?: string;
  error?: string;
}

/**
 * A running block job. The body does the work and reports through the copy
 * engine it attaches; pause, resume and cancel are forwarded to that engine.
 * Emits "progress", "state" and "done", each with a JobStatus.
 */
export class Job extends EventEmitter {
  private static counter = 0;
  readonly id: string;
  private state: JobState = "running";
  private engine: CopyEngine | null = null;
  private last: CopyProgress = { done: 0, total: 0, rate: 0, inFlight: 0, peakInFlight: 0 };
  private message: string | undefined;
  private error: string | undefined;
  private cancelRequested = false;
  private pauseRequested = false;
  private result: Promise<JobStatus> | null = null;

  constructor(
    readonly kind: JobKind,
    readonly disk: string,
    id?: string,
  ) {
    super();
    this.id = id ?? `${kind}-${++Job.counter}`;
  }

  status(): JobStatus {
    const p = this.engine ? this.engine.progress() : this.last;
    return {
      id: this.id,
      kind: this.kind,
      disk: this.disk,
      state: this.state,
      done: p.done,
      total: p.total,
      rate: p.rate,
      inFlight: p.inFlight,
      peakInFlight: p.peakInFlight,
      ...(this.message === undefined ? {} : { message: this.message }),
      ...(this.error === undefined ? {} : { error: this.error }),
    };
  }

  get cancelled(): boolean {
    return this.cancelRequested;
  }

  get finished(): boolean {
    return this.state === "completed" || this.state === "cancelled" || this.state === "failed";
  }

  private setState(state: JobState): void {
    if (this.state === state) return;
    this.state = state;
    this.emit("state", this.status());
  }

  /** Runs the engine as this job's copy phase: progress, pause, resume, cancel go through it. */
  async runEngine(engine: CopyEngine): Promise<CopyOutcome> {
    this.engine = engine;
    engine.on("progress", (p: CopyProgress) => {
      this.last = p;
      this.emit("progress", this.status());
    });
    if (this.pauseRequested) engine.pause();
    if (this.cancelRequested) engine.cancel();
    try {
      return await engine.run();
    } finally {
      this.last = engine.progress();
      this.engine = null;
    }
  }

  pause(): void {
    if (this.finished) return;
    this.pauseRequested = true;
    this.engine?.pause();
    this.setState("paused");
  }

  resume(): void {
    if (this.finished) return;
    this.pauseRequested = false;
    this.engine?.resume();
    this.setState("running");
  }

  cancel(): void {
    if (this.finished) return;
    this.cancelRequested = true;
    this.engine?.resume();
    this.engine?.cancel();
  }

  /** Starts the body once; resolves with the final status (never rejects). */
  start(body: (job: Job) => Promise<string>): Promise<JobStatus> {
    this.result ??= (async () => {
      try {
        this.message = await body(this);
        this.setState(this.cancelRequested ? "cancelled" : "completed");
      } catch (err) {
        this.error = describeError(err);
        log.job("%s failed: %O", this.id, err);
        this.setState("failed");
      }
      const status = this.status();
      this.emit("done", status);
      return status;
    })();
    return this.result;
  }

  wait(): Promise<JobStatus> {
    if (!this.result) throw new Error(`job ${this.id} was never started`);
    return this.result;
  }
}

/** What a job does when the file system it writes to is full. */
export interface WhenFull {
  /** The file written to, when the error does not name one. */
  file: string;
  /** Makes durable what the job keeps (a stream's copied clusters). */
  keep(): Promise<void>;
  /** The rest of the line after "...is full (ENOSPC); ": what is kept, what to do. */
  advice(): Promise<string>;
}

/**
 * Runs a job's copies. A full file system (ENOSPC, EDQUOT) ends the job with
 * one line naming the full file and saying what to do, after keeping what can
 * be kept; any other error passes unchanged.
 */
export async function runUntilFull(
  job: Job,
  engine: CopyEngine,
  what: string,
  full: WhenFull,
): Promise<CopyOutcome> {
  try {
    return await job.runEngine(engine);
  } catch (err) {
    if (!isNoSpace(err)) throw err;
    await full.keep().catch(() => undefined);
    const file = errorPath(err) ?? full.file;
    const code = errnoCode(err);
    throw new AddCowError(
      `${what} stopped: the file system holding ${file} is full (${code}); ${await full.advice()}`,
      { file, code, reason: "no-space", cause: err },
    );
  }
}
