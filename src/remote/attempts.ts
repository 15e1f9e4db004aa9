import { log } from "../util/log";
import { RemoteFailure, networkFailure } from "./source";

export interface AttemptOptions {
  /** Attempts after the first for timeouts, 5xx answers and dropped connections. */
  retries: number;
  /** One attempt gives up after this long. */
  timeoutMs: number;
}

/** The pause before attempt `attempt + 1`, at most (the real one is 50-100% of it). */
function pauseCap(attempt: number): number {
  return Math.min(5000, 100 * 2 ** attempt);
}

/**
 * The longest a read waits for the server, from when it arrives, whether its
 * request was queued or not: every attempt's timeout plus the pauses between
 * them. (retries 1, timeout 2 s: 4.1 s; the defaults, 4 and 30 s: 151.5 s.)
 */
export function waitBoundMs(opts: AttemptOptions): number {
  let pauses = 0;
  for (let a = 0; a < opts.retries; a++) pauses += pauseCap(a);
  return (opts.retries + 1) * opts.timeoutMs + pauses;
}

/** The failure of a request whose time ran out before it could be (re)sent. */
export function outOfTime(name: string, opts: AttemptOptions, retryable = false): RemoteFailure {
  return new RemoteFailure(
    `${name}: no answer within the timeout (${opts.timeoutMs / 1000} s per attempt, ${(waitBoundMs(opts) / 1000).toFixed(1)} s for a read, queued or not)`,
    retryable,
  );
}

/** Counters the attempts keep up to date. */
export interface AttemptStats {
  requests: number;
  retries: number;
}

/**
 * Runs one request with a timeout per attempt, trying again with growing
 * pauses after failures that may pass (timeouts, 5xx, dropped connections),
 * never past `deadline` (ms since the epoch): the last attempt gets only the
 * time that is left, and no pause outlives it.
 */
export async function attempts<T>(
  opts: AttemptOptions,
  name: string,
  stats: AttemptStats | null,
  deadline: number,
  fn: (signal: AbortSignal) => Promise<T>,
): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    const left = deadline - Date.now();
    if (left <= 0) throw outOfTime(name, opts);
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), Math.min(opts.timeoutMs, left));
    let failure: RemoteFailure;
    try {
      if (stats) stats.requests++;
      return await fn(controller.signal);
    } catch (err) {
      failure = networkFailure(err, name, controller.signal);
      // Every way of running out of time says the same (one line in the log, not three).
      if (controller.signal.aborted) failure = outOfTime(name, opts, true);
    } finally {
      clearTimeout(timer);
    }
    if (!failure.retryable || attempt >= opts.retries) throw failure;
    const pause = pauseCap(attempt) * (0.5 + Math.random() / 2);
    if (Date.now() + pause >= deadline) throw failure;
    if (stats) stats.retries++;
    log.remote("%s; attempt %d failed, trying again in %d ms", failure.message, attempt + 1, pause);
    await new Promise((resolve) => setTimeout(resolve, pause));
  }
}
