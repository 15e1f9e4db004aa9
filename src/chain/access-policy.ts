import * as fs from "node:fs";
import * as path from "node:path";
import type { FileIO } from "../block/file-io";
import type { Access, Namer } from "../block/chain-opener";
import { AddCowError, errnoCode } from "../util/errors";
import { log } from "../util/log";
import { AccessProbe } from "./access-probe";
import { isRemoteName } from "../remote/url";

/**
 * The rules for names found in headers (docs/security.md). A header is data
 * from whoever made the file; the names in it must not lead the process
 * opening the disk (usually root) to files the disk's owner could not open:
 *
 * - owner rule (always on): when the disk's .add-cow file, or the .add-cow
 *   file holding a name, belongs to another user than the one running addcow,
 *   every named file must be a regular file that user could open the same way
 *   (read for backing files, read and write for a written file), as the
 *   kernel itself judges it; the image file written must belong to the owner;
 * - confinement (--confine, -o confine): every name must resolve, after
 *   symbolic links, inside the disk's directory or an allowed directory, and a
 *   URL backing needs an explicit allow.
 *
 * Judged twice: by path before the open (so nothing forbidden is opened at
 * all, and a chain is judged whole before anything is opened for writing) and
 * on the descriptor after it (so a name swapped meanwhile is caught).
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

/** A file about to be opened because a header names it. */
export interface NamedFile {
  file: string;
  role: string;
  access: Access;
  namer: Namer;
}

/** The file a name led to when it was judged (stat, following symbolic links). */
export type Judged = fs.BigIntStats;

/** A backing name that is a URL (docs/specs/add-cow.md): never resolved as a path. */
export function isUrlName(name: string): boolean {
  return isRemoteName(name);
}

function inside(dirs: string[], real: string): boolean {
  return dirs.some((d) => real === d || real.startsWith(d === "/" ? "/" : d + "/"));
}

/** The directories a confined disk's names must stay in: its own and the allowed ones, as real paths. */
export function confinementOf(diskFile: string, confine: Confinement): ConfinementInfo {
  const dirs = [path.dirname(path.resolve(diskFile)), ...confine.allowDirs].map((dir) => {
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
  });
  return { dirs: [...new Set(dirs)], urls: confine.allowUrls };
}

/**
 * The hook every opener calls before it reaches a URL backing name: under
 * confinement a URL is refused unless URLs were allowed explicitly.
 */
export function checkUrlName(
  confine: Confinement | null | undefined,
  name: string,
  role: string,
  namedIn: string,
): void {
  if (confine && !confine.allowUrls) throw urlRefused(name, role, namedIn);
}

function urlRefused(name: string, role: string, namedIn: string): AddCowError {
  return new AddCowError(
    `${role} ${name} (named in ${namedIn}) is refused: it is a URL, and a confined disk may use URL backings only with --allow-url (-o allow_url)`,
    { reason: "forbidden", file: name, code: "EACCES", mode: "read" },
  );
}

function verb(access: Access): string {
  return access === "write" ? "read and write" : "read";
}

export class AccessPolicy {
  /** The user addcow runs as. */
  private readonly runner = process.geteuid?.() ?? 0;
  private owner: { uid: number; gid: number } | null = null;
  private readonly probes = new Map<number, AccessProbe>();

  private constructor(
    /** The disk's own .add-cow file: named by the user, not by a header. */
    readonly diskFile: string,
    readonly confinement: ConfinementInfo | null,
  ) {}

  static create(diskFile: string, confine?: Confinement | null): AccessPolicy {
    return new AccessPolicy(diskFile, confine ? confinementOf(diskFile, confine) : null);
  }

  /** The owner of the disk's .add-cow file: every named file is judged for this user too. */
  setDiskOwner(st: { uid: number | bigint; gid: number | bigint }): void {
    this.owner = { uid: Number(st.uid), gid: Number(st.gid) };
  }

  get diskOwner(): Namer {
    if (!this.owner) throw new Error("AccessPolicy: the disk owner is not known yet");
    return { file: this.diskFile, ...this.owner };
  }

  /** A URL backing under confinement needs an explicit allow. */
  checkUrl(name: string, role: string, namedIn: string): void {
    if (this.confinement && !this.confinement.urls) throw urlRefused(name, role, namedIn);
  }

