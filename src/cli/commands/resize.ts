import type { Command } from "commander";
import { resizeAtRest } from "../../ops/resize";
import { action } from "../run-cli";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "../confine-options";
import { addFormatOption } from "../qemu-options";

interface ResizeFlags extends ConfineFlags {
  shrink?: boolean;
  quiet?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command("resize")
    .description(
      "grow (or with --shrink, shrink) a disk at rest: SIZE, +SIZE or -SIZE; new clusters read as zeros",
    )
    .argument("<file>", "the .add-cow disk (at rest: not mounted)")
    .argument("<size>", "new size (8G), or a change (+1G, -512M)")
    .option("--shrink", "allow a smaller size (only clusters the overlay does not hold are cut)")
    .option("-q, --quiet", "print nothing on success");
  addFormatOption(addConfineOptions(cmd)).action(
    action(async (file: string, size: string, flags: ResizeFlags) => {
      const message = await resizeAtRest(
        file,
        size,
        { shrink: flags.shrink === true },
        trustFromFlags(flags),
      );
      if (!flags.quiet) process.stdout.write(message + "\n");
    }),
  );
}
