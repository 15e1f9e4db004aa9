/**
 * A disk mounted through the fault-injecting test launcher
 * (faulty-addcow-mount.ts): faults are armed and cleared in the running daemon
 * by rewriting a JSON rule file. Plus the small helpers those tests share.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import type { FaultRule } from "./fault-io";
import { type MountHandle, makeOverlay, mountDisk, tempDir } from "./mount";

export const FAULTY_MOUNT = path.resolve(
  __dirname,
  "../../dist/test/helpers/faulty-addcow-mount.js",
);

export interface FaultyMount {
  m: MountHandle;
  backing: Buffer;
  addcow: string;
  setFaults(rules: FaultRule[]): void;
}

export async function mountWithFaults(opts: {
  clusterSize: number;
  backingBytes: number;
  options?: string;
  foreground?: boolean;
}): Promise<FaultyMount> {
  if (!fs.existsSync(FAULTY_MOUNT)) throw new Error(`${FAULTY_MOUNT} is missing: npm run build`);
  const dir = tempDir("addcow-faultd-");
  const disk = await makeOverlay(dir, "disk", {
    backingBytes: opts.backingBytes,
    clusterSize: opts.clusterSize,
  });
  const control = path.join(dir, "faults.json");
  const setFaults = (rules: FaultRule[]) => {
    // Atomic replace: the daemon never reads a half-written rule file.
    fs.writeFileSync(control + ".tmp", JSON.stringify(rules));
    fs.renameSync(control + ".tmp", control);
  };
  setFaults([]);
  const m = await mountDisk(disk.addcow, path.join(dir, "mnt"), {
    ...(opts.options ? { options: opts.options } : {}),
    ...(opts.foreground ? { foreground: true } : {}),
    bin: FAULTY_MOUNT,
    env: { ...process.env, ADDCOW_TEST_FAULTS: control },
  });
  return { m, backing: fs.readFileSync(disk.backing!), addcow: disk.addcow, setFaults };
}

/** Runs a system call; returns its error code instead of throwing. */
export function syscall<T>(fn: () => T): T | string {
  try {
    return fn();
  } catch (err) {
    return (err as NodeJS.ErrnoException).code ?? String(err);
  }
}

/** The bit of cluster c as the .add-cow file holds it (the bitmap starts at headerSize). */
export function bitOnDisk(addcow: string, c: number, headerSize: number): number {
  const meta = fs.readFileSync(addcow);
  return (meta[headerSize + (c >> 3)]! >> (c & 7)) & 1;
}

/**
 * Mounts the disk again the ordinary way, writes cluster c and fsyncs it;
 * returns the cluster's bit on disk afterwards (1 when the disk works again).
 */
export async function bitAfterRemountWrite(
  s: FaultyMount,
  c: number,
  clusterSize: number,
  headerSize: number,
): Promise<number> {
  const again = await mountDisk(s.addcow, s.m.dir);
  try {
    const fd = fs.openSync(again.file, "r+");
    try {
      fs.writeSync(fd, Buffer.alloc(clusterSize, 0x5c), 0, clusterSize, c * clusterSize);
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    return bitOnDisk(s.addcow, c, headerSize);
  } finally {
    await again.unmount();
  }
}
