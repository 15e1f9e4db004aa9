import { type Command, InvalidArgumentError, Option } from "commander";

/**
 * Spellings qemu-img users type out of habit: `--output=json|human` next to
 * `--json`, and `-f add-cow` for the format of the disk a command works on.
 */

/** --json, and --output=json|human as its qemu-img spelling. */
export function addJsonOption(cmd: Command, help: string): Command {
  return cmd
    .option("--json", help)
    .addOption(
      new Option("--output <format>", "json or human (qemu-img spelling of --json)").choices([
        "json",
        "human",
      ]),
    );
}

/** -f add-cow: accepted; any other format is refused with one line. */
export function addFormatOption(cmd: Command): Command {
  return cmd.addOption(
    new Option("-f, --format <format>", "format of FILE: add-cow (the only one)").argParser(
      (value: string) => {
        if (value !== "add-cow") {
          throw new InvalidArgumentError(
            `addcow works on add-cow disks only (-f add-cow); for a ${value} image use qemu-img`,
          );
        }
        return value;
      },
    ),
  );
}

/**
 * Turns --output into --json before any action runs; --json together with
 * --output=human is a contradiction, refused.
 */
export function applyOutputOption(program: Command): void {
  program.hook("preAction", (_root, action) => {
    const opts = action.opts<{ json?: boolean; output?: string }>();
    if (opts.output === undefined) return;
    if (opts.json && opts.output === "human") {
      throw new InvalidArgumentError("--json and --output=human contradict each other");
    }
    action.setOptionValue("json", opts.output === "json");
  });
}
