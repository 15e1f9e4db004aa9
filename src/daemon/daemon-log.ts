import * as fs from "node:fs";
import { type ChildProcess, spawn } from "node:child_process";
import { AddCowError, describeError } from "../util/errors";
import { log } from "../util/log";
import { O_PATH, type WalkedParent, walkParent } from "../os/path-walk";

/**
 * Where a daemon's warnings and errors go besides stderr: syslog (through
 * logger(1) to /dev/log, or to another socket), a file, or nowhere else.
 */
export type LogDestination =
  { kind: "syslog"; socket?: string } | { kind: "file"; path: string } | { kind: "stderr" };

export type LogLevel = "warning" | "err";

/** How long stop waits for logger(1) to hand over the last messages. */
const DRAIN_MS = 3000;

/** The user the daemon runs as: a log file must be its own. */
const RUNNER = process.geteuid?.() ?? 0;

function refused(file: string, why: string): AddCowError {
  return new AddCowError(
    `log file ${file} is refused: ${why}; give -o log= a file of the daemon's user (uid ${RUNNER}) in its own directory`,
    { file, code: "EACCES", reason: "forbidden" },
  );
}

/**
 * Opens a log file for appending, or creates it (mode 0600). Whoever else can
 * change the way to it could point it at a file of the daemon's user (root)
 * and have lines appended there: every directory and link on the way must be
 * the daemon user's (os/path-walk.ts), the name is never followed as a link
 * (O_NOFOLLOW), and an existing file must be a regular file of the daemon's
 * user with no other hard link. Opened by O_PATH first, so a FIFO or a device
 * is never opened for writing (nothing waits, nothing sees an open).
 */
export function openLogFile(file: string): number {
  let place: WalkedParent;
  try {
    place = walkParent(file);
  } catch (err) {
    throw refused(file, describeError(err));
  }
  try {
    const foreign = place.controllers[0];
    if (foreign)
      throw refused(file, `${foreign.what} on the way to it belongs to uid ${foreign.uid}`);
    const at = `${place.dir.proc}/${place.base}`;
    const { O_WRONLY, O_APPEND, O_CREAT, O_EXCL, O_NOFOLLOW } = fs.constants;
    try {
      return fs.openSync(at, O_WRONLY | O_APPEND | O_CREAT | O_EXCL | O_NOFOLLOW, 0o600);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw refused(file, describeError(err));
    }
    const pathFd = fs.openSync(at, O_PATH | O_NOFOLLOW);
    try {
      const st = fs.fstatSync(pathFd);
      if (st.isSymbolicLink()) throw refused(file, "it is a symbolic link");
      if (!st.isFile()) throw refused(file, "it is not a regular file");
      if (st.uid !== RUNNER) throw refused(file, `it belongs to uid ${st.uid}`);
      if (st.nlink !== 1) throw refused(file, `it has ${st.nlink} hard links`);
      return fs.openSync(`/proc/self/fd/${pathFd}`, O_WRONLY | O_APPEND);
    } finally {
      fs.closeSync(pathFd);
    }
  } finally {
    place.close();
  }
}

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

  /** Throws, in one line, when a log file cannot be used (see openLogFile). */
  constructor(
    private readonly program: string,
    private readonly destination: LogDestination,
    private readonly stderr: (line: string) => void = (line) => process.stderr.write(line),
  ) {
    if (destination.kind === "file") fs.closeSync(openLogFile(destination.path));
  }

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
      // Opened again for every line, with every check: a rotated log file is followed.
      try {
        const fd = openLogFile(d.path);
        try {
          fs.writeSync(fd, line);
        } finally {
          fs.closeSync(fd);
        }
      } catch (err) {
        this.stderr(`${this.program}: cannot write to log file ${d.path}: ${describeError(err)}\n`);
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
