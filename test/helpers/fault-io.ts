import type { FileIO, FileOpener, OpenMode } from "../../src/block/file-io";
import { FileIOWrapper } from "./file-io-wrapper";

export type FaultOp = "read" | "write" | "sync";
export type FaultCode = "EIO" | "ENOSPC";

export interface FaultRule {
  /** Which file: a path, or the end of one ("disk.raw", "base.raw"). */
  file: string;
  op: FaultOp;
  code: FaultCode;
  /** Fail the n-th such operation on that file counted from now (1 = the next one). */
  nth?: number;
  /** How many operations fail from then on; default every one until cleared. */
  times?: number;
  /** For writes: let about the first half (whole sectors) reach the file before failing. */
  partial?: boolean;
}

const ERRNO: Record<FaultCode, number> = { EIO: -5, ENOSPC: -28 };

/** An error shaped like the one Node's fs gives for a failed system call. */
export function ioError(code: FaultCode, syscall: string, path: string): NodeJS.ErrnoException {
  const text = code === "EIO" ? "i/o error" : "no space left on device";
  return Object.assign(new Error(`${code}: ${text}, ${syscall} (injected) '${path}'`), {
    code,
    errno: ERRNO[code],
    syscall,
    path,
  });
}

interface Armed extends Required<Omit<FaultRule, "partial">> {
  partial: boolean;
  seen: number;
  failed: number;
}

/**
 * Makes chosen operations on chosen files fail with EIO or ENOSPC, and can be
 * cleared again, so tests can check what a writer, a reader or a flush is told
 * and that the disk holds no half-state once the fault is gone.
 */
export class FaultInjector {
  private rules: Armed[] = [];
  /** Every fault injected so far, as "op path code". */
  readonly injected: string[] = [];
  /** Operations seen per "op path", for tests that want to aim at the n-th one. */
  readonly counts = new Map<string, number>();
  /** Called before every operation is judged (the daemon hook reloads its rules there). */
  beforeCheck?: () => void;

  arm(rule: FaultRule): void {
    this.rules.push({
      nth: 1,
      times: Infinity,
      ...rule,
      partial: rule.partial ?? false,
      seen: 0,
      failed: 0,
    });
  }

  clear(): void {
    this.rules = [];
  }

  wrap(inner: FileIO): FileIO {
    return new FaultyFile(inner, this);
  }

  opener(inner: FileOpener): FileOpener {
    return async (path: string, mode: OpenMode) => this.wrap(await inner(path, mode));
  }

  /** @internal Returns the rule that fails this operation, if any. */
  check(op: FaultOp, path: string): Armed | undefined {
    this.beforeCheck?.();
    const key = `${op} ${path}`;
    this.counts.set(key, (this.counts.get(key) ?? 0) + 1);
    for (const r of this.rules) {
      if (r.op !== op || !(path === r.file || path.endsWith(`/${r.file}`))) continue;
      r.seen++;
      if (r.seen >= r.nth && r.failed < r.times) {
        r.failed++;
        this.injected.push(`${op} ${path} ${r.code}`);
        return r;
      }
    }
    return undefined;
  }
}

class FaultyFile extends FileIOWrapper {
  constructor(
    inner: FileIO,
    private readonly faults: FaultInjector,
  ) {
    super(inner);
  }

  override async read(buf: Buffer, pos: number): Promise<number> {
    const r = this.faults.check("read", this.path);
    if (r) throw ioError(r.code, "read", this.path);
    return this.inner.read(buf, pos);
  }

  override async write(buf: Buffer, pos: number): Promise<void> {
    const r = this.faults.check("write", this.path);
    if (r) {
      if (r.partial) {
        // A short write stops at a sector boundary, about half way.
        const cut = Math.floor((pos + buf.length / 2) / 512) * 512 - pos;
        if (cut > 0) await this.inner.write(buf.subarray(0, cut), pos);
      }
      throw ioError(r.code, "write", this.path);
    }
    return this.inner.write(buf, pos);
  }

  override async sync(): Promise<void> {
    const r = this.faults.check("sync", this.path);
    if (r) throw ioError(r.code, "fdatasync", this.path);
    return this.inner.sync();
  }
}
