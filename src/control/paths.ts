import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { AddCowError, errnoCode } from "../util/errors";

/**
 * Where control sockets live: $ADDCOW_RUNTIME_DIR, else /run/addcow for root,
 * else $XDG_RUNTIME_DIR/addcow, else a per-user directory in the temp dir.
 * The directory is mode 0700 and each socket 0600: only the owner may drive jobs.
 */
export function runtimeDir(): string {
  const env = process.env.ADDCOW_RUNTIME_DIR;
  if (env) return path.resolve(env);
  if (process.getuid?.() === 0) return "/run/addcow";
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg) return path.join(xdg, "addcow");
  return path.join(os.tmpdir(), `addcow-${process.getuid?.() ?? "user"}`);
}

export function ensureRuntimeDir(): string {
  const dir = runtimeDir();
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  checkRuntimeDir(dir);
  return dir;
}

/**
 * The runtime directory must be the user's own: a directory someone else made
 * first (in a shared temp dir anyone can) or may write to would let them put
 * their own sockets there and answer `addcow job ...` in the daemon's name.
 * Like ssh with its files, refuse it rather than fix it. A missing directory
 * is fine (no daemon runs).
 */
export function checkRuntimeDir(dir: string = runtimeDir()): void {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(dir);
  } catch (err) {
    if (errnoCode(err) === "ENOENT") return;
    throw err;
  }
  const fix = `remove it, or set ADDCOW_RUNTIME_DIR to a directory of your own (mode 0700)`;
  const refuse = (what: string) =>
    new AddCowError(`control socket directory ${dir} ${what}; ${fix}`, {
      file: dir,
      code: "EPERM",
      reason: "forbidden",
    });
  if (!st.isDirectory()) throw refuse("is not a directory");
  const uid = process.getuid?.();
  if (uid !== undefined && st.uid !== uid) {
    throw refuse(`belongs to user ${st.uid}, not to you (user ${uid})`);
  }
  if ((st.mode & 0o022) !== 0) {
    throw refuse(`is writable by other users (mode ${(st.mode & 0o7777).toString(8)})`);
  }
}

/** The real path of a disk, so every name of the same file finds the same socket. */
export function diskKey(file: string): string {
  try {
    return fs.realpathSync(file);
  } catch {
    return path.resolve(file);
  }
}

/** The control socket of the daemon serving this .add-cow file (short: sun_path has 108 bytes). */
export function socketPathFor(file: string): string {
  const hash = crypto.createHash("sha256").update(diskKey(file)).digest("hex").slice(0, 20);
  return path.join(runtimeDir(), `${hash}.ctl`);
}

/**
 * The control socket of host daemon NAME (addcow-mount --serve NAME), where
 * disks are attached. Ends in .ctl like the disks' sockets, so `addcow jobs`
 * finds a host's jobs through it too.
 */
export function hostSocketPath(name: string): string {
  return path.join(runtimeDir(), `host-${name}.ctl`);
}

/** Every control socket in the runtime directory. */
export function allSockets(): string[] {
  const dir = runtimeDir();
  checkRuntimeDir(dir);
  try {
    return fs
      .readdirSync(dir)
      .filter((n) => n.endsWith(".ctl"))
      .map((n) => path.join(dir, n));
  } catch {
    return [];
  }
}
