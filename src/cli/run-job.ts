import * as path from "node:path";
import type { Command } from "commander";
import { findDaemon } from "../control/client";
import type { LiveJobRequest } from "../jobs/live-jobs";
import { AddCowError } from "../util/errors";
import { parseSize } from "../util/size";
import type { CopyOptions } from "../jobs/copy-engine";
import { DEFAULT_BUF_SIZE, DEFAULT_IN_FLIGHT } from "../jobs/copy-engine";
import { Job, type JobKind, type JobStatus } from "../jobs/job";
import { ProgressOutput, chooseMode } from "./progress-output";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "./confine-options";
import { NO_URL_RULES, urlRulesCover } from "../chain/url-policy";
import { confinementCovers } from "../chain/access-policy";
import { addFormatOption, addJsonOption } from "./qemu-options";

/** Shared by `addcow stream|commit|snapshot`: options, live or at rest, progress, Ctrl-C. */

export interface CopyFlags extends ConfineFlags {
  inFlight?: string;
  bufSize?: string;
  granularity?: string;
  speed?: string;
  json?: boolean;
  quiet?: boolean;
  detach?: boolean;
}

/** Exit code of a job stopped by Ctrl-C or cancel (128 + SIGINT). */
export const EXIT_CANCELLED = 130;

/** The options of every copying job; `live: false` for one that runs on disks at rest only. */
export function addCopyOptions(cmd: Command, opts: { live?: boolean } = {}): Command {
  const withCopy = addFormatOption(
    addJsonOption(addConfineOptions(cmd), "print progress as JSON events, one per line, on stdout"),
  )
    .option("-n, --in-flight <n>", `copies running at once (default ${DEFAULT_IN_FLIGHT})`)
    .option("--buf-size <size>", "buffer memory shared by the copies (default 16M)")
    .option(
      "--granularity <size>",
      "chunk alignment, a multiple of the cluster size (default: the cluster size)",
    )
    .option("--speed <rate>", "limit in bytes per second (e.g. 100M); default: no limit")
    .option("-q, --quiet", "print nothing but errors");
  if (opts.live === false) return withCopy;
  return withCopy.option("-d, --detach", "on a mounted disk: start the job and return at once");
}

export function parseCopyFlags(flags: CopyFlags): CopyOptions {
  const opts: CopyOptions = {};
  if (flags.inFlight !== undefined) {
    const n = Number(flags.inFlight);
    if (!Number.isInteger(n) || n < 1 || n > 1024) {
      throw new AddCowError(
        `invalid --in-flight ${JSON.stringify(flags.inFlight)}: give a whole number from 1 to 1024`,
      );
    }
    opts.inFlight = n;
  }
  if (flags.bufSize !== undefined) {
    opts.bufSize = parseSize(flags.bufSize, "--buf-size");
    if (opts.bufSize < 4096)
      throw new AddCowError(`invalid --buf-size ${flags.bufSize}: at least 4K`);
  }
  if (flags.granularity !== undefined)
    opts.granularity = parseSize(flags.granularity, "--granularity");
  if (flags.speed !== undefined) {
    opts.speed = parseSize(flags.speed.replace(/\/s$/i, ""), "--speed");
  }
  return opts;
}

function finishCode(status: JobStatus): number {
  if (status.state === "failed") throw new AddCowError(status.error ?? "the job failed");
  return status.state === "cancelled" ? EXIT_CANCELLED : 0;
}

/** Ctrl-C (and SIGTERM) asks the job to stop cleanly; a second Ctrl-C leaves at once. */
function onInterrupt(out: ProgressOutput, stop: () => void): () => void {
  let count = 0;
  const handler = (signal: NodeJS.Signals) => {
    count++;
    if (count > 1) process.exit(signal === "SIGINT" ? EXIT_CANCELLED : 143);
    out.note(
      `${signal === "SIGINT" ? "Ctrl-C" : signal}: stopping cleanly, progress is kept (Ctrl-C again to leave at once)`,
    );
    stop();
  };
  process.on("SIGINT", handler);
  process.on("SIGTERM", handler);
  return () => {
    process.off("SIGINT", handler);
    process.off("SIGTERM", handler);
  };
}

