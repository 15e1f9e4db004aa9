/**
 * The expected content of a disk, kept per 4 KiB page so that huge sparse disks
 * cost memory only for what the test wrote. Pages never written read as the
 * baseline (the backing content, zeros past its end).
 */
const PAGE = 4096;

export class SparseModel {
  private readonly pages = new Map<number, Buffer>();

  constructor(
    readonly size: number,
    private readonly baseline: (buf: Buffer, offset: number) => void,
  ) {}

  private page(index: number): Buffer {
    let p = this.pages.get(index);
    if (!p) {
      p = Buffer.alloc(PAGE);
      this.baseline(p, index * PAGE);
      this.pages.set(index, p);
    }
    return p;
  }

  write(data: Buffer, offset: number): void {
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const p = this.page(Math.floor(pos / PAGE));
      const n = Math.min(PAGE - (pos % PAGE), data.length - done);
      data.copy(p, pos % PAGE, done, done + n);
      done += n;
    }
  }

  read(length: number, offset: number): Buffer {
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const idx = Math.floor(pos / PAGE);
      const n = Math.min(PAGE - (pos % PAGE), length - done);
      const p = this.pages.get(idx);
      if (p) p.copy(out, done, pos % PAGE, (pos % PAGE) + n);
      else this.baseline(out.subarray(done, done + n), pos);
      done += n;
    }
    return out;
  }

  /** Offsets of pages that differ from the baseline (written at least once). */
  writtenPages(): number[] {
    return [...this.pages.keys()].map((i) => i * PAGE);
  }
}

/** Baseline for a backing disk held in memory: its bytes, then zeros. */
export function bufferBaseline(backing: Buffer | null): (buf: Buffer, offset: number) => void {
  return (buf, offset) => {
    buf.fill(0);
    if (!backing || offset >= backing.length) return;
    backing.copy(buf, 0, offset, Math.min(backing.length, offset + buf.length));
  };
}
