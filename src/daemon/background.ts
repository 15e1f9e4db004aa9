import * as fs from "node:fs";
import { spawn } from "node:child_process";
import { log } from "../util/log";

/** Added to the arguments of the background child; not for users. */
export const CHILD_FLAG = "--daemon-child";

/** Set to a file name to keep the background daemon's stderr (DEBUG traces, warnings). */
export const LOG_ENV = "ADDCOW_MOUNT_LOG";

type ChildMessage = { type: "ready" } | { type: "error"; message: string };

/**
 * Starts the same command again as a detached child (new session, no
 * terminal, stdio closed) and waits until it says the mount is ready or why
 * it failed. Resolves to this process's exit code.
 */
export function startInBackground(
  script: string,
  args: string[],
  program: string,
): Promise<number> {
  const logFile = process.env[LOG_ENV];
  const out = logFile ? fs.openSync(logFile, "a") : "ignore";
  const child = spawn(process.execPath, [...process.execArgv, script, ...args, CHILD_FLAG], {
    detached: true,
    stdio: ["ignore", out, out, "ipc"],
  });
  if (typeof out === "number") fs.closeSync(out);
  log.daemon("started background daemon pid %d", child.pid);
  return new Promise<number>((resolve) => {
    let settled = false;
    const finish = (code: number) => {
      if (settled) return;
      settled = true;
      child.removeAllListeners();
      if (child.connected) child.disconnect();
      child.unref();
      resolve(code);
    };
    child.on("message", (msg: ChildMessage) => {
      if (msg.type === "ready") {
        finish(0);
      } else {
        process.stderr.write(`${program}: ${msg.message}\n`);
        finish(1);
      }
    });
    child.on("error", (err) => {
      process.stderr.write(`${program}: cannot start the background daemon: ${err.message}\n`);
      finish(1);
    });
    child.on("exit", (code, signal) => {
      const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
      process.stderr.write(
        `${program}: the background daemon ${how} before the mount was ready (run with -f to see why)\n`,
      );
      finish(1);
    });
  });
}

/** In the background child: tells the waiting parent how the start went. */
export function tellParent(msg: ChildMessage): Promise<void> {
  return new Promise<void>((resolve) => {
    if (!process.send || !process.connected) return resolve();
    process.send(msg, undefined, {}, () => {
      if (process.connected) process.disconnect();
      resolve();
    });
  });
}
