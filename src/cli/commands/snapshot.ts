import * as path from "node:path";
import type { Command } from "commander";
import { runLiveIfMounted, runAtRest } from "../run-job";
import { snapshotDisk } from "../../jobs/snapshot";
import { parseSize } from "../../util/size";
import { action } from "../run-cli";
import { addFormatOption, addJsonOption } from "../qemu-options";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "../confine-options";

interface SnapshotFlags extends ConfineFlags {
  image?: string;
  clusterSize?: string;
  json?: boolean;
  quiet?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command("snapshot")
    .description(
      "create NEW.add-cow over FILE (backing format add-cow) with its own image file; afterwards FILE is only read",
    )
    .argument(
      "<file>",
      "the current .add-cow disk (at rest, or mounted: the mount switches to NEW)",
    )
    .argument("<new>", "the new .add-cow overlay (must not exist)")
    .option(
      "-i, --image <file>",
      "image file of the new overlay (default: NEW with .add-cow replaced by .raw)",
    )
    .option("-c, --cluster-size <size>", "cluster size of the new overlay (default 64K)")
    .option("-q, --quiet", "print nothing but errors");
  addFormatOption(addJsonOption(addConfineOptions(cmd), "print the result as a JSON event")).action(
    action(async (file: string, newFile: string, flags: SnapshotFlags) => {
      const clusterSize =
        flags.clusterSize === undefined ? undefined : parseSize(flags.clusterSize, "cluster size");
      const live = await runLiveIfMounted("snapshot", file, flags, {
        newFile: path.resolve(newFile),
        ...(flags.image === undefined ? {} : { image: path.resolve(flags.image) }),
        ...(clusterSize === undefined ? {} : { clusterSize }),
        // The daemon gets absolute paths; names given relative are stored relative, as at rest.
        relative: {
          backing: !path.isAbsolute(file),
          image: !path.isAbsolute(flags.image ?? newFile),
        },
      });
      if (live !== null) return live;
      return runAtRest("snapshot", file, flags, () =>
        snapshotDisk(file, newFile, {
          ...(flags.image === undefined ? {} : { image: flags.image }),
          ...(clusterSize === undefined ? {} : { clusterSize }),
          ...trustFromFlags(flags),
        }),
      );
    }),
  );
}
