import type { Command } from "commander";
import { describeManifest, makeManifest } from "../../ops/manifest";
import { parseSize } from "../../util/size";
import { action } from "../run-cli";
import { addJsonOption } from "../qemu-options";

interface ManifestFlags {
  outputFile?: string;
  blockSize?: string;
  json?: boolean;
  quiet?: boolean;
}

export function register(program: Command): void {
  const cmd = program
    .command("manifest")
    .description(
      "write the SHA-256 of every block of a base image (a file or a URL), to publish beside it as URL.manifest: overlays made on it pin it, and every block fetched can be checked",
    )
    .argument("<base>", "the base image: a raw file, or an http://, https:// or s3:// URL")
    .option(
      "-o, --output-file <file>",
      "where to write it (default: BASE.manifest; for a URL, its name + .manifest here)",
    )
    .option(
      "--block-size <size>",
      "bytes each digest covers, a power of two from 4K to 64M (default 64K; larger over 32G, keeping the manifest within 16M)",
    )
    .option("-q, --quiet", "print nothing on success");
  addJsonOption(cmd, "print the result as JSON").action(
    action(async (base: string, flags: ManifestFlags) => {
      const result = await makeManifest({
        base,
        ...(flags.outputFile === undefined ? {} : { output: flags.outputFile }),
        ...(flags.blockSize === undefined
          ? {}
          : { blockSize: parseSize(flags.blockSize, "block size") }),
      });
      if (flags.json) process.stdout.write(JSON.stringify(result, null, 2) + "\n");
      else if (!flags.quiet) process.stdout.write(describeManifest(result) + "\n");
    }),
  );
}
