import type { Command } from "commander";
import { commitAtRest } from "../../jobs/at-rest";
import {
  type CopyFlags,
  addCopyOptions,
  parseCopyFlags,
  runLiveIfMounted,
  runAtRest,
  wireOptions,
} from "../run-job";
import { action } from "../run-cli";
import { trustFromFlags } from "../confine-options";

export function register(program: Command): void {
  addCopyOptions(
    program
      .command("commit")
      .description(
        "write every cluster of the overlay into its backing disk (opened writable for this job), then empty the overlay",
      )
      .argument("<file>", "the .add-cow overlay (at rest, or mounted by addcow-mount)")
      .option("-k, --keep", "leave the overlay as it is instead of emptying it"),
  ).action(
    action(async (file: string, flags: CopyFlags & { keep?: boolean }) => {
      const opts = { ...parseCopyFlags(flags), keep: flags.keep === true };
      const live = await runLiveIfMounted("commit", file, flags, {
        ...wireOptions(opts),
        keep: opts.keep,
      });
      if (live !== null) return live;
      return runAtRest("commit", file, flags, (job) =>
        commitAtRest(file, job, opts, trustFromFlags(flags)),
      );
    }),
  );
}
