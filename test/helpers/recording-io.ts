import type { FileIO, FileOpener, OpenMode } from "../../src/block/file-io";
import type { FileReplacer } from "../../src/block/replace-file";
import { FileIOWrapper } from "./file-io-wrapper";

const SECTOR = 512;

/** One completed write to one file, as the file received it. */
export interface WriteEntry {
  kind: "write";
  seq: number;
  file: string;
  pos: number;
  data: Buffer;
}

/**
 * A completed sync of one file. It makes durable every write to that file
 * logged before the sync started (seq < covers); writes that completed while
 * it ran are not counted as covered.
 */
export interface SyncEntry {
  kind: "sync";
  seq: number;
  file: string;
  covers: number;
}

/** A completed change of a file's length (ftruncate); durable like a write, with the next sync. */
export interface TruncateEntry {
  kind: "truncate";
  seq: number;
  file: string;
  length: number;
}

/**
 * A file renamed over another (FileReplacer.replace), logged once the rename
 * is durable (the directory synced): from then on `to` holds what `from` held.
 */
export interface RenameEntry {
  kind: "rename";
  seq: number;
  from: string;
  to: string;
}

/** Something the workload wants placed in the same order (write issued, acknowledged, flush...). */
export interface MarkEntry {
  kind: "mark";
  seq: number;
  label: string;
  info: Record<string, number>;
}

export type LogEntry = WriteEntry | TruncateEntry | SyncEntry | RenameEntry | MarkEntry;

/** What a crash may keep or lose: writes and size changes not yet synced. */
export type ChangeEntry = WriteEntry | TruncateEntry;

/**
 * Records every write and sync that reaches the wrapped files, across all of
 * them, in one global order, so a crash can be cut in at any point later.
 */
export class Recorder {
  readonly log: LogEntry[] = [];
  /** Paths opened read-only that something tried to write (the backing file must never be written). */
  readonly illegalWrites: string[] = [];

  mark(label: string, info: Record<string, number> = {}): number {
    const seq = this.log.length;
    this.log.push({ kind: "mark", seq, label, info });
    return seq;
  }

  wrap(inner: FileIO): FileIO {
    return new RecordingFile(inner, this);
  }

  /** A replacer whose new files are recorded and whose renames are logged. */
  replacer(inner: FileReplacer): FileReplacer {
    return {
      createBeside: async (target) => this.wrap(await inner.createBeside(target)),
      replace: async (aside, target) => {
        await inner.replace(aside, target);
        this.log.push({ kind: "rename", seq: this.log.length, from: aside.path, to: target });
      },
      discard: (aside) => inner.discard(aside),
    };
  }

  /** An opener whose files are recorded. */
  opener(inner: FileOpener): FileOpener {
    return async (path: string, mode: OpenMode) => this.wrap(await inner(path, mode));
  }

  writes(): WriteEntry[] {
    return this.log.filter((e): e is WriteEntry => e.kind === "write");
  }

  /** @internal */
  pushWrite(file: string, pos: number, data: Buffer): void {
    this.log.push({ kind: "write", seq: this.log.length, file, pos, data: Buffer.from(data) });
  }

  /** @internal */
  pushTruncate(file: string, length: number): void {
    this.log.push({ kind: "truncate", seq: this.log.length, file, length });
  }

  /** @internal */
  pushSync(file: string, covers: number): void {
    this.log.push({ kind: "sync", seq: this.log.length, file, covers });
  }
}

class RecordingFile extends FileIOWrapper {
  constructor(
    inner: FileIO,
    private readonly recorder: Recorder,
  ) {
    super(inner);
  }

  override async write(buf: Buffer, pos: number): Promise<void> {
    if (!this.inner.writable) this.recorder.illegalWrites.push(this.inner.path);
    await this.inner.write(buf, pos);
    // A disk stores whole sectors: a write into part of a sector reaches it as the whole
    // sector as the page cache holds it then. Record that, so a simulated crash can never
    // invent a mix of this write and an older version inside one sector.
    const start = Math.floor(pos / SECTOR) * SECTOR;
    const end = Math.ceil((pos + buf.length) / SECTOR) * SECTOR;
    if (start === pos && end === pos + buf.length) {
      this.recorder.pushWrite(this.inner.path, pos, buf);
    } else {
      const whole = Buffer.alloc(end - start);
      const n = await this.inner.read(whole, start);
      buf.copy(whole, pos - start);
      this.recorder.pushWrite(
        this.inner.path,
        start,
        whole.subarray(0, Math.max(n, pos + buf.length - start)),
      );
    }
  }

  override async truncate(length: number): Promise<void> {
    if (!this.inner.writable) this.recorder.illegalWrites.push(this.inner.path);
    await super.truncate(length);
    this.recorder.pushTruncate(this.inner.path, length);
  }

  override async sync(): Promise<void> {
    const covers = this.recorder.log.length;
    await this.inner.sync();
    this.recorder.pushSync(this.inner.path, covers);
  }
}
