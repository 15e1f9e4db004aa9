import type { JobKind, JobStatus } from "../jobs/job";
import type { LiveJobRequest } from "../jobs/live-jobs";
import type { Confinement } from "../chain/access-policy";
import type { UrlRules } from "../chain/url-policy";

/**
 * The control protocol: one JSON object per line over a unix socket. A client
 * sends one request; the daemon answers with one response line, except for
 * "watch", which gets event lines until the job ends, then the connection closes.
 */

export type ControlRequest =
  | { op: "hello" }
  | { op: "list" }
  | { op: "start"; kind: JobKind; disk: string; options: LiveJobRequest }
  | { op: "pause" | "resume" | "cancel"; id: string }
  | { op: "watch"; id: string };

export interface HelloResponse {
  ok: true;
  pid: number;
  disks: string[];
  mountDir: string;
  /** The mount's confinement (-o confine); null without. */
  confine: Confinement | null;
  /** The mount's URL rules (older daemons: absent). */
  urls?: UrlRules;
}

export type ControlResponse =
  | HelloResponse
  | { ok: true; jobs: JobStatus[] }
  | { ok: true; job: JobStatus }
  | { ok: false; error: string };

export interface WatchEvent {
  event: "progress" | "state" | "done";
  job: JobStatus;
}

/** Splits a stream of text into lines and parses each as JSON. */
export class LineParser {
  private buffered = "";

  constructor(private readonly onMessage: (msg: unknown) => void) {}

  push(chunk: string): void {
    this.buffered += chunk;
    for (;;) {
      const nl = this.buffered.indexOf("\n");
      if (nl < 0) break;
      const line = this.buffered.slice(0, nl);
      this.buffered = this.buffered.slice(nl + 1);
      if (line.trim() !== "") this.onMessage(JSON.parse(line));
    }
    if (this.buffered.length > 1 << 20) throw new Error("control message too long");
  }
}
