import type { Command } from "commander";
import { type MapExtent, mapDisk } from "../../ops/map";
import { action } from "../run-cli";
import { addFormatOption, addJsonOption } from "../qemu-options";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "../confine-options";

interface MapFlags extends ConfineFlags {
  json?: boolean;
  forceShare?: boolean;
}

const hex = (n: number) => `0x${n.toString(16)}`;

/** A table like `qemu-img map`, plus the source column. */
export function formatMap(extents: MapExtent[]): string {
  const rows = [["Offset", "Length", "Source", "Depth", "File"]];
  for (const e of extents) {
    rows.push([
      hex(e.start),
      hex(e.length),
      e.source,
      e.depth === null ? "-" : String(e.depth),
      e.file ?? "-",
    ]);
  }
  const widths = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows
    .map((r) =>
      r
        .map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!)))
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}

export function register(program: Command): void {
  const cmd = program
    .command("map")
    .description("show where each byte range of the disk comes from: image, backing or zero")
    .argument("<file>", "the .add-cow file")
    .option("-U, --force-share", "do not take locks (answers may be stale while a writer runs)");
  addFormatOption(
    addJsonOption(addConfineOptions(cmd), "print JSON (stable; see docs/cli.md)"),
  ).action(
    action(async (file: string, flags: MapFlags) => {
      const extents = await mapDisk(file, {
        forceShare: flags.forceShare,
        ...trustFromFlags(flags),
      });
      if (flags.json) {
        process.stdout.write(JSON.stringify(extents, null, 2) + "\n");
        return;
      }
      process.stdout.write(formatMap(extents) + "\n");
    }),
  );
}
