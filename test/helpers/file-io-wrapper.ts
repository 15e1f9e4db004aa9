import type { FileIO } from "../../src/block/file-io";

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
  get fd(): number | undefined {
    return this.inner.fd;
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
    if (!this.inner.truncate) throw new Error(`${this.path} cannot change size`);
    return this.inner.truncate(length);
  }
  holes(start: number, end: number): Array<[number, number]> {
    return this.inner.holes ? this.inner.holes(start, end) : [];
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}
