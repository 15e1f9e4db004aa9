import { type ChildProcess, spawn } from "node:child_process";
import { log } from "../util/log";

/** What the kernel said when a file was looked up and checked as another user. */
export type ProbeAnswer =
  { ok: true; dev: bigint; ino: bigint; regular: boolean } | { ok: false; code: string };

/**
 * The group a uid without an account is judged with: 65534 (nogroup, the
 * kernel's overflow gid), which owns nothing. Never the group of a file the
 * user made: a setgid directory can give a file any group (docs/security.md).
 */
export const NO_ACCOUNT_GID = 65534;

/**
 * How long one question may wait for its answer, spawn included. The helper
 * runs as the user it judges, who can stop it (SIGSTOP) or slow it down; past
 * this the helper is killed and the open refused. ADDCOW_ACCESS_TIMEOUT
 * (seconds, in the environment of the user running addcow) changes it.
 */
export function accessDeadlineMs(env: NodeJS.ProcessEnv = process.env): number {
  const s = Number(env.ADDCOW_ACCESS_TIMEOUT);
  return Number.isFinite(s) && s > 0 && s <= 600 ? Math.round(s * 1000) : 5000;
}

/**
 * The child's program. It starts as root, takes on the identity of `uid`
 * (its primary group and supplementary groups from the account database,
 * exactly as a login would; without an account: group NO_ACCOUNT_GID and no
 * supplementary groups), drops root for good, and then answers one JSON
 * line per question: it looks the name up (O_PATH: nothing is opened for I/O,
 * no FIFO blocks, no device sees an open) and asks access(2) on that very
 * inode through /proc/self/fd. Mode bits, ACLs, groups, read-only mounts and
 * immutable files are all the kernel's business: nothing is emulated here.
 * Changing its ids makes the kernel mark it non-dumpable, so the user it
 * becomes cannot ptrace it or reach its descriptors, only signal it (the
 * deadline covers that).
 */
const PROBE_PROGRAM = `
"use strict";
const fs = require("fs");
const os = require("os");
const uid = Number(process.argv[1]);
let gid = Number(process.argv[2]);
let name = null;
try {
  process.seteuid(uid);
  const me = os.userInfo();
  name = me.username;
  gid = me.gid;
} catch {
  // No account for uid: keep the fixed group.
} finally {
  process.seteuid(0);
}
try {
  if (name === null) process.setgroups([]);
  else process.initgroups(name, gid);
  process.setgid(gid);
  process.setuid(uid);
  if (process.getuid() !== uid || process.geteuid() !== uid || process.getegid() !== gid) {
    throw new Error("the ids did not change");
  }
} catch (err) {
  process.stderr.write("cannot become uid " + uid + ": " + (err && err.message) + "\\n");
  process.exit(2);
}
const O_PATH = 0o10000000;
function answer(q) {
  let fd = -1;
  let reply;
  try {
    fd = fs.openSync(q.file, O_PATH);
    const st = fs.fstatSync(fd, { bigint: true });
    if (st.isFile()) {
      const want = q.access === "write" ? fs.constants.R_OK | fs.constants.W_OK : fs.constants.R_OK;
      fs.accessSync("/proc/self/fd/" + fd, want);
    }
    reply = { ok: true, dev: String(st.dev), ino: String(st.ino), regular: st.isFile() };
  } catch (err) {
    reply = { ok: false, code: (err && err.code) || "EIO" };
  } finally {
    if (fd >= 0) fs.closeSync(fd);
  }
  process.stdout.write(JSON.stringify(reply) + "\\n");
}
let pending = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  pending += chunk;
  for (let nl = pending.indexOf("\\n"); nl >= 0; nl = pending.indexOf("\\n")) {
    const line = pending.slice(0, nl);
    pending = pending.slice(nl + 1);
    answer(JSON.parse(line));
  }
});
`;

interface Waiter {
  resolve(answer: ProbeAnswer): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

/**
 * A short-lived child process that runs as another user (only root can start
 * one) and tells whether that user could open a file: the kernel's own
 * verdict, with the device and inode it judged so the caller can make sure it
 * opens that same file. One child serves every question of one open; a
 * question unanswered within the deadline kills it and fails.
 */
export class AccessProbe {
  private readonly child: ChildProcess;
  private readonly waiting: Waiter[] = [];
  private received = "";
  private stderr = "";
  private failure: Error | null = null;

  constructor(
    readonly uid: number,
    private readonly deadlineMs = accessDeadlineMs(),
  ) {
    this.child = spawn(
      process.execPath,
      ["-e", PROBE_PROGRAM, String(uid), String(NO_ACCOUNT_GID)],
      {
        stdio: ["pipe", "pipe", "pipe"],
        // Nothing of ours leaks in; names are absolute, so the working directory does not matter.
        env: {},
        cwd: "/",
      },
    );
    log.open("access probe for uid %d: pid %d", uid, this.child.pid);
    this.child.stdout!.setEncoding("utf8");
    this.child.stdout!.on("data", (chunk: string) => this.onData(chunk));
    this.child.stderr!.setEncoding("utf8");
    this.child.stderr!.on("data", (chunk: string) => (this.stderr += chunk));
    this.child.on("error", (err) => this.fail(err));
    this.child.on("exit", (code, signal) => {
      const last = this.stderr.trim().split("\n").pop() ?? "";
      const how = signal ?? `code ${code}`;
      this.fail(new Error(`the helper process exited (${how})${last ? `: ${last}` : ""}`));
    });
    // A broken pipe is reported by the exit above.
    this.child.stdin!.on("error", () => undefined);
  }

  /** Asks whether uid could open file for reading (or reading and writing). */
  ask(file: string, access: "read" | "write"): Promise<ProbeAnswer> {
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<ProbeAnswer>((resolve, reject) => {
      const timer = setTimeout(() => {
        const s = this.deadlineMs / 1000;
        this.fail(
          new Error(
            `the helper process running as uid ${this.uid} did not answer within ${s} s (that user can stop it)`,
          ),
        );
        this.close();
      }, this.deadlineMs);
      this.waiting.push({ resolve, reject, timer });
      this.child.stdin!.write(JSON.stringify({ file, access }) + "\n");
    });
  }

  close(): void {
    this.failure ??= new Error("closed");
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
  }

  private onData(chunk: string): void {
    this.received += chunk;
    for (let nl = this.received.indexOf("\n"); nl >= 0; nl = this.received.indexOf("\n")) {
      const line = this.received.slice(0, nl);
      this.received = this.received.slice(nl + 1);
      const reply = JSON.parse(line) as
        { ok: true; dev: string; ino: string; regular: boolean } | { ok: false; code: string };
      const waiter = this.waiting.shift();
      if (!waiter) continue;
      clearTimeout(waiter.timer);
      waiter.resolve(
        reply.ok ? { ...reply, dev: BigInt(reply.dev), ino: BigInt(reply.ino) } : reply,
      );
    }
  }

  private fail(err: Error): void {
    this.failure ??= err;
    for (const w of this.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(this.failure);
    }
  }
}
