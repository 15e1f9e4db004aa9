/**
 * Exclusive locks on ranges of clusters. Held only while clusters are being
 * allocated (copy-on-write or a block job's copy), so two first writes to the
 * same cluster, or a write racing a stream copy, never interleave. Writes to
 * clusters already allocated never take it.
 */
interface Held {
  start: number;
  end: number;
  released: Promise<void>;
  release: () => void;
}

export class RangeLock {
  private readonly held = new Set<Held>();

  get size(): number {
    return this.held.size;
  }

  /** Waits until [start, end) overlaps no held range, then holds it. */
  async acquire(start: number, end: number): Promise<() => void> {
    for (;;) {
      const blocker = this.findOverlap(start, end);
      if (!blocker) break;
      await blocker.released;
    }
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const h: Held = { start, end, released, release };
    this.held.add(h);
    return () => {
      this.held.delete(h);
      h.release();
    };
  }

  /** True when some held range overlaps [start, end). */
  isLocked(start: number, end: number): boolean {
    return this.findOverlap(start, end) !== undefined;
  }

  private findOverlap(start: number, end: number): Held | undefined {
    for (const h of this.held) {
      if (h.start < end && start < h.end) return h;
    }
    return undefined;
  }
}
