import * as fs from "node:fs";
import { promisify } from "node:util";
import { findHoles } from "../os/holes";
import { type LockKind, lockDescriptor } from "../os/file-lock";
import { O_PATH } from "../os/path-walk";

const fdatasyncAsync = promisify(fs.fdatasync);
const preadAsync = promisify(fs.read);
const pwriteAsync = promisify(fs.write);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat);
const ftruncateAsync = promisify(fs.ftruncate);

const RESOLVED = Promise.resolve();

/**
 * The seam under every block device: positional I/O on one underlying file.
 * Tests wrap it to record writes and syncs (crash simulation), inject faults
 * or add delays; the engine never touches `fs` directly.
 */
export interface FileIO {
  readonly path: string;
  readonly writable: boolean;
  /** Reads up to buf.length bytes at pos; returns the count (short only at end of file). */
  read(buf: Buffer, pos: number): Promise<number>;
  /** Writes all of buf at pos. */
  write(buf: Buffer, pos: number): Promise<void>;
  /** fdatasync: every write that completed before the call is durable when it resolves. */
  sync(): Promise<void>;
  /** Current length of the file in bytes. */
  size(): Promise<number>;
  /**
   * Sets the file's length (ftruncate): bytes past the old end read as zeros
   * (a hole). Durable with the next sync().
   */
  truncate(length: number): Promise<void>;
  /**
   * The holes (ranges that read as zeros without blocks on disk) inside
   * [start, end), in order. Empty: none known, every byte may be data.
   */
  holes(start: number, end: number): Array<[number, number]>;
  /**
   * The open file's identity and attributes (fstat): what was opened, whatever
   * its name leads to now. Files that exist only in memory (tests) throw.
   */
  stat(): fs.BigIntStats;
  /** Where the kernel says the open file is (its real path), for confinement. */
  realPath(): Promise<string>;
  /**
   * Takes a non-blocking flock, shared or exclusive; a file held by another
   * process refuses with an error naming it (`role` says what the file is).
   */
  lock(kind: LockKind, role: string): void;
  close(): Promise<void>;
}

export type OpenMode = "read" | "write";

/** A file's fstat, or null when it has none (a file in memory) or fstat fails. */
export function statOf(file: FileIO): fs.BigIntStats | null {
  try {
    return file.stat();
  } catch {
    return null;
  }
}
/**
 * How files get opened; the default is {@link openPosixFile}, tests pass their own.
 * `at`, when given, names exactly the file to open (`/proc/self/fd/N` of its
 * judged O_PATH descriptor); `path` is then its name for messages only.
 */
export type FileOpener = (path: string, mode: OpenMode, at?: string) => Promise<FileIO>;

/**
 * Page-cache-hot I/O is 3-4x cheaper done synchronously on the JS thread than
 * through libuv's thread pool; a cold read then blocks every other request.
 * "sync" is the default for reads and writes; fdatasync always goes to the pool
 * because it waits for the device and must not stall the daemon.
 */
export type IoStyle = "sync" | "async";

const defaultIoStyle: IoStyle = process.env.ADDCOW_IO === "async" ? "async" : "sync";

/** A real file on disk. */
export class PosixFile implements FileIO {
  private closed = false;

  constructor(
    readonly path: string,
    readonly fd: number,
    readonly writable: boolean,
    private readonly style: IoStyle = defaultIoStyle,
  ) {}

  read(buf: Buffer, pos: number): Promise<number> {
    if (this.style === "async") return this.readAsync(buf, pos);
    // Not an async function: a page-cache hit then costs no extra promise tick.
    try {
      return Promise.resolve(this.readSync(buf, pos));
    } catch (err) {
      return Promise.reject(err);
    }
  }

  write(buf: Buffer, pos: number): Promise<void> {
    if (this.style === "async") return this.writeAsync(buf, pos).catch((err) => this.named(err));
    try {
      this.writeSync(buf, pos);
      return RESOLVED;
    } catch (err) {
      return this.named(err);
    }
  }

  /** Errors of fd-based calls name no file; name ours, so messages can say which is full. */
  private named(err: unknown): Promise<never> {
    if (err && typeof err === "object" && !("path" in err)) {
      Object.assign(err, { path: this.path });
    }
    return Promise.reject(err);
  }

  private readSync(buf: Buffer, pos: number): number {
    let done = 0;
    while (done < buf.length) {
      const n = fs.readSync(this.fd, buf, done, buf.length - done, pos + done);
      if (n === 0) break;
      done += n;
    }
    return done;
  }

  private async readAsync(buf: Buffer, pos: number): Promise<number> {
    let done = 0;
    while (done < buf.length) {
      const { bytesRead } = await preadAsync(this.fd, buf, done, buf.length - done, pos + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return done;
  }

  private writeSync(buf: Buffer, pos: number): void {
    let done = 0;
    while (done < buf.length) {
      done += fs.writeSync(this.fd, buf, done, buf.length - done, pos + done);
    }
  }

  private async writeAsync(buf: Buffer, pos: number): Promise<void> {
    let done = 0;
    while (done < buf.length) {
      const { bytesWritten } = await pwriteAsync(this.fd, buf, done, buf.length - done, pos + done);
      done += bytesWritten;
    }
  }

  sync(): Promise<void> {
    return fdatasyncAsync(this.fd).catch((err) => this.named(err));
  }

  async size(): Promise<number> {
    return (await fstatAsync(this.fd)).size;
  }

  truncate(length: number): Promise<void> {
    return ftruncateAsync(this.fd, length).catch((err) => this.named(err));
  }

  holes(start: number, end: number): Array<[number, number]> {
    return findHoles(this.fd, start, end);
  }

  stat(): fs.BigIntStats {
    return fs.fstatSync(this.fd, { bigint: true });
  }

  realPath(): Promise<string> {
    return fs.promises.readlink(`/proc/self/fd/${this.fd}`);
  }

  lock(kind: LockKind, role: string): void {
    lockDescriptor(this.fd, this.path, kind, role);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await closeAsync(this.fd);
  }
}

const openAsync = promisify(fs.open);

/**
 * Opens an existing regular file for I/O and returns its descriptor. The name
 * is looked up once, as an O_PATH descriptor, which opens nothing (no FIFO
 * waits for a writer, no device sees an open); only when fstat of that
 * descriptor shows a regular file is the same inode opened for I/O through
 * /proc/self/fd, so a name swapped for something else meanwhile cannot be
 * what gets opened. "read" opens are O_RDONLY so a backing file can never be modified.
 */
export async function openRegularFile(path: string, mode: OpenMode): Promise<number> {
  const pathFd = await openAsync(path, O_PATH);
  try {
    const st = await fstatAsync(pathFd);
    if (!st.isFile()) {
      throw Object.assign(new Error(`${path} is not a regular file`), { code: "EFTYPE" });
    }
    return await openAsync(`/proc/self/fd/${pathFd}`, mode === "write" ? "r+" : "r");
  } finally {
    await closeAsync(pathFd);
  }
}

/** Opens an existing regular file (see {@link openRegularFile}), at `at` when given. */
export const openPosixFile: FileOpener = async (path, mode, at) =>
  new PosixFile(path, await openRegularFile(at ?? path, mode), mode === "write");