  /** Before opening: confinement, then the owners' access as the kernel sees it. */
  async judge(n: NamedFile, st: Judged): Promise<void> {
    if (this.confinement) {
      let real: string;
      try {
        real = await fs.promises.realpath(n.file);
      } catch (err) {
        throw this.refuse(n, `it cannot be resolved (${errnoCode(err)})`);
      }
      this.checkInside(n, real);
    }
    for (const who of this.judgedFor(n)) await this.judgeFor(who, n, st);
    this.checkImageOwner(n, st);
  }

  /** After opening: the descriptor is the file judged, still inside, still the owner's. */
  async verify(n: NamedFile, judged: Judged, io: FileIO): Promise<void> {
    const st = io.stat();
    if (st.dev !== judged.dev || st.ino !== judged.ino) {
      throw this.refuse(n, "it was replaced while it was being opened; try again");
    }
    if (this.confinement) this.checkInside(n, await io.realPath());
    this.checkImageOwner(n, st);
  }

  close(): void {
    for (const p of this.probes.values()) p.close();
    this.probes.clear();
  }

  /** Users other than the runner whose rights bound this file: the disk's owner and the name's writer. */
  private judgedFor(n: NamedFile): Namer[] {
    const out: Namer[] = [];
    for (const who of [this.diskOwner, n.namer]) {
      if (who.uid !== this.runner && !out.some((o) => o.uid === who.uid)) out.push(who);
    }
    return out;
  }

  private async judgeFor(who: Namer, n: NamedFile, st: Judged): Promise<void> {
    const user = `uid ${who.uid}, who owns ${who.file},`;
    const rule = "and a disk may only reach files its owner could open";
    if (this.runner !== 0) {
      // Only root can ask the kernel as another user. Exact without asking: root may
      // open any regular file, and a file's owner is judged by the owner bits alone.
      if (who.uid === 0) return;
      if (Number(st.uid) === who.uid) {
        const need = n.access === "write" ? 0o600 : 0o400;
        if ((Number(st.mode) & need) === need) return;
        throw this.refuse(n, `${user} may not ${verb(n.access)} it (mode ${modeOf(st)}), ${rule}`);
      }
      throw this.refuse(
        n,
        `it belongs to uid ${st.uid}, and addcow running as uid ${this.runner} cannot tell whether ${user} may ${verb(n.access)} it; run addcow as root or as uid ${who.uid}`,
      );
    }
    let answer;
    try {
      answer = await this.probeFor(who).ask(n.file, n.access);
    } catch (err) {
      throw new AddCowError(
        `cannot check whether uid ${who.uid} may open ${n.file} (named in ${n.namer.file}): ${(err as Error).message}; addcow must run as root (with CAP_SETUID and CAP_SETGID) to open another user's disk`,
        { reason: "forbidden", file: n.file, code: "EIO", mode: n.access },
      );
    }
    log.open("%s as uid %d: %o", n.file, who.uid, answer);
    if (!answer.ok) {
      throw this.refuse(n, `${user} may not ${verb(n.access)} it (${answer.code}), ${rule}`);
    }
    if (!answer.regular) throw this.refuse(n, `${user} finds no regular file there`);
    if (answer.dev !== st.dev || answer.ino !== st.ino) {
      throw this.refuse(n, `${user} reaches another file under that name`);
    }
  }

  private probeFor(who: Namer): AccessProbe {
    let probe = this.probes.get(who.uid);
    if (!probe) {
      probe = new AccessProbe(who.uid, who.gid);
      this.probes.set(who.uid, probe);
    }
    return probe;
  }

  private checkInside(n: NamedFile, real: string): void {
    const c = this.confinement!;
    if (inside(c.dirs, real)) return;
    throw this.refuse(
      n,
      `it resolves to ${real}, outside ${c.dirs.join(" and ")}, and a confined disk's names must stay inside its directory or an allowed one (--allow-dir, -o allow_dir=)`,
    );
  }

  /** A disk writes only into an image file its owner owns. */
  private checkImageOwner(n: NamedFile, st: Judged): void {
    const owner = this.diskOwner;
    if (n.role !== "image file" || n.access !== "write" || owner.uid === this.runner) return;
    if (Number(st.uid) === owner.uid) return;
    throw this.refuse(
      n,
      `it belongs to uid ${st.uid}, not to uid ${owner.uid} who owns ${owner.file}, and a disk writes only into its owner's files`,
    );
  }

  private refuse(n: NamedFile, why: string): AddCowError {
    return new AddCowError(
      `${n.role} ${n.file} (named in ${n.namer.file}) is refused: ${why}; see docs/security.md`,
      { reason: "forbidden", file: n.file, code: "EACCES", mode: n.access },
    );
  }
}

function modeOf(st: Judged): string {
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
