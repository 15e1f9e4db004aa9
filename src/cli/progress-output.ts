import { Presets, SingleBar } from "cli-progress";
import { formatSize } from "../util/size";
import type { JobStatus } from "../jobs/job";

/**
 * How a job's progress reaches a person or a script:
 * - "bar": a progress bar on a terminal (stderr): bytes done, rate, ETA;
 * - "lines": one plain line every few seconds (stderr), for logs and pipes;
 * - "json": one JSON event per line on stdout, for scripts;
 * - "quiet": nothing but errors.
 */
export type ProgressMode = "bar" | "lines" | "json" | "quiet";

export function chooseMode(flags: { json?: boolean; quiet?: boolean }): ProgressMode {
  if (flags.json) return "json";
  if (flags.quiet) return "quiet";
  return process.stderr.isTTY ? "bar" : "lines";
}

/** The JSON event a script reads: {"event": ..., "time": ..., ...status}. */
export function jsonEvent(event: string, status: JobStatus): string {
  return JSON.stringify({ event, time: new Date().toISOString(), ...status }) + "\n";
}

function rateText(rate: number): string {
  return `${formatSize(Math.round(rate))}/s`;
}

function percent(s: JobStatus): string {
  return s.total > 0 ? `${Math.floor((s.done / s.total) * 100)}%` : "100%";
}

export class ProgressOutput {
  private bar: SingleBar | null = null;
  /** Once a note was printed under the bar, the bar is not drawn again. */
  private barDone = false;
  private lastLine = 0;

  constructor(
    private readonly mode: ProgressMode,
    private readonly lineIntervalMs = 2000,
  ) {}

  /** A progress event, or a "state" event (paused, running). */
  update(s: JobStatus, event: "progress" | "state" = "progress"): void {
    switch (this.mode) {
      case "json":
        process.stdout.write(jsonEvent(event, s));
        return;
      case "lines": {
        if (event === "state") {
          process.stderr.write(`${s.kind} ${s.disk}: ${s.state === "paused" ? "paused" : "resumed"}
`);
          return;
        }
        const now = Date.now();
        if (s.total === 0 || now - this.lastLine < this.lineIntervalMs) return;
        this.lastLine = now;
        process.stderr.write(
          `${s.kind} ${s.disk}: ${percent(s)} (${formatSize(s.done)} of ${formatSize(s.total)}), ${rateText(s.rate)}${s.state === "paused" ? ", paused" : ""}\n`,
        );
        return;
      }
      case "bar": {
        if (this.barDone) return;
        const payload = {
          doneText: formatSize(s.done),
          totalText: formatSize(s.total),
          rateText: rateText(s.rate),
          state: s.state === "paused" ? " paused" : "",
        };
        if (!this.bar) {
          this.bar = new SingleBar(
            {
              format: `${s.kind} |{bar}| {percentage}% {doneText}/{totalText} {rateText} ETA {eta_formatted}{state}`,
              hideCursor: true,
              etaBuffer: 50,
              fps: 5,
              stream: process.stderr,
            },
            Presets.shades_classic,
          );
          this.bar.start(Math.max(1, s.total), s.done, payload);
        } else {
          this.bar.setTotal(Math.max(1, s.total));
          this.bar.update(s.done, payload);
        }
        return;
      }
      case "quiet":
        return;
    }
  }

  /** A message for people (Ctrl-C): ends the bar first so it does not overwrite the text. */
  note(text: string): void {
    if (this.mode === "json" || this.mode === "quiet") return;
    if (this.bar) {
      this.bar.stop();
      this.bar = null;
      this.barDone = true;
    }
    process.stderr.write(text + "\n");
  }

  /** The end: the bar is completed and the job's message printed (stdout) or its JSON event. */
  finish(s: JobStatus): void {
    if (this.bar) {
      if (s.state === "completed") this.bar.update(Math.max(1, s.total));
      this.bar.stop();
      this.bar = null;
    }
    if (this.mode === "json") {
      process.stdout.write(jsonEvent(s.state === "failed" ? "failed" : s.state, s));
      return;
    }
    if (this.mode === "quiet" || s.state === "failed") return;
    if (s.message) process.stdout.write(s.message + "\n");
  }
}
