#!/usr/bin/env node
import { spellBareAllowUrl } from "./confine-options";
import { Command } from "commander";
import { packageVersion, runCli } from "./run-cli";
import { applyOutputOption } from "./qemu-options";

interface CommandModule {
  register(program: Command): void;
}

/**
 * Every subcommand is a module exporting register(program); add new ones here.
 * Each is loaded only when it runs (or for help): a command's code, and what
 * it needs (the jobs, the progress bar, the control client), costs start-up
 * time that `addcow info` or `addcow --version` should not pay.
 */
const COMMANDS: ReadonlyArray<[string, () => CommandModule]> = [
  ["create", () => require("./commands/create") as CommandModule],
  ["info", () => require("./commands/info") as CommandModule],
  ["map", () => require("./commands/map") as CommandModule],
  ["check", () => require("./commands/check") as CommandModule],
  ["stream", () => require("./commands/stream") as CommandModule],
  ["commit", () => require("./commands/commit") as CommandModule],
  ["snapshot", () => require("./commands/snapshot") as CommandModule],
  ["jobs", () => require("./commands/jobs") as CommandModule],
  ["job", () => require("./commands/job") as CommandModule],
  ["rebase", () => require("./commands/rebase") as CommandModule],
  ["resize", () => require("./commands/resize") as CommandModule],
  ["manifest", () => require("./commands/manifest") as CommandModule],
];

/** The subcommand names (the mount helper tells a command from a disk by them). */
export const COMMAND_NAMES: readonly string[] = COMMANDS.map(([name]) => name);

/**
 * The program; with `only`, just that subcommand is registered (the one the
 * arguments name), otherwise all of them (help, suggestions for a typo).
 */
export function buildProgram(only?: string | null): Command {
  const program = new Command("addcow")
    .description("create, inspect and check add-cow copy-on-write disks")
    .version(packageVersion(), "-V, --version", "print the version and exit")
    .helpOption("-h, --help", "show help")
    .addHelpText("after", "\nSee docs/cli.md for the full reference. Tracing: DEBUG=addcow:*");
  for (const [name, load] of COMMANDS) {
    if (only === undefined || only === name) load().register(program);
  }
  applyOutputOption(program);
  return program;
}

/** Which subcommands the arguments need: one, none (--version), or all (help, unknown). */
function commandsFor(args: readonly string[]): string | null | undefined {
  const first = args[0];
  if (first !== undefined && COMMAND_NAMES.includes(first)) return first;
  if (first === "-V" || first === "--version") return null;
  return undefined;
}

/**
 * `addcow resize FILE -512M`: a negative size looks like an option, as in
 * qemu-img, which takes it out before parsing. Here a `--` goes in front of it.
 */
function protectNegativeSize(args: string[]): string[] {
  if (args[0] !== "resize" || args.includes("--")) return args;
  const last = args[args.length - 1];
  if (last === undefined || !/^-\d/.test(last)) return args;
  return [...args.slice(0, -1), "--", last];
}

if (require.main === module) {
  const args = process.argv.slice(2);
  const { helperMain, isHelperCall } = require("./mount-helper") as typeof import("./mount-helper");
  if (isHelperCall(args, [...COMMAND_NAMES, "help"])) {
    // mount.fuse runs `addcow SOURCE DIR -o OPTIONS` for mount -t fuse.addcow (and fstab).
    helperMain("addcow", args);
  } else {
    const program = buildProgram(commandsFor(args));
    void runCli(program, [
      ...process.argv.slice(0, 2),
      ...protectNegativeSize(spellBareAllowUrl(args)),
    ]);
  }
}
