/**
 * A small least-recently-used cache of values loaded asynchronously. Loads of
 * the same key share one promise; a failed load is forgotten so the next
 * request tries again (an I/O error is the affected request's, not forever).
 */
export class PromiseLru<V> {
  private readonly entries = new Map<number, Promise<V>>();

  constructor(private readonly maxEntries: number) {}

  get(key: number, load: () => Promise<V>): Promise<V> {
    const hit = this.entries.get(key);
    if (hit) {
      // Most recently used last: Map keeps insertion order.
      this.entries.delete(key);
      this.entries.set(key, hit);
      return hit;
    }
    const p = load();
    this.entries.set(key, p);
    p.catch(() => {
      if (this.entries.get(key) === p) this.entries.delete(key);
    });
    while (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next().value as number;
      this.entries.delete(oldest);
    }
    return p;
  }

  get size(): number {
    return this.entries.size;
  }
}
