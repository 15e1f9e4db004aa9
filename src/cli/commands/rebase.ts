import type { Command } from "commander";
import { rebaseAtRest } from "../../jobs/at-rest";
import { type CopyFlags, addCopyOptions, parseCopyFlags, runAtRest } from "../run-job";
import { action } from "../run-cli";
import { trustFromFlags } from "../confine-options";

interface RebaseFlags extends CopyFlags {
  backing: string;
  backingFormat?: string;
  unsafe?: boolean;
}

export function register(program: Command): void {
  addCopyOptions(
    program
      .command("rebase")
      .description(
        "give a disk at rest another backing file: what reads differently from the new one is first copied into the overlay, so the disk reads the same (-u: only the name changes; -b '': no backing file, like stream)",
      )
      .argument("<file>", "the .add-cow disk (at rest: not mounted)")
      .requiredOption("-b, --backing <file>", "the new backing file; '' for none")
      .option("-F, --backing-format <format>", "its format: raw or add-cow (required with -b FILE)")
      .option(
        "-u, --unsafe",
        "only rewrite the name (the file must open as that format, with the current backing's size); copies nothing",
      ),
    { live: false },
  ).action(
    action(async (file: string, flags: RebaseFlags) => {
      const opts = parseCopyFlags(flags);
      return runAtRest("rebase", file, flags, (job) =>
        rebaseAtRest(
          file,
          {
            backing: flags.backing,
            ...(flags.backingFormat === undefined ? {} : { format: flags.backingFormat }),
            unsafe: flags.unsafe === true,
          },
          job,
          opts,
          trustFromFlags(flags),
        ),
      );
    }),
  );
}
