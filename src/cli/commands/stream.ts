import type { Command } from "commander";
import { streamAtRest } from "../../jobs/at-rest";
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
      .command("stream")
      .description(
        "copy every cluster still read from the backing chain into the image file; at the end the image file is a standalone raw disk",
      )
      .argument("<file>", "the .add-cow disk (at rest, or mounted by addcow-mount)"),
  ).action(
    action(async (file: string, flags: CopyFlags) => {
      const opts = parseCopyFlags(flags);
      const live = await runLiveIfMounted("stream", file, flags, wireOptions(opts));
      if (live !== null) return live;
      return runAtRest("stream", file, flags, (job) =>
        streamAtRest(file, job, opts, trustFromFlags(flags)),
      );
    }),
  );
}
