#!/usr/bin/env node
import * as path from "node:path";
import { Command, Option } from "commander";
import type { FileOpener } from "../block/file-io";
import { startControlService } from "../control/server";
import { CHILD_FLAG, startInBackground, tellParent } from "../daemon/background";
import { type DiskSpec, MountDaemon } from "../daemon/daemon";
import { DaemonLog } from "../daemon/daemon-log";
import { diskFileName } from "../os/mount-table";
import { AddCowError } from "../util/errors";
import { KNOWN_OPTIONS, parseMountOptions } from "../daemon/mount-options";
import { enableTracing, log } from "../util/log";
import { errorLine, packageVersion, runCli } from "./run-cli";

const PROGRAM = "addcow-mount";

interface CliOptions {
  options: string[];
  foreground?: boolean;
  debug?: boolean;
  name?: string;
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
    .usage("[options] FILE.add-cow [FILE2.add-cow ...] MOUNTDIR")
    .description(
      "Presents add-cow disks as flat files: MOUNTDIR/NAME is the virtual disk of NAME.add-cow.\n" +
        "Goes to the background once the files are ready; stop with fusermount -u MOUNTDIR.",
    )
    .argument("<paths...>", "one or more .add-cow files, then the mount directory")
    .option("-o, --options <list>", `comma-separated mount options: ${KNOWN_OPTIONS}`, collect, [])
    .option("-f, --foreground", "stay in the foreground (stop with Ctrl-C or SIGTERM)")
    .option("-d, --debug", "foreground, tracing every request on stderr (same as -o debug)")
    .option(
      "--name <name>",
      "file name inside MOUNTDIR (one disk only; default FILE without .add-cow)",
    )
    .addOption(new Option(CHILD_FLAG).hideHelp())
    .action((paths: string[], opts: CliOptions) => mountAction(paths, opts, deps));
}

async function mountAction(
  paths: string[],
  opts: CliOptions,
  deps: MountProgramDeps,
): Promise<void> {
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
  const options = parseMountOptions(opts.options);
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
  // A background daemon has no terminal: its problems go to syslog unless -o log= says otherwise.
  let reporter!: DaemonLog;
  let daemon: MountDaemon;
  try {
    reporter = new DaemonLog(
      PROGRAM,
      options.log ?? (foreground ? { kind: "stderr" } : { kind: "syslog" }),
    );
    daemon = await MountDaemon.start({
      disks,
      mountDir,
      options,
      reporter,
      services: [startControlService],
      ...(deps.opener ? { opener: deps.opener } : {}),
    });
  } catch (err) {
    if (!foreground) {
      await tellParent({ type: "error", message: errorLine(err) });
      process.exit(1);
    }
    throw err;
  }
  const stop = (sig: string) => void daemon.stop(`received ${sig}`);
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  if (foreground) process.on("SIGHUP", () => stop("SIGHUP"));
  else process.on("SIGHUP", () => undefined);
  // A bug must not leave a dead mount behind: flush what can be flushed, unmount, exit 1.
  const crash = (what: string, err: unknown) => {
    reporter.error(`internal error (${what}): ${errorLine(err)}`);
    if (err instanceof Error && err.stack) log.daemon("%s", err.stack);
    void daemon
      .stop(`internal error: ${errorLine(err)}`)
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
  const code = await daemon.stopped;
  await reporter.drain();
  process.exit(code);
}

if (require.main === module) {
  void runCli(buildProgram());
}
