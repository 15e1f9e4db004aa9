import * as fs from "node:fs";
import * as path from "node:path";
import type { FileIO } from "../block/file-io";
import type { Access, Namer } from "../block/chain-opener";
import type { Controller } from "../os/path-walk";
import { AddCowError, errnoCode } from "../util/errors";
import { log } from "../util/log";
import { AccessProbe } from "./access-probe";
import { isRemoteName } from "../remote/url";

/**
 * The rules for the files of a disk (docs/security.md). A header is data
 * from whoever made the file, and a path is data from whoever owns its
 * directories and links; neither may lead the process opening the disk
 * (usually root) to files those users could not open:
 *
 * - owner rule (always on): every file a header names is judged for the
 *   users whose words lead to it: the owner of the disk's .add-cow file, the
 *   owner of the .add-cow file holding the name, and the owners of every
 *   directory and symbolic link on the way to the disk, to that layer and to
 *   the file (the disk named on the command line is judged for the latter
 *   too). Each must be able to open it the same way (read, or read and
 *   write), as the kernel itself judges it; a written image file must belong
 *   to the disk's owner;
 * - confinement (--confine, -o confine): every name must resolve, after
 *   symbolic links, inside the disk's directory or an allowed directory.
 *
 * What a judged user cannot see is never described: a name they may not
 * look up is refused as such, whether or not it exists.
 */

/** Confinement: where the names in a disk's headers may lead. */
export interface Confinement {
  /** Trusted directories besides the disk's own, e.g. shared base images (--allow-dir). */
  allowDirs: string[];
  /** Backing names may be URLs (http, https, s3) (--allow-url). */
  allowUrls: boolean;
}

/** Confinement as applied to one disk: the real paths names must resolve inside. */
export interface ConfinementInfo {
  dirs: string[];
  urls: boolean;
}

export type { Access, Namer };

/** A file about to be opened because a header (or the user) names it. */
export interface NamedFile {
  /** The name as shown: absolute, resolved against the directory it was found in. */
  file: string;
  role: string;
  access: Access;
  /** The .add-cow file whose header holds the name; absent for the disk the user named. */
  namer?: Namer;
  /** What a judged user's helper looks up (default `file`): the same inode, by a path that user may use. */
  probePath?: string;
}

/** The file a name led to: its O_PATH descriptor's fstat, and who controls the way to it. */
export interface Located {
  st: fs.BigIntStats;
  /** Owners of directories and links on the way, other than the runner and root. */
  controllers: readonly Controller[];
  /** The kernel's path of the descriptor (for confinement). */
  realPath(): string;
}

/** A user whose rights bound a file, and why (for messages). */
export interface Principal {
  uid: number;
  /** What they own that leads here: a file, "directory D", "symbolic link L". */
  owns: string;
}

/** A backing name that is a URL (docs/specs/add-cow.md): never resolved as a path. */
export function isUrlName(name: string): boolean {
  return isRemoteName(name);
}

function inside(dirs: string[], real: string): boolean {
  return dirs.some((d) => real === d || real.startsWith(d === "/" ? "/" : d + "/"));
}

function realDir(dir: string): string {
  let real: string;
  try {
    real = fs.realpathSync(dir);
  } catch (err) {
    throw new AddCowError(`allowed directory ${dir} cannot be used: ${errnoCode(err)}`, {
      file: dir,
      code: errnoCode(err) ?? "EIO",
    });
  }
  if (!fs.statSync(real).isDirectory()) {
    throw new AddCowError(`allowed directory ${dir} is not a directory`, {
      file: dir,
      code: "ENOTDIR",
    });
  }
  return real;
}

/**
 * The directories a confined disk's names must stay in: its own (the real
 * directory of the file opened, when known; else of the name) and the allowed ones.
 */
export function confinementOf(
  diskFile: string,
  confine: Confinement,
  diskDir?: string,
): ConfinementInfo {
  const own = diskDir ?? realDir(path.dirname(path.resolve(diskFile)));
  const dirs = [own, ...confine.allowDirs.map(realDir)];
  return { dirs: [...new Set(dirs)], urls: confine.allowUrls };
}

function verb(access: Access): string {
  return access === "write" ? "read and write" : "read";
}

/** The users a namer's words speak for: its owner and whoever controls the way to it. */
function principalsOf(namer: Namer): Principal[] {
  return [
    { uid: namer.uid, owns: namer.file },
    ...(namer.via ?? []).map((c) => ({ uid: c.uid, owns: c.what })),
  ];
}

