#!/usr/bin/env node
import * as path from "node:path";
import { Command, Option } from "commander";
import type { FileOpener } from "../block/file-io";
import { CHILD_FLAG, startInBackground, tellParent } from "../daemon/background";
import type { DiskSpec, MountDaemon } from "../daemon/daemon";
import { DaemonLog } from "../daemon/daemon-log";
import { diskFileName } from "../os/mount-table";
import { AddCowError } from "../util/errors";
import {
  KNOWN_OPTIONS,
  type MountOptions,
  checkHostName,
  parseMountOptions,
} from "../daemon/mount-options";
import { enableTracing, log } from "../util/log";
import { errorLine, packageVersion, runCli } from "./run-cli";

const PROGRAM = "addcow-mount";

interface CliOptions {
  options: string[];
  foreground?: boolean;
  debug?: boolean;
  name?: string;
  serve?: string;
  daemonChild?: boolean;
}

function collect(value: string, previous: string[]): string[] {
  return [...previous, value];
}

export interface MountProgramDeps {
  /** How the daemon opens files (a test launcher passes a fault-injecting opener). */
  opener?: FileOpener;
}

export function buildProgram(deps: MountProgramDeps = {}): Command {
  return new Command(PROGRAM)
    .version(packageVersion(), "-V, --version", "print the version and exit")
    .helpOption("-h, --help", "show help")
    .usage("[options] FILE.add-cow [FILE2.add-cow ...] MOUNTDIR\n       addcow-mount --serve NAME")
    .description(
      "Presents add-cow disks as flat files: MOUNTDIR/NAME is the virtual disk of NAME.add-cow.\n" +
        "Goes to the background once the files are ready; stop with fusermount -u MOUNTDIR.\n" +
        "--serve NAME starts a host daemon that serves many mounts (-o host=NAME attaches one).",
    )
    .argument("[paths...]", "one or more .add-cow files, then the mount directory")
    .option("-o, --options <list>", `comma-separated mount options: ${KNOWN_OPTIONS}`, collect, [])
    .option("-f, --foreground", "stay in the foreground (stop with Ctrl-C or SIGTERM)")
    .option("-d, --debug", "foreground, tracing every request on stderr (same as -o debug)")
    .option(
      "--name <name>",
      "file name inside MOUNTDIR (one disk only; default FILE without .add-cow)",
    )
    .option(
      "--serve <name>",
      "start host daemon NAME: no disks yet; each addcow-mount -o host=NAME FILE DIR adds a mount to it",
    )
    .addOption(new Option(CHILD_FLAG).hideHelp())
    .action((paths: string[], opts: CliOptions) => mountAction(paths, opts, deps));
}

async function mountAction(
  paths: string[],
  opts: CliOptions,
  deps: MountProgramDeps,
): Promise<void> {
  const options = parseMountOptions(opts.options);
  if (opts.serve !== undefined) return serveAction(paths, opts, options, deps);
  if (paths.length < 2) {
    throw new AddCowError(
      "give at least one FILE.add-cow and a MOUNTDIR, e.g. addcow-mount disk.add-cow /mnt/disk",
    );
  }
  const files = paths.slice(0, -1);
  const mountDir = path.resolve(paths[paths.length - 1]!);
  if (opts.name !== undefined && files.length > 1) {
    throw new AddCowError(`--name applies to a single disk; ${files.length} disks were given`);
  }
  if (options.host !== undefined && !opts.daemonChild) {
    if (opts.foreground || opts.debug || options.debug) {
      throw new AddCowError(
        `-f, -d and -o debug are for a daemon of its own: with -o host=${options.host} the disk is served by host daemon ${options.host}; start that one with -f or -d to watch it`,
      );
    }
    // A host daemon that runs already: one request, no daemon of our own to start.
    const { attachToHost } = require("./mount-host") as typeof import("./mount-host");
    await attachToHost(options.host, files, mountDir, opts.options, opts.name);
    return;
  }
  if (opts.debug || options.debug) {
    // Like sshfs -d: stay in the foreground and say what happens.
    opts.foreground = true;
    enableTracing();
  }
  const disks: DiskSpec[] = files.map((f) => ({
    file: path.resolve(f),
    name: opts.name ?? diskFileName(f),
  }));

  if (!opts.foreground && !opts.daemonChild) {
    // The child gets absolute paths: it leaves the working directory once mounted.
    const childArgs = [
      ...opts.options.flatMap((o) => ["-o", o]),
      ...(opts.name !== undefined ? ["--name", opts.name] : []),
      ...disks.map((d) => d.file),
      mountDir,
    ];
    process.exitCode = await startInBackground(process.argv[1]!, childArgs, PROGRAM);
    return;
  }

  const foreground = !opts.daemonChild;
  // The daemon's code (FUSE, the chain, the control socket) is loaded only here:
  // the process that starts the background daemon and waits for it never needs it.
  const { MountDaemon: Daemon } = require("../daemon/daemon") as typeof import("../daemon/daemon");
  const { startControlService } =
    require("../control/server") as typeof import("../control/server");
  let reporter!: DaemonLog;
  let daemon: MountDaemon;
  try {
    // A log file is judged as it is opened (docs/security.md): a refusal fails the start.
    reporter = daemonReporter(options, foreground);
    daemon = await Daemon.start({
      disks,
      mountDir,
      options,
      reporter,
      services: [startControlService],
      ...(deps.opener ? { opener: deps.opener } : {}),
    });
  } catch (err) {
    return startFailed(err, foreground);
  }
  await runDaemon(
    reporter,
    foreground,
    (reason) => daemon.stop(reason),
    () => daemon.stopped,
  );
}

