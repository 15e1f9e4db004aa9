#!/usr/bin/env node
import { spellBareAllowUrl } from "./confine-options";
import { Command } from "commander";
import { packageVersion, runCli } from "./run-cli";
import { helperMain, isHelperCall } from "./mount-helper";
import { applyOutputOption } from "./qemu-options";
import * as check from "./commands/check";
import * as create from "./commands/create";
import * as info from "./commands/info";
import * as map from "./commands/map";
import * as stream from "./commands/stream";
import * as commit from "./commands/commit";
import * as snapshot from "./commands/snapshot";
import * as jobs from "./commands/jobs";
import * as job from "./commands/job";
import * as resize from "./commands/resize";
import * as rebase from "./commands/rebase";

/** Every subcommand is a module exporting register(program); add new ones here. */
const COMMANDS: Array<{ register(program: Command): void }> = [
  create,
  info,
  map,
  check,
  stream,
  commit,
  snapshot,
  jobs,
  job,
  rebase,
  resize,
];

export function buildProgram(): Command {
  const program = new Command("addcow")
    .description("create, inspect and check add-cow copy-on-write disks")
    .version(packageVersion(), "-V, --version", "print the version and exit")
    .helpOption("-h, --help", "show help")
    .addHelpText("after", "\nSee docs/cli.md for the full reference. Tracing: DEBUG=addcow:*");
  for (const command of COMMANDS) command.register(program);
  applyOutputOption(program);
  return program;
}

if (require.main === module) {
  const program = buildProgram();
  const args = process.argv.slice(2);
  const commands = program.commands.flatMap((c) => [c.name(), ...c.aliases()]);
  if (isHelperCall(args, [...commands, "help"])) {
    // mount.fuse runs `addcow SOURCE DIR -o OPTIONS` for mount -t fuse.addcow (and fstab).
    helperMain("addcow", args);
  } else {
    void runCli(program, [
      ...process.argv.slice(0, 2),
      ...resize.protectNegativeSize(spellBareAllowUrl(args)),
    ]);
  }
}