export class AccessPolicy {
  /** The user addcow runs as. */
  private readonly runner = process.geteuid?.() ?? 0;
  private disk: { file: string; principals: Principal[] } | null = null;
  private dirs: ConfinementInfo | null = null;
  private readonly probes = new Map<number, AccessProbe>();

  private constructor(private readonly confine: Confinement | null) {}

  static create(confine?: Confinement | null): AccessPolicy {
    return new AccessPolicy(confine ?? null);
  }

  get confinement(): ConfinementInfo | null {
    return this.dirs;
  }

  /**
   * The disk: its .add-cow file's owner and the controllers of the way to it
   * (every name is judged for them too), and the real directory it was opened
   * in (confinement's own directory).
   */
  setDisk(owner: Namer): void {
    this.disk = { file: owner.file, principals: principalsOf(owner) };
    if (this.confine) this.dirs = confinementOf(owner.file, this.confine, owner.dir);
  }

  /** The user whose disk it is: its file's owner, or, for the runner's file, whoever controls the way to it. */
  private get diskOwner(): Principal | null {
    if (!this.disk) throw new Error("AccessPolicy: the disk is not known yet");
    return this.disk.principals.find((p) => p.uid !== this.runner) ?? null;
  }

  /** Users other than the runner whose words a name in namer's header is (chain/url-policy.ts). */
  writersOf(namer?: Namer): Principal[] {
    if (!namer) return [];
    return this.judgesFor({ file: namer.file, role: "backing file", access: "read", namer }, []);
  }

  /**
   * Users other than the runner whose rights bound this file, each once. The
   * disk the user named is judged only for whoever controls the way to it and
   * does not own it (its own names are judged for its owner anyway).
   */
  private judgesFor(
    n: NamedFile,
    controllers: readonly Controller[],
    st?: fs.BigIntStats,
  ): Principal[] {
    const all = [
      ...(n.namer ? (this.disk?.principals ?? []) : []),
      ...(n.namer ? principalsOf(n.namer) : []),
      ...controllers
        .filter((c) => n.namer || st === undefined || c.uid !== Number(st.uid))
        .map((c) => ({ uid: c.uid, owns: c.what })),
    ];
    const out: Principal[] = [];
    for (const who of all) {
      if (who.uid !== this.runner && !out.some((o) => o.uid === who.uid)) out.push(who);
    }
    return out;
  }

  /** Whether anyone besides the runner is judged for this file. */
  judges(n: NamedFile, controllers: readonly Controller[]): boolean {
    return this.judgesFor(n, controllers).length > 0;
  }

  /**
   * A name that could not be looked up: when a judged user could not look it
   * up either, that is the refusal (so nobody learns whether a file exists
   * where that user cannot see). Returns when every judged user could.
   */
  async refuseUnseen(n: NamedFile, controllers: readonly Controller[]): Promise<void> {
    if (this.runner !== 0) return;
    for (const who of this.judgesFor(n, controllers)) {
      const answer = await this.ask(who, n);
      if (!answer.ok && answer.code !== "ENOENT" && answer.code !== "ENOTDIR") {
        throw this.refuse(
          n,
          `${userOf(who)} may not ${verb(n.access)} it (${answer.code}), ${RULE}`,
        );
      }
    }
  }

  /**
   * Before opening, first of all: every judged user could open the file the
   * same way, and reaches this very inode. A file that is not regular is left
   * to the caller (it says what it is: each judged user could see it).
   */
  async judgeAccess(n: NamedFile, at: Located): Promise<void> {
    for (const who of this.judgesFor(n, at.controllers, at.st)) {
      await this.judgeFor(who, n, at.st);
    }
  }

  /** Before opening, after the kind: confinement, and a written image file is the owner's. */
  judgePlace(n: NamedFile, at: Located): void {
    if (this.dirs && n.namer) this.checkInside(n, at.realPath());
    this.checkImageOwner(n, at.st);
  }

  /** After opening: the descriptor is the file judged, still the owner's. */
  verify(n: NamedFile, judged: fs.BigIntStats, io: FileIO): void {
    const st = io.stat();
    if (st.dev !== judged.dev || st.ino !== judged.ino) {
      throw this.refuse(n, "it was replaced while it was being opened; try again");
    }
    this.checkImageOwner(n, st);
  }

  close(): void {
    for (const p of this.probes.values()) p.close();
    this.probes.clear();
  }