/** `addcow-mount --serve NAME`: a host daemon, with no disks until attached. */
async function serveAction(
  paths: string[],
  opts: CliOptions,
  options: MountOptions,
  deps: MountProgramDeps,
): Promise<void> {
  const name = checkHostName(opts.serve!);
  if (paths.length > 0 || opts.name !== undefined) {
    throw new AddCowError(
      `--serve ${name} starts a host daemon without disks: attach them afterwards with addcow-mount -o host=${name} FILE.add-cow MOUNTDIR`,
    );
  }
  const perDisk = opts.options
    .flatMap((o) => o.split(","))
    .filter((o) => o !== "" && !/^(log=|debug$)/.test(o));
  if (perDisk.length > 0) {
    throw new AddCowError(
      `-o ${perDisk.join(",")}: a host daemon takes only -o log= and -o debug; mount options belong to each disk (addcow-mount -o host=${name},OPTIONS FILE.add-cow MOUNTDIR)`,
    );
  }
  if (opts.debug || options.debug) {
    opts.foreground = true;
    enableTracing();
  }
  if (!opts.foreground && !opts.daemonChild) {
    const childArgs = [...opts.options.flatMap((o) => ["-o", o]), "--serve", name];
    process.exitCode = await startInBackground(process.argv[1]!, childArgs, PROGRAM);
    return;
  }
  const foreground = !opts.daemonChild;
  const { serveHost } = require("./mount-host") as typeof import("./mount-host");
  let reporter!: DaemonLog;
  let served: Awaited<ReturnType<typeof serveHost>>;
  try {
    reporter = daemonReporter(options, foreground);
    served = await serveHost(name, PROGRAM, reporter, deps.opener);
  } catch (err) {
    return startFailed(err, foreground);
  }
  await runDaemon(
    reporter,
    foreground,
    (reason) => served.stop(reason),
    async () => {
      const code = await served.stopped;
      await served.stop("stopped");
      return code;
    },
  );
}

/** A background daemon has no terminal: its problems go to syslog unless -o log= says otherwise. */
function daemonReporter(options: MountOptions, foreground: boolean): DaemonLog {
  return new DaemonLog(
    PROGRAM,
    options.log ?? (foreground ? { kind: "stderr" } : { kind: "syslog" }),
  );
}

async function startFailed(err: unknown, foreground: boolean): Promise<void> {
  if (!foreground) {
    await tellParent({ type: "error", message: errorLine(err) });
    process.exit(1);
  }
  throw err;
}

/** Signals, the crash guard, the ready message; then waits for the daemon to stop and exits. */
async function runDaemon(
  reporter: DaemonLog,
  foreground: boolean,
  stopDaemon: (reason: string) => Promise<void>,
  stopped: () => Promise<number>,
): Promise<void> {
  const stop = (sig: string) => void stopDaemon(`received ${sig}`);
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  if (foreground) process.on("SIGHUP", () => stop("SIGHUP"));
  else process.on("SIGHUP", () => undefined);
  // A bug must not leave a dead mount behind: flush what can be flushed, unmount, exit 1.
  const crash = (what: string, err: unknown) => {
    reporter.error(`internal error (${what}): ${errorLine(err)}`);
    if (err instanceof Error && err.stack) log.daemon("%s", err.stack);
    void stopDaemon(`internal error: ${errorLine(err)}`)
      .then(() => reporter.drain())
      .finally(() => process.exit(1));
  };
  process.on("uncaughtException", (err) => crash("exception", err));
  process.on("unhandledRejection", (err) => crash("rejection", err));
  if (!foreground) {
    await tellParent({ type: "ready" });
    // Do not keep the directory we were started from busy.
    process.chdir("/");
  }
  const code = await stopped();
  await reporter.drain();
  process.exit(code);
}

if (require.main === module) {
  void runCli(buildProgram());
}
