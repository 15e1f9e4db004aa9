import type * as fs from "node:fs";
import type { FileIO } from "../../src/block/file-io";
import type { LockKind } from "../../src/os/file-lock";

/**
 * A FileIO that passes everything to another one. Test wrappers (faults,
 * recording) extend it and override only the operations they change.
 */
export class FileIOWrapper implements FileIO {
  constructor(protected readonly inner: FileIO) {}

  get path(): string {
    return this.inner.path;
  }
  get writable(): boolean {
    return this.inner.writable;
  }

  read(buf: Buffer, pos: number): Promise<number> {
    return this.inner.read(buf, pos);
  }
  write(buf: Buffer, pos: number): Promise<void> {
    return this.inner.write(buf, pos);
  }
  sync(): Promise<void> {
    return this.inner.sync();
  }
  size(): Promise<number> {
    return this.inner.size();
  }
  truncate(length: number): Promise<void> {
    return this.inner.truncate(length);
  }
  holes(start: number, end: number): Array<[number, number]> {
    return this.inner.holes(start, end);
  }
  stat(): fs.BigIntStats {
    return this.inner.stat();
  }
  realPath(): Promise<string> {
    return this.inner.realPath();
  }
  lock(kind: LockKind, role: string): void {
    this.inner.lock(kind, role);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** `inner` with some operations replaced (the replacements may call `inner` themselves). */
export function overriding(inner: FileIO, ops: Partial<Omit<FileIO, "path" | "writable">>): FileIO {
  return Object.assign(new FileIOWrapper(inner), ops);
}
