import type { BenchSuite } from "./suite";
import { fioSuite } from "./fio-bench";
import { sparseSuite } from "./sparse-bench";
import { jobsSuite } from "./jobs-bench";
import { remoteSuite } from "./remote-bench";
import { verifySuite } from "./verify-bench";
import { qcow2Suite } from "./qcow2-bench";
import { densitySuite } from "./density-bench";

/** Every benchmark suite, in run order. Add one import and one entry per new suite. */
export const suites: BenchSuite[] = [
  fioSuite,
  sparseSuite,
  jobsSuite,
  qcow2Suite,
  remoteSuite,
  verifySuite,
  densitySuite,
];