/** Runs a job here, on a disk at rest. */
export async function runAtRest(
  kind: JobKind,
  disk: string,
  flags: CopyFlags,
  body: (job: Job) => Promise<string>,
): Promise<number> {
  const out = new ProgressOutput(chooseMode(flags));
  const job = new Job(kind, disk);
  job.on("progress", (s: JobStatus) => out.update(s));
  job.on("state", (s: JobStatus) => {
    if (s.state === "paused" || s.state === "running") out.update(s, "state");
  });
  const release = onInterrupt(out, () => job.cancel());
  try {
    const status = await job.start(body);
    out.finish(status);
    return finishCode(status);
  } finally {
    release();
  }
}

/**
 * When a daemon serves this disk, asks it to run the job and follows it
 * (Ctrl-C cancels it there, unless --detach). Returns null when the disk is not mounted.
 */
export async function runLiveIfMounted(
  kind: JobKind,
  disk: string,
  flags: CopyFlags,
  options: LiveJobRequest,
): Promise<number | null> {
  const daemon = await findDaemon(disk);
  if (!daemon) return null;
  const { client } = daemon;
  const trust = trustFromFlags(flags);
  const wanted = trust.confine;
  const askedUrls = (flags.allowUrl ?? []).length + (flags.urlAuth ?? []).length > 0;
  if (askedUrls && !urlRulesCover(daemon.hello.urls ?? NO_URL_RULES, trust.urls)) {
    throw new AddCowError(
      `${disk} is mounted (daemon pid ${daemon.hello.pid}) with wider URL rules (-o allow_url=, url_auth=) than asked for, and a live job runs under the mount's rules; remount it with the same rules, or run the job without --allow-url and --url-auth`,
      { file: disk, reason: "forbidden" },
    );
  }
  if (wanted && !confinementCovers(daemon.hello.confine ?? null, wanted)) {
    // The job would run under the mount's rules, which are looser than asked for.
    throw new AddCowError(
      `${disk} is mounted (daemon pid ${daemon.hello.pid}) ${daemon.hello.confine ? "with a wider confinement than asked for" : "without -o confine"}, and a live job runs under the mount's rules; remount it with -o confine (and the same allow_dir=), or run the job without --confine`,
      { file: disk, reason: "forbidden" },
    );
  }
  const started = await client.call<{ ok: true; job: JobStatus }>({
    op: "start",
    kind,
    disk: path.resolve(disk),
    options,
  });
  const id = started.job.id;
  const mode = chooseMode(flags);
  if (flags.detach) {
    if (mode === "json")
      process.stdout.write(JSON.stringify({ event: "started", ...started.job }) + "\n");
    else if (mode !== "quiet")
      process.stdout.write(
        `started job ${id} in the daemon serving ${disk} (pid ${daemon.hello.pid}); follow it with 'addcow jobs'\n`,
      );
    return 0;
  }
  const out = new ProgressOutput(mode);
  if (mode !== "json" && mode !== "quiet") {
    process.stderr.write(`${disk} is mounted: job ${id} runs in daemon pid ${daemon.hello.pid}\n`);
  }
  const release = onInterrupt(out, () => {
    void client.request({ op: "cancel", id }).catch(() => undefined);
  });
  try {
    const status = await client.watch(id, (e) => {
      if (e.event === "progress") out.update(e.job);
      else if (e.event === "state" && (e.job.state === "paused" || e.job.state === "running")) {
        out.update(e.job, "state");
      }
    });
    out.finish(status);
    return finishCode(status);
  } finally {
    release();
  }
}

export function wireOptions(opts: CopyOptions): LiveJobRequest {
  const w: LiveJobRequest = {};
  if (opts.inFlight !== undefined) w.inFlight = opts.inFlight;
  if (opts.bufSize !== undefined) w.bufSize = opts.bufSize;
  if (opts.granularity !== undefined) w.granularity = opts.granularity;
  if (opts.speed !== undefined) w.speed = opts.speed;
  return w;
}

export { DEFAULT_BUF_SIZE };
