/**
 * Loaded by the mount daemon when ADDCOW_TEST_FILE_OPENER points at this file
 * (built: dist/test/helpers/fault-opener-module.js). The rules live in the JSON
 * file named by ADDCOW_TEST_FAULTS (an array of FaultRule); the daemon re-reads
 * it before every I/O, and a changed file replaces the armed rules, so a test
 * arms and clears faults in the running daemon by rewriting that file.
 */
import * as fs from "node:fs";
import type { FileOpener } from "../../src/block/file-io";
import { FaultInjector, type FaultRule } from "./fault-io";

export function wrapOpener(inner: FileOpener): FileOpener {
  const control = process.env.ADDCOW_TEST_FAULTS;
  const faults = new FaultInjector();
  let current = "";
  faults.beforeCheck = () => {
    if (!control) return;
    let text = "[]";
    try {
      text = fs.readFileSync(control, "utf8");
    } catch {
      // No file: no faults.
    }
    if (text === current) return;
    let rules: FaultRule[];
    try {
      rules = JSON.parse(text || "[]") as FaultRule[];
    } catch {
      return; // Caught half written: keep the old rules until the next operation.
    }
    current = text;
    faults.clear();
    for (const rule of rules) faults.arm(rule);
  };
  return faults.opener(inner);
}
