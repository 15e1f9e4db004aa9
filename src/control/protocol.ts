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
  | { op: "watch"; id: string }
  | AttachRequest
  | { op: "detach"; mountDir: string };

/**
 * A host daemon's socket only: serve these disks at mountDir, as
 * `addcow-mount -o OPTIONS FILE... MOUNTDIR` would (the options are parsed
 * by the daemon, relative paths against cwd: the client's directory).
 */
export interface AttachRequest {
  op: "attach";
  files: string[];
  mountDir: string;
  name?: string;
  options: string[];
  cwd: string;
}

/** One mount of a host daemon, as hello on its socket lists it. */
export interface HostMount {
  mountDir: string;
  disks: string[];
}

export interface HelloResponse {
  ok: true;
  pid: number;
  disks: string[];
  mountDir: string;
  /** The mount's confinement (-o confine); null without. */
  confine: Confinement | null;
  /** A host daemon's socket: its name and every mount it serves (mountDir is then ""). */
  host?: { name: string; mounts: HostMount[] };
  /** The mount's URL rules (older daemons: absent). */
  urls?: UrlRules;
}

export type ControlResponse =
  | HelloResponse
  | { ok: true; jobs: JobStatus[] }
  | { ok: true; job: JobStatus }
  | { ok: true; mount: HostMount }
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
