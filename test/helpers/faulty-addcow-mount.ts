#!/usr/bin/env node
/**
 * TEST LAUNCHER: addcow-mount whose daemon opens its files through a fault
 * injector (built: dist/test/helpers/faulty-addcow-mount.js; the name ends like
 * the real program's so the helpers that find daemons by command line find it).
 * The rules live in the JSON file named by ADDCOW_TEST_FAULTS (an array of
 * FaultRule); the daemon re-reads it before every I/O, and a changed file
 * replaces the armed rules, so a test arms and clears faults in the running
 * daemon by rewriting that file. Shipped code has no such hook: the opener is
 * handed to the program the way any caller of buildProgram can.
 */
import * as fs from "node:fs";
import { type FileOpener, openPosixFile } from "../../src/block/file-io";
import { buildProgram } from "../../src/cli/addcow-mount";
import { runCli } from "../../src/cli/run-cli";
import { FaultInjector, type FaultRule } from "./fault-io";

function faultyOpener(inner: FileOpener): FileOpener {
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

void runCli(buildProgram({ opener: faultyOpener(openPosixFile) }));
