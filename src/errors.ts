/**
 * The one error type users see. Its message is a complete, single line:
 * what is wrong, in which file and field, and what to do about it.
 * Anything else that escapes is a bug (or a raw I/O error carrying an errno code).
 */
export class AddCowError extends Error {
  /** errno-style code for the FUSE layer (EIO, EROFS, EBUSY, ...), when one fits. */
  readonly code: string | undefined;
  /** The file the problem is in, when there is one. */
  readonly file: string | undefined;

  constructor(message: string, options: { code?: string; file?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = "AddCowError";
    this.code = options.code;
    this.file = options.file;
  }
}

/** Node system errors carry an errno code such as 'EIO' or 'ENOSPC'. */
export function errnoCode(err: unknown): string | undefined {
  if (err && typeof err === "object" && "code" in err && typeof err.code === "string") {
    return err.code;
  }
  return undefined;
}

/** One line for a user, whatever was thrown. */
export function describeError(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return text.split("\n")[0] ?? text;
}
