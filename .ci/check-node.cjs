// Exits 0 when the Node.js running this file is one addcow supports (the
// package's "engines" range, ">=MAJOR.MINOR"), else says so on stderr and
// exits 1. Kept to old JavaScript: it must run on an old node to say "too old".
//   node .ci/check-node.cjs [--report]   # --report: one line on success too
"use strict";
const range = require("../package.json").engines.node;
const want = /^>=(\d+)\.(\d+)$/.exec(range);
if (!want) {
  process.stderr.write("check-node: engines.node must read >=MAJOR.MINOR, not " + range + "\n");
  process.exit(1);
}
const have = process.versions.node.split(".").map(Number);
const ok = have[0] > +want[1] || (have[0] === +want[1] && have[1] >= +want[2]);
const which = "Node.js " + process.version + " (" + process.execPath + ")";
if (!ok) {
  process.stderr.write(
    "node is " +
      which +
      "; addcow needs " +
      range +
      ": bash .ci/setup (or .ci/install-node, then npm ci) installs Node.js 24 beside it\n",
  );
  process.exit(1);
}
if (process.argv[2] === "--report") process.stdout.write("addcow runs on " + which + "\n");
