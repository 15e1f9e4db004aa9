import * as fs from "node:fs";
import { type ChildProcess, spawn } from "node:child_process";
import { log } from "../util/log";

/**
 * Where a daemon's warnings and errors go besides stderr: syslog (through
 * logger(1) to /dev/log, or to another socket), a file, or nowhere else.
 */
export type LogDestination =
  { kind: "syslog"; socket?: string } | { kind: "file"; path: string } | { kind: "stderr" };

export type LogLevel = "warning" | "err";

/** How long stop waits for logger(1) to hand over the last messages. */
const DRAIN_MS = 3000;

/**
 * A daemon's messages for people: warnings and errors, one line each. They
 * always go to stderr (the terminal with -f; ADDCOW_MOUNT_LOG or nowhere in
 * the background), and to the chosen destination: syslog by default in the
 * background, so a detached daemon's problems show up in the journal or
 * /var/log/syslog as those of other FUSE daemons (sshfs) do. Syslog is
 * reached through logger(1) (util-linux; bsdutils on Debian, always there):
 * it knows the local syslog protocols (journald's /dev/log, rsyslog, a
 * container's socket) and Node has no unix datagram sockets of its own.
 */
export class DaemonLog {
  private readonly pending = new Set<ChildProcess>();
  private loggerMissing = false;

  constructor(
    private readonly program: string,
    private readonly destination: LogDestination,
    private readonly stderr: (line: string) => void = (line) => process.stderr.write(line),
  ) {}

  warn(message: string): void {
    this.emit("warning", message);
  }

  error(message: string): void {
    this.emit("err", message);
  }

  private emit(level: LogLevel, message: string): void {
    const text = message.replace(/\s*\n\s*/g, " ");
    log.daemon("%s: %s", level, text);
    this.stderr(`${this.program}: ${text}\n`);
    const d = this.destination;
    if (d.kind === "file") {
      const line = `${new Date().toISOString()} ${this.program}[${process.pid}]: ${level}: ${text}\n`;
      try {
        fs.appendFileSync(d.path, line);
      } catch (err) {
        this.stderr(`${this.program}: cannot write to log file ${d.path}: ${String(err)}\n`);
      }
    } else if (d.kind === "syslog" && !this.loggerMissing) {
      this.syslog(level, text, d.socket);
    }
  }

  private syslog(level: LogLevel, text: string, socket: string | undefined): void {
    const args = [`--id=${process.pid}`, "-t", this.program, "-p", `daemon.${level}`];
    if (socket !== undefined) args.push("-u", socket);
    const child = spawn("logger", [...args, "--", text], { stdio: "ignore" });
    this.pending.add(child);
    const done = () => this.pending.delete(child);
    child.on("exit", done);
    child.on("error", (err: NodeJS.ErrnoException) => {
      done();
      if (err.code === "ENOENT") {
        this.loggerMissing = true;
        this.stderr(`${this.program}: logger(1) is missing: messages go to stderr only\n`);
      }
    });
  }

  /** Waits (a few seconds at most) until every message has been handed to syslog. */
  async drain(): Promise<void> {
    const end = Date.now() + DRAIN_MS;
    while (this.pending.size > 0 && Date.now() < end) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }
}
