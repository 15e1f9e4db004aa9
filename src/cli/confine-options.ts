import * as path from "node:path";
import type { Command } from "commander";
import type { Confinement } from "../chain/access-policy";

/** --confine, --allow-dir, --allow-url: shared by every addcow command that opens a disk. */

export interface ConfineFlags {
  confine?: boolean;
  allowDir?: string[];
  allowUrl?: boolean;
}

function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

export function addConfineOptions(cmd: Command): Command {
  return cmd
    .option(
      "--confine",
      "names in headers must resolve inside the disk's directory (or an --allow-dir); use for any disk you did not make",
    )
    .option(
      "--allow-dir <dir>",
      "with --confine (implied): a trusted directory names may also reach, e.g. shared base images; repeatable",
      collect,
    )
    .option("--allow-url", "with --confine (implied): allow URL backing files (http, https, s3)");
}

/** The confinement the flags ask for; null without any of them. */
export function confinementFromFlags(flags: ConfineFlags): Confinement | null {
  const allowDirs = (flags.allowDir ?? []).map((d) => path.resolve(d));
  if (!flags.confine && allowDirs.length === 0 && !flags.allowUrl) return null;
  return { allowDirs, allowUrls: flags.allowUrl === true };
}
