import * as fs from "node:fs";
import * as path from "node:path";
import { spawn } from "node:child_process";
import { AddCowError } from "../util/errors";
import { parseMountOptions } from "../daemon/mount-options";
import { errorLine, logStart } from "./run-cli";

/**
 * mount(8) and /etc/fstab for add-cow disks. `mount -t fuse.addcow SOURCE DIR
 * -o OPTIONS` runs /sbin/mount.fuse.addcow when it exists, else mount.fuse,
 * which runs the type's name, `addcow`, with the same arguments. Either way
 * this module turns the call into `addcow-mount -o OPTIONS SOURCE DIR`, so
 * every daemon runs as addcow-mount (what tools looking for it by its command
 * line expect) and returns once the disk is mounted.
 *
 *   mount.fuse.addcow SOURCE DIR [-s] [-f] [-n] [-v] [-o OPTIONS]... [-t fuse.addcow]
 *
 * -s (sloppy): unknown options are dropped instead of refused; -f (fake):
 * check everything, mount nothing; -n (no mtab): nothing to do; -v: say the
 * command run. mount(8)'s generic options (defaults, nofail, _netdev, x-*,
 * user, noexec, ...) are accepted and ignored by addcow-mount itself.
 */
export interface HelperCall {
  source: string;
  mountDir: string;
  options: string[];
  fake: boolean;
  verbose: boolean;
}

const USAGE =
  "usage: mount.fuse.addcow FILE.add-cow MOUNTDIR [-o OPTIONS] (as mount(8) calls it; see docs/mount.md)";

/** The types mount(8) may name with -t. */
const TYPES = new Set(["fuse.addcow", "addcow"]);

export function parseHelperArgs(args: readonly string[]): HelperCall {
  const positionals: string[] = [];
  const options: string[] = [];
  let sloppy = false;
  let fake = false;
  let verbose = false;
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    const value = (): string => {
      const v = args[++i];
      if (v === undefined) throw new AddCowError(`${a} needs a value; ${USAGE}`);
      return v;
    };
    if (a === "-o") options.push(value());
    else if (a.startsWith("-o") && a.length > 2) options.push(a.slice(2));
    else if (a === "-t") {
      const type = value();
      if (!TYPES.has(type)) {
        throw new AddCowError(`-t ${type}: this helper mounts fuse.addcow file systems only`);
      }
    } else if (/^-[sfnv]+$/.test(a)) {
      sloppy ||= a.includes("s");
      fake ||= a.includes("f");
      verbose ||= a.includes("v");
    } else if (a.startsWith("-") && a !== "-") {
      throw new AddCowError(`unknown argument ${a}; ${USAGE}`);
    } else positionals.push(a);
  }
  if (positionals.length !== 2) throw new AddCowError(USAGE);
  return {
    source: positionals[0]!,
    mountDir: positionals[1]!,
    options: sloppy ? dropUnknown(options) : options,
    fake,
    verbose,
  };
}

/** -s: keep only the options addcow-mount knows or ignores. */
function dropUnknown(options: readonly string[]): string[] {
  const keep = options
    .flatMap((o) => o.split(","))
    .filter((item) => {
      try {
        parseMountOptions([item]);
        return item !== "";
      } catch {
        return false;
      }
    });
  return keep.length > 0 ? [keep.join(",")] : [];
}

/** mount.fuse clears PATH; the daemon still runs fusermount and logger. */
const DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/**
 * Runs addcow-mount for a helper call and resolves to its exit code. With
 * -o debug the daemon stays in the foreground and this waits for it; signals
 * meant for the mount (SIGTERM, SIGINT) go to the daemon.
 */
export async function runMountHelper(args: readonly string[]): Promise<number> {
  const call = parseHelperArgs(args);
  // Checked here too, so that -f (fake) and a bad option fail before anything starts.
  parseMountOptions(call.options);
  if (!fs.existsSync(call.source)) {
    throw new AddCowError(`${call.source} does not exist; give the .add-cow file to mount`, {
      file: call.source,
    });
  }
  const mountArgs = [...call.options.flatMap((o) => ["-o", o]), call.source, call.mountDir];
  const script = path.join(__dirname, "addcow-mount.js");
  if (call.verbose) process.stderr.write(`addcow-mount ${mountArgs.join(" ")}\n`);
  if (call.fake) return 0;
  const child = spawn(process.execPath, [...process.execArgv, script, ...mountArgs], {
    stdio: "inherit",
    env: { ...process.env, PATH: process.env.PATH ?? DEFAULT_PATH },
  });
  const forward = (signal: NodeJS.Signals) => () => child.kill(signal);
  const onTerm = forward("SIGTERM");
  const onInt = forward("SIGINT");
  process.on("SIGTERM", onTerm);
  process.on("SIGINT", onInt);
  try {
    return await new Promise<number>((resolve) => {
      child.on("error", (err) => {
        process.stderr.write(`mount.fuse.addcow: cannot start addcow-mount: ${err.message}\n`);
        resolve(1);
      });
      child.on("exit", (code, signal) => resolve(code ?? (signal ? 1 : 0)));
    });
  } finally {
    process.off("SIGTERM", onTerm);
    process.off("SIGINT", onInt);
  }
}

/**
 * `addcow SOURCE DIR -o ...` is how mount.fuse runs the type `fuse.addcow`:
 * a first argument that names an existing file (no command does) and a
 * second one make the call a mount.
 */
export function isHelperCall(args: readonly string[], commands: readonly string[]): boolean {
  const first = args[0];
  if (first === undefined || first.startsWith("-") || commands.includes(first)) return false;
  if (args.filter((a) => !a.startsWith("-")).length < 2) return false;
  try {
    return fs.statSync(first).isFile();
  } catch {
    return false;
  }
}

/** Runs a helper call as a program's main: one line on stderr for an error, then exit. */
export function helperMain(program: string, args: readonly string[]): void {
  logStart(program);
  runMountHelper(args).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`${program}: ${errorLine(err)}\n`);
      process.exit(1);
    },
  );
}
