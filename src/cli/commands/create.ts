import type { Command } from "commander";
import { createDisk, describeCreate } from "../../ops/create";
import { parseCreateOptions } from "../../ops/backing-identity";
import { parseSize } from "../../util/size";
import { action } from "../run-cli";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "../confine-options";

interface CreateFlags extends ConfineFlags {
  backing?: string;
  backingFormat?: string;
  image?: string;
  clusterSize?: string;
  options?: string[];
  quiet?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command("create")
    .description(
      "create an add-cow disk: FILE.add-cow plus its raw image file, over an optional backing file",
    )
    .argument("<file>", "the .add-cow file to create (must not exist)")
    .argument(
      "[size]",
      "virtual size (512M, 8G, 1T or bytes); default: the existing image file's size, else the backing file's",
    )
    .option("-b, --backing <file>", "backing file (read-only base); needs -F")
    .option("-F, --backing-format <format>", "format of the backing file: raw, qcow2 or add-cow")
    .option("-i, --image <file>", "image file (default: FILE with .add-cow replaced by .raw)")
    .option("-c, --cluster-size <size>", "cluster size, a power of two from 4K to 2M", "64K")
    .option(
      "-o, --options <list>",
      "manifest=URL (the remote base's manifest to pin; default: URL.manifest when it exists) or manifest=none",
      (value: string, prev: string[] = []) => [...prev, value],
    )
    .option("-q, --quiet", "print nothing on success");
  addConfineOptions(cmd).action(
    action(async (file: string, size: string | undefined, flags: CreateFlags) => {
      const result = await createDisk({
        file,
        backing: flags.backing,
        backingFormat: flags.backingFormat,
        image: flags.image,
        clusterSize: parseSize(flags.clusterSize ?? "64K", "cluster size"),
        size: size === undefined ? undefined : parseSize(size, "size"),
        ...trustFromFlags(flags),
        ...parseCreateOptions(flags.options ?? []),
      });
      if (!flags.quiet) process.stdout.write(describeCreate(result) + "\n");
    }),
  );
}
