import type { Command } from "commander";
import { type AddCowInfo, type LayerInfo, diskInfo } from "../../ops/info";
import type { ConfinementInfo } from "../../chain/access-policy";
import { formatSize } from "../../util/size";
import { action } from "../run-cli";
import { addFormatOption, addJsonOption } from "../qemu-options";
import { type ConfineFlags, addConfineOptions, trustFromFlags } from "../confine-options";

interface InfoFlags extends ConfineFlags {
  json?: boolean;
  backingChain?: boolean;
  forceShare?: boolean;
}

function sized(bytes: number): string {
  return `${formatSize(bytes)} (${bytes} bytes)`;
}

/** qemu-img info style text for one add-cow layer. */
export function formatAddCowInfo(info: AddCowInfo): string {
  const lines = [
    `image: ${info.file}`,
    `file format: add-cow`,
    `virtual size: ${sized(info.virtualSize)}`,
    `cluster size: ${sized(info.clusterSize)}`,
    `header size: ${info.headerSize} bytes`,
    `image file: ${info.image.stored} (actual path: ${info.image.path})`,
    `image file format: raw`,
  ];
  if (info.backing) {
    const unused = info.backing.inUse ? "" : " (not used: all clusters allocated)";
    lines.push(`backing file: ${info.backing.stored} (actual path: ${info.backing.path})${unused}`);
    lines.push(`backing file format: ${info.backing.format}`);
    const details = info.backing.details;
    if (details?.remote === true) lines.push(...formatRemote(details));
  } else {
    lines.push(`backing file: none`);
  }
  if (info.backing) lines.push(`backing pin: ${formatPin(info.pin)}`);
  lines.push(`backing chain depth: ${info.chainDepth}`);
  lines.push(
    `allocated: ${info.allocatedClusters} of ${info.clusters} clusters (${info.allocatedPercent.toFixed(2)}%)`,
  );
  const f = info.features;
  const others = f.compatibleBits.filter((b) => b !== 0);
  lines.push(
    `features: all-allocated ${f.allAllocated ? "yes" : "no"}` +
      (others.length ? `, other compatible bits ${others.join(" ")}` : "") +
      (f.incompatibleBits.length ? `, incompatible bits ${f.incompatibleBits.join(" ")}` : ""),
  );
  return lines.join("\n");
}

/** What the disk pinned of its backing (docs/specs/add-cow.md, "The backing pin"). */
function formatPin(pin: AddCowInfo["pin"]): string {
  switch (pin.state) {
    case "none":
      return "not pinned (made before pins: rebase -u -b SAME -F FORMAT pins it)";
    case "unreadable":
      return `cannot be read: ${pin.reason}`;
    case "committing":
      return `${pin.description}; a commit into the backing was interrupted: run commit again`;
    default:
      return `${pin.description} (pinned ${pin.pinnedAt})`;
  }
}

/** Lines about a remote backing: identity, block size, the shared cache. */
function formatRemote(r: Record<string, unknown>): string[] {
  const identity = [
    r.etag ? `ETag ${String(r.etag)}` : null,
    r.lastModified ? `Last-Modified ${String(r.lastModified)}` : null,
  ].filter((x) => x !== null);
  const lines = [
    `remote size: ${sized(Number(r.size))}`,
    `remote identity: ${identity.length ? identity.join(", ") : "size only (the server sends no ETag or Last-Modified)"}`,
    `remote block size: ${formatSize(Number(r.blockSize))}`,
  ];
  if (r.cacheDir) {
    const cached = Number(r.cachedBytes);
    const size = Number(r.size);
    const share = size > 0 ? ` (${((cached * 100) / size).toFixed(2)}%)` : "";
    const by = r.verifiedBy ? ", blocks stored by SHA-256 and shared with other bases" : "";
    lines.push(
      `remote cache: ${String(r.cacheDir)}: ${formatSize(cached)} of ${formatSize(size)} cached${share}${by}`,
    );
  } else {
    lines.push(`remote cache: none`);
  }
  const v = r.verifiedBy as { location: string; sha256: string; blockSize: number } | null;
  lines.push(
    v
      ? `remote blocks: verified (each ${formatSize(v.blockSize)} block against manifest ${v.location}, sha256 ${v.sha256.slice(0, 16)}...)`
      : `remote blocks: not verified (no manifest pinned; publish one with addcow manifest, then re-pin with addcow rebase -u)`,
  );
  if (Number(r.blockReads) > 0) {
    lines.push(
      `remote reads: ${Number(r.blockReads)} blocks, hit rate ${Number(r.hitRate).toFixed(2)}%, ${Number(r.requests)} requests, ${formatSize(Number(r.bytesFetched))} fetched`,
    );
  }
  return lines;
}

/** How a confined disk was opened: where its names had to stay. */
export function formatConfinement(c: ConfinementInfo): string {
  return `confinement: names resolve only inside ${c.dirs.join(", ")}; URL backings ${c.urls ? "allowed" : "refused"}`;
}

function formatLayer(layer: LayerInfo): string {
  if (layer.format === "add-cow") {
    return `${formatAddCowInfo(layer as AddCowInfo)}\nbacking chain position: ${layer.depth}`;
  }
  const lines = [
    `image: ${layer.file}`,
    `file format: ${layer.format}`,
    `virtual size: ${sized(layer.virtualSize)}`,
  ];
  // Other formats' own facts, one "name: value" line each.
  const shown = new Set(["file", "format", "virtualSize", "depth"]);
  for (const [key, value] of Object.entries(layer)) {
    if (shown.has(key) || value === undefined) continue;
    const text = typeof value === "object" ? JSON.stringify(value) : String(value);
    lines.push(`${key.replace(/[A-Z]/g, (c) => " " + c.toLowerCase())}: ${text}`);
  }
  lines.push(`backing chain position: ${layer.depth}`);
  return lines.join("\n");
}

export function register(program: Command): void {
  const cmd = program
    .command("info")
    .description("show what an add-cow disk is made of: sizes, files, backing chain, allocation")
    .argument("<file>", "the .add-cow file")
    .option("--backing-chain", "also describe every layer of the backing chain")
    .option("-U, --force-share", "do not take locks (answers may be stale while a writer runs)");
  addFormatOption(
    addJsonOption(addConfineOptions(cmd), "print JSON (stable; see docs/cli.md)"),
  ).action(
    action(async (file: string, flags: InfoFlags) => {
      const info = await diskInfo(file, {
        backingChain: flags.backingChain,
        forceShare: flags.forceShare,
        ...trustFromFlags(flags),
      });
      if (flags.json) {
        process.stdout.write(JSON.stringify(info, null, 2) + "\n");
        return;
      }
      const parts = [formatAddCowInfo(info)];
      if (info.confinement) parts[0] += `\n${formatConfinement(info.confinement)}`;
      for (const layer of info.backingChain ?? []) parts.push(formatLayer(layer));
      process.stdout.write(parts.join("\n\n") + "\n");
    }),
  );
}
