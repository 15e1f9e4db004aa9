/**
 * Why an operation failed, for code that decides what to do next. Logic reads
 * these fields; the message is for people only and may be reworded freely.
 */
export type ErrorReason =
  /** A header field (or table) holds a value the format does not allow: see field, offset. */
  | "bad-field"
  /** Another process holds the file's lock: see pid (when known). */
  | "locked"
  /** A file of the disk cannot be opened (missing, permission, kind): see file, mode. */
  | "cannot-open"
  /** A name in a header is not allowed to reach the file it names (security rules). */
  | "forbidden"
  /** The backing chain loops or is too deep. */
  | "chain"
  /** A remote backing answered with an error, or not at all. */
  | "remote"
  /** The request does not fit the disk (outside its size, wrong state for the job). */
  | "invalid"
  /**
   * A data sync of the disk failed: writes since the last good flush may be
   * lost, and every later flush fails until the disk is opened again.
   */
  | "sync-failed"
  /** The file system holding `file` is full (ENOSPC, EDQUOT). */
  | "no-space"
  /** A backing is not the one the disk's pin names (docs/specs/add-cow.md, "The backing pin"). */
  | "changed-backing";

export interface ErrorFields {
  /** errno-style code for the FUSE layer and exit decisions (EIO, EROFS, EBUSY, ...). */
  code?: string;
  reason?: ErrorReason;
  /** The file (or URL) the problem is in. */
  file?: string;
  /** The header field or table entry at fault. */
  field?: string;
  /** Byte offset of the problem inside `file`. */
  offset?: number;
  /** The process holding a lock. */
  pid?: number;
  /** How the file was being opened. */
  mode?: "read" | "write";
  /** The fact alone, without the file name or advice (addcow check lists it). */
  detail?: string;
  cause?: unknown;
}

/**
 * The one error type users see. Its message is a complete, single line:
 * what is wrong, in which file and field, and what to do about it; its
 * fields carry the same facts as data. Anything else that escapes is a bug
 * (or a raw I/O error carrying an errno code).
 */
export class AddCowError extends Error {
  readonly code: string | undefined;
  readonly reason: ErrorReason | undefined;
  readonly file: string | undefined;
  readonly field: string | undefined;
  readonly offset: number | undefined;
  readonly pid: number | undefined;
  readonly mode: "read" | "write" | undefined;
  readonly detail: string | undefined;

  constructor(message: string, fields: ErrorFields = {}) {
    super(message, fields.cause === undefined ? undefined : { cause: fields.cause });
    this.name = "AddCowError";
    this.code = fields.code;
    this.reason = fields.reason;
    this.file = fields.file;
    this.field = fields.field;
    this.offset = fields.offset;
    this.pid = fields.pid;
    this.mode = fields.mode;
    this.detail = fields.detail;
  }
}

/**
 * The one error for a change to a layer that is open read-only; `why` says
 * what needed the change, `role` what the file is ("backing file").
 */
export function readOnlyError(file: string, why?: string, role?: string): AddCowError {
  const what = role ? `${role} ${file}` : file;
  return new AddCowError(`${what} is open read-only${why ? `; ${why}` : ""}`, {
    code: "EROFS",
    file,
  });
}

/** Node system errors carry an errno code such as 'EIO' or 'ENOSPC'. */
export function errnoCode(err: unknown): string | undefined {
  if (err && typeof err === "object" && "code" in err && typeof err.code === "string") {
    return err.code;
  }
  return undefined;
}

/** ENOSPC, or the user's quota (EDQUOT): either way the file system has no room. */
export function isNoSpace(err: unknown): boolean {
  const code = errnoCode(err);
  return code === "ENOSPC" || code === "EDQUOT";
}

/** The file a system error names (`path`), if it names one. */
export function errorPath(err: unknown): string | undefined {
  if (err && typeof err === "object" && "path" in err && typeof err.path === "string") {
    return err.path;
  }
  return undefined;
}

const DOING: Record<string, string> = {
  read: "reading",
  write: "writing",
  fdatasync: "syncing",
  fsync: "syncing",
  ftruncate: "resizing",
  open: "opening",
  close: "closing",
};

/**
 * One line for a user, whatever was thrown. A system error of a call on a
 * descriptor ("ENOSPC: no space left on device, write") does not say which
 * file; when the error carries it (PosixFile adds `path`), the line does:
 * "writing /vm/disk.raw failed: no space left on device (ENOSPC)".
 */
export function describeError(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  const line = text.split("\n")[0] ?? text;
  const file = errorPath(err);
  const code = errnoCode(err);
  if (file === undefined || code === undefined || line.includes(file)) return line;
  const m = /^([A-Z0-9_]+): (.*?)(?:, (\w+))?$/.exec(line);
  if (!m || m[1] !== code) return `${line} (${file})`;
  const doing = m[3] ? (DOING[m[3]] ?? `${m[3]} of`) : "using";
  return `${doing} ${file} failed: ${m[2]} (${code})`;
}