  private async ask(who: Principal, n: NamedFile) {
    try {
      const answer = await this.probeFor(who.uid).ask(n.probePath ?? n.file, n.access);
      log.open("%s as uid %d: %o", n.probePath ?? n.file, who.uid, answer);
      return answer;
    } catch (err) {
      const where = n.namer ? ` (named in ${n.namer.file})` : "";
      throw new AddCowError(
        `cannot check whether uid ${who.uid} may open ${n.file}${where}: ${(err as Error).message}; the disk is refused (addcow must run as root, with CAP_SETUID and CAP_SETGID, to open another user's disk)`,
        { reason: "forbidden", file: n.file, code: "EACCES", mode: n.access },
      );
    }
  }

  private async judgeFor(who: Principal, n: NamedFile, st: fs.BigIntStats): Promise<void> {
    const user = userOf(who);
    if (this.runner !== 0) {
      // Only root can ask the kernel as another user. Exact without asking: root may
      // open any regular file, and a file's owner is judged by the owner bits alone.
      if (who.uid === 0 || !st.isFile()) return;
      if (Number(st.uid) === who.uid) {
        const need = n.access === "write" ? 0o600 : 0o400;
        if ((Number(st.mode) & need) === need) return;
        throw this.refuse(n, `${user} may not ${verb(n.access)} it (mode ${modeOf(st)}), ${RULE}`);
      }
      throw this.refuse(
        n,
        `it belongs to uid ${st.uid}, and addcow running as uid ${this.runner} cannot tell whether ${user} may ${verb(n.access)} it; run addcow as root or as uid ${who.uid}`,
      );
    }
    const answer = await this.ask(who, n);
    if (!answer.ok) {
      throw this.refuse(n, `${user} may not ${verb(n.access)} it (${answer.code}), ${RULE}`);
    }
    if (answer.dev !== st.dev || answer.ino !== st.ino) {
      throw this.refuse(n, `${user} reaches another file under that name`);
    }
  }

  private probeFor(uid: number): AccessProbe {
    let probe = this.probes.get(uid);
    if (!probe) {
      probe = new AccessProbe(uid);
      this.probes.set(uid, probe);
    }
    return probe;
  }

  private checkInside(n: NamedFile, real: string): void {
    const c = this.dirs!;
    if (inside(c.dirs, real)) return;
    throw this.refuse(
      n,
      `it resolves to ${real}, outside ${c.dirs.join(" and ")}, and a confined disk's names must stay inside its directory or an allowed one (--allow-dir, -o allow_dir=)`,
    );
  }

  /** A disk writes only into an image file its owner owns. */
  private checkImageOwner(n: NamedFile, st: fs.BigIntStats): void {
    if (n.role !== "image file" || n.access !== "write") return;
    const owner = this.diskOwner;
    if (!owner || Number(st.uid) === owner.uid) return;
    throw this.refuse(
      n,
      `it belongs to uid ${st.uid}, not to uid ${owner.uid} who owns ${owner.owns}, and a disk writes only into its owner's files`,
    );
  }

  private refuse(n: NamedFile, why: string): AddCowError {
    const where = n.namer ? ` (named in ${n.namer.file})` : "";
    return new AddCowError(`${n.role} ${n.file}${where} is refused: ${why}; see docs/security.md`, {
      reason: "forbidden",
      file: n.file,
      code: "EACCES",
      mode: n.access,
    });
  }
}

const RULE = "and a disk may only reach files its owner could open";

function userOf(who: Principal): string {
  return `uid ${who.uid}, who owns ${who.owns},`;
}

function modeOf(st: fs.BigIntStats): string {
  return (Number(st.mode) & 0o7777).toString(8).padStart(4, "0");
}

function realOrResolved(dir: string): string {
  try {
    return fs.realpathSync(dir);
  } catch {
    return path.resolve(dir);
  }
}

/**
 * Whether a disk opened under `applied` is at least as confined as `wanted`
 * asks (a live job asking for confinement on a mounted disk): confined, with
 * no allowed directory and no URL allowance beyond what `wanted` grants.
 */
export function confinementCovers(applied: Confinement | null, wanted: Confinement): boolean {
  if (!applied) return false;
  if (applied.allowUrls && !wanted.allowUrls) return false;
  const granted = new Set(wanted.allowDirs.map(realOrResolved));
  return applied.allowDirs.every((d) => granted.has(realOrResolved(d)));
}
