/**
 * What every benchmark suite gets and gives back. A suite is one module in
 * test/bench/ registered with one line in suites.ts; run.ts runs them in order.
 */

/** One row/column filter, from `--only a,b,c`. */
export interface Selection {
  /** True when `name` (in the given category) passes the `--only` filter. */
  has(category: "suite" | "system" | "workload", name: string): boolean;
  /** True when `name` was given in `--only` itself (for opt-in rows). */
  named(name: string): boolean;
}

export interface BenchContext {
  /** Seconds per timed run (`--time`). */
  time: number;
  /** Runs per measurement; results are medians (`--repeat`). */
  repeat: number;
  only: Selection;
  /** A private scratch directory (removed at the end). */
  workDir: string;
  /** Registers an undo step run at the end, on failure and on Ctrl-C (newest first). */
  defer(what: string, undo: () => Promise<void> | void): () => Promise<void>;
  /** Progress line on stderr. */
  log(msg: string): void;
  /** Throws when the user pressed Ctrl-C, so long loops stop early. */
  checkInterrupted(): void;
}

export interface SuiteReport {
  /** Markdown section (heading + table + notes), printed and put into BENCHMARKS.md. */
  markdown: string;
  /** Everything measured, for the JSON file. */
  data: unknown;
}

export interface BenchSuite {
  /** Short name used by `--only` and as the JSON key. */
  name: string;
  description: string;
  run(ctx: BenchContext): Promise<SuiteReport>;
}
