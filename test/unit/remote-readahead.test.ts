/**
 * The sequential detector and the request queue on their own: which reads
 * count as a stream, how its window grows and what it can waste; reads
 * before readahead, a bounded wait in the queue.
 */
import { describe, expect, it } from "vitest";
import { ReadAround, SequentialDetector } from "../../src/remote/readahead";
import { RequestQueue, Ticket } from "../../src/remote/request-queue";

const KiB = 1024;
const MiB = 1024 * KiB;

function detector(maxBytes = 8 * MiB, size = 1 << 30) {
  return new SequentialDetector({ maxBytes, minBytes: 64 * KiB, size });
}

/** Feeds reads; returns the ranges asked for ahead. */
function feed(d: SequentialDetector, reads: Array<[number, number]>) {
  const out: Array<{ start: number; end: number }> = [];
  for (const [off, len] of reads) {
    const r = d.observe(off, len);
    if (r) out.push(r);
  }
  return out;
}

function sequential(from: number, bytes: number, len: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let off = from; off < from + bytes; off += len) out.push([off, len]);
  return out;
}

describe("the sequential detector", () => {
  it("random reads and unrelated reads in one block are no stream", () => {
    const d = detector();
    let seed = 9;
    const reads: Array<[number, number]> = [];
    for (let i = 0; i < 2000; i++) {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      reads.push([(seed % 262144) * 4096, 4096]);
    }
    expect(feed(d, reads)).toEqual([]);
    expect(
      feed(detector(), [
        [20 * MiB, 4096],
        [20 * MiB + 512 * KiB, 4096],
        [20 * MiB + 8192, 4096],
      ]),
    ).toEqual([]);
  });

  it("a stream gets readahead after 1 MiB, windows that grow to the maximum, never more ahead than it read", () => {
    const d = detector(8 * MiB);
    const from = 100 * MiB;
    let fetchedTo = 0;
    let last = 0;
    const sizes: number[] = [];
    for (const [off, len] of sequential(from, 64 * MiB, 4096)) {
      const r = d.observe(off, len);
      if (!r) continue;
      expect(off + len).toBeGreaterThanOrEqual(from + MiB);
      expect(r.start).toBeGreaterThanOrEqual(Math.max(fetchedTo, off + len));
      fetchedTo = r.end;
      // Never further ahead than the stream has read, nor than the maximum.
      expect(r.end - (off + len)).toBeLessThanOrEqual(Math.min(8 * MiB, off + len - from));
      expect(r.end - r.start).toBeGreaterThanOrEqual(last / 2);
      last = r.end - r.start;
      sizes.push(last);
    }
    expect(Math.max(...sizes)).toBe(4 * MiB); // half the 8 MiB window at a time
    expect(sizes.length).toBeLessThan(40); // 64 MiB in 4 KiB reads: 16384 reads
    expect(fetchedTo).toBeGreaterThanOrEqual(from + 64 * MiB);
  });

  it("nothing past the end of the object; ADDCOW_REMOTE_READAHEAD=0 is none", () => {
    const d = detector(8 * MiB, 3 * MiB);
    const ranges = feed(d, sequential(0, 3 * MiB, 128 * KiB));
    expect(Math.max(...ranges.map((r) => r.end))).toBeLessThanOrEqual(3 * MiB);
    expect(feed(detector(0), sequential(0, 16 * MiB, 128 * KiB))).toEqual([]);
  });

  it("reads of a stream that arrive out of order, and several streams at once, are followed", () => {
    const d = detector();
    const reads: Array<[number, number]> = [];
    for (let i = 0; i < 64; i += 4)
      for (const k of [1, 0, 3, 2]) reads.push([(i + k) * 128 * KiB, 128 * KiB]);
    expect(feed(d, reads).length).toBeGreaterThan(0);
    // 8 streams interleaved: each gets readahead.
    const many = detector();
    const starts = Array.from({ length: 8 }, (_, s) => s * 64 * MiB);
    const got = new Set<number>();
    for (let step = 0; step < 32; step++) {
      for (const s of starts) {
        const r = many.observe(s + step * 64 * KiB, 64 * KiB);
        if (r) got.add(Math.floor(r.start / (64 * MiB)));
      }
    }
    expect(got.size).toBe(8);
  });
});

describe("read-around", () => {
  it("read-around: a miss fetches 2 pieces after it while they get read, none once they stop being read", () => {
    const a = new ReadAround(2);
    // Misses whose speculative pieces are read: it stays on.
    for (let i = 0; i < 100; i++) {
      expect(a.missed()).toBe(2);
      a.fetched(3 * i + 1);
      a.fetched(3 * i + 2);
      a.read(3 * i + 1);
      a.read(3 * i + 2);
    }
    // Misses whose pieces nobody reads: off after at most 32 more.
    let on = 0;
    for (let i = 0; i < 100; i++) {
      if (a.missed() > 0) on++;
      a.fetched(10_000 + i);
    }
    expect(on).toBeLessThanOrEqual(32);
    expect(a.missed()).toBe(0);
  });
});

describe("the request queue", () => {
  const late = () => new Error("late");

  it("reads go before waiting readahead; readahead never takes the last slot", async () => {
    const q = new RequestQueue(2, late);
    const order: string[] = [];
    const gates: Array<() => void> = [];
    const job = (name: string) => () =>
      new Promise<void>((resolve) => {
        order.push(name);
        gates.push(resolve);
      });
    const far = Date.now() + 60_000;
    const runs = [
      q.run(new Ticket("ahead", far), job("ahead1")),
      q.run(new Ticket("ahead", far), job("ahead2")), // waits: the last slot is for reads
      q.run(new Ticket("read", far), job("read1")),
      q.run(new Ticket("read", far), job("read2")), // waits for a slot
    ];
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual(["ahead1", "read1"]);
    gates.shift()!(); // ahead1 done: read2 goes before ahead2
    await new Promise((r) => setImmediate(r));
    expect(order).toEqual(["ahead1", "read1", "read2"]);
    while (gates.length) {
      gates.shift()!();
      await new Promise((r) => setImmediate(r));
    }
    await Promise.all(runs);
    expect(order).toEqual(["ahead1", "read1", "read2", "ahead2"]);
  });

  it("a waiting request whose deadline passes leaves the queue with the late error; a promoted one moves up", async () => {
    const q = new RequestQueue(1, late);
    let release!: () => void;
    const busy = q.run(
      new Ticket("read", Date.now() + 60_000),
      () => new Promise<void>((r) => (release = r)),
    );
    const t0 = Date.now();
    const timedOut = q.run(new Ticket("read", Date.now() + 200), () => Promise.resolve("sent"));
    await expect(timedOut).rejects.toThrow("late");
    expect(Date.now() - t0).toBeLessThan(2000);
    const order: string[] = [];
    const ahead = new Ticket("ahead", Date.now() + 60_000);
    const a = q.run(ahead, async () => void order.push("ahead"));
    const r = q.run(new Ticket("read", Date.now() + 60_000), async () => void order.push("read"));
    ahead.promote(); // a read now needs it: it goes first
    release();
    await Promise.all([busy, a, r]);
    expect(order).toEqual(["ahead", "read"]);
    expect(q.queued).toBe(0);
  });
});
