import { waitingForExitingDaemon } from "../../chain/exiting-daemon";
import type { Command } from "commander";
import { type CheckReport, type Finding, checkDisk } from "../../ops/check";
import { action } from "../run-cli";
import { addFormatOption, addJsonOption } from "../qemu-options";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "../confine-options";

interface CheckFlags extends ConfineFlags {
  json?: boolean;
  forceShare?: boolean;
}

/** Exit code when corruption was found (1 means the check itself could not run). */
export const EXIT_CORRUPT = 2;

export function formatFinding(f: Finding): string {
  const where = f.offset === null ? f.field : `${f.field} at byte ${f.offset}`;
  return `${f.file}: ${f.severity}: ${where}: ${f.message}`;
}

export function formatReport(r: CheckReport): string {
  const lines = r.findings.map(formatFinding);
  const corrupt = r.findings.filter((f) => f.severity === "corruption").length;
  lines.push(
    corrupt === 0
      ? "No errors were found on the disk."
      : `${corrupt} corruption finding(s) in ${r.file}.`,
  );
  if (r.clusters !== null && r.allocatedClusters !== null && r.clusters > 0) {
    const pct = Math.floor((r.allocatedClusters * 10000) / r.clusters) / 100;
    lines.push(`${r.allocatedClusters}/${r.clusters} = ${pct.toFixed(2)}% allocated`);
  }
  return lines.join("\n");
}

export function register(program: Command): void {
  const cmd = program
    .command("check")
    .description(
      "verify an add-cow disk (header, sizes, bitmap, names, chain); exit 0 clean, 2 corrupt, 1 cannot check",
    )
    .argument("<file>", "the .add-cow file")
    .option("-U, --force-share", "do not take locks (results may be stale while a writer runs)");
  addFormatOption(
    addJsonOption(addConfineOptions(cmd), "print JSON (stable; see docs/cli.md)"),
  ).action(
    action(async (file: string, flags: CheckFlags) => {
      const report = await waitingForExitingDaemon(
        file,
        () => checkDisk(file, { forceShare: flags.forceShare, ...trustFromFlags(flags) }),
        { forceShare: true },
      );
      if (flags.json) process.stdout.write(JSON.stringify(report, null, 2) + "\n");
      else process.stdout.write(formatReport(report) + "\n");
      return report.clean ? 0 : EXIT_CORRUPT;
    }),
  );
}
