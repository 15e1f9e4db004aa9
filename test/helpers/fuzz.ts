/** Shared by the fuzz tests: hang detection per operation and heap growth over a run. */
import * as v8 from "node:v8";
import * as vm from "node:vm";

/** An operation that takes longer than this is a hang. */
export const CASE_TIMEOUT_MS = 5_000;

/** Rejects with "hang: ..." when p does not settle in time. */
export function withTimeout<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`hang: ${what} took over ${CASE_TIMEOUT_MS} ms`)),
      CASE_TIMEOUT_MS,
    );
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

v8.setFlagsFromString("--expose-gc");
const gc = vm.runInNewContext("gc") as () => void;

/** Runs fn between two full collections; returns how many heap bytes stayed behind. */
export async function heapGrowth(fn: () => Promise<void>): Promise<number> {
  gc();
  const before = process.memoryUsage().heapUsed;
  await fn();
  gc();
  return process.memoryUsage().heapUsed - before;
}
