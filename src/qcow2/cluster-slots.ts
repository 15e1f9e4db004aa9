/**
 * Decompressed clusters of one image, for reads inside a cluster that was
 * just decompressed (a reader going through it in small requests): slots of
 * one buffer, reused least recently used first. A reader finds or fills a slot
 * and copies out of it in one synchronous step, so no slot is reused while it
 * is being read, and no buffer is allocated per cluster (native-decoder.ts
 * says why that matters).
 */
export class ClusterSlots {
  private slab: Buffer | null = null;
  /** Key (guest offset of the cluster) -> slot index; Map order is least recently used first. */
  private readonly slots = new Map<number, number>();
  private readonly free: number[];

  constructor(
    private readonly clusterSize: number,
    count: number,
  ) {
    this.free = Array.from({ length: count }, (_, i) => count - 1 - i);
  }

  /** The cluster's slot when it holds that cluster, now the most recently used. */
  get(key: number): Buffer | undefined {
    const i = this.slots.get(key);
    if (i === undefined) return undefined;
    this.slots.delete(key);
    this.slots.set(key, i);
    return this.slot(i);
  }

  /** A slot for the cluster, to fill now: its own, a free one, else the least recently used. */
  claim(key: number): Buffer {
    let i = this.slots.get(key) ?? this.free.pop();
    if (i === undefined) {
      const [oldest, index] = this.slots.entries().next().value as [number, number];
      this.slots.delete(oldest);
      i = index;
    }
    this.slots.delete(key);
    this.slots.set(key, i);
    return this.slot(i);
  }

  /** Forgets a cluster whose slot could not be filled. */
  drop(key: number): void {
    const i = this.slots.get(key);
    if (i === undefined) return;
    this.slots.delete(key);
    this.free.push(i);
  }

  private slot(i: number): Buffer {
    this.slab ??= Buffer.allocUnsafe(this.clusterSize * (this.slots.size + this.free.length));
    return this.slab.subarray(i * this.clusterSize, (i + 1) * this.clusterSize);
  }
}
