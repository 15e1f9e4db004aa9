import * as fs from "node:fs";
import * as path from "node:path";
import { bitmapBytes } from "../addcow/header";
import type { CheckStep } from "./check-context";

function processRuns(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * What a crash can leave beside a disk. `addcow create` writes the .add-cow
 * file as `.NAME.PID.tmp` and links it into place (`addcow rebase` renames it
 * into place); a crash before the cleanup leaves that file behind. It never affects the disk: a warning says so and
 * that it may be removed.
 */
export const checkCreateLeftovers: CheckStep = {
  name: "create leftovers",
  run(ctx) {
    const dir = path.dirname(ctx.path);
    const base = path.basename(ctx.path);
    const pattern = new RegExp(
      `^\\.${base.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}\\.(\\d+)\\.tmp$`,
    );
    let names: string[];
    try {
      names = fs.readdirSync(dir);
    } catch {
      return;
    }
    for (const name of names) {
      const m = pattern.exec(name);
      if (!m) continue;
      const pid = Number(m[1]);
      if (pid !== process.pid && processRuns(pid)) continue; // A create still running.
      ctx.report({
        severity: "warning",
        offset: null,
        field: "leftover file",
        message: `${path.join(dir, name)} was left by an interrupted 'addcow create' or 'addcow rebase' (process ${pid} is gone); the disk does not use it and it can be removed`,
      });
    }
  },
};

/**
 * A bitmap longer than the image file needs means the image file is shorter
 * than when the disk was created (addcow never shrinks it): cut short by a
 * crash or by hand. Harmless while no bit past the end is set; the padding
 * step reports set bits as corruption.
 */
export const checkShrunkImage: CheckStep = {
  name: "image shorter than the bitmap",
  run(ctx) {
    const h = ctx.header;
    if (!h || ctx.numClusters === null || ctx.allAllocated) return;
    const cs = 2 ** h.clusterBits;
    const padded = bitmapBytes(ctx.numClusters, h.clusterBits).padded;
    const present = ctx.bitmapEnd - h.headerSize;
    if (present <= padded) return;
    const describes = Math.floor(present / cs) * cs * 8 * cs;
    ctx.report({
      severity: "warning",
      offset: h.headerSize + padded,
      field: "bitmap",
      message: `the bitmap has room for a disk of up to ${describes} bytes but image file ${ctx.imagePath} has ${ctx.imageSize}: the image file is shorter than when the disk was created`,
    });
  },
};
