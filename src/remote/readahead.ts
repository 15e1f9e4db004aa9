/**
 * Which reads are sequential, and how far ahead of them to fetch.
 *
 * A stream is a run of reads that continue each other: a read that starts
 * where a stream's last read ended (give or take one read's length, for
 * requests that arrive out of order) extends it. A read that continues
 * nothing starts a new stream; a few streams are followed at once (a guest
 * reads several files at a time), the least recently used is forgotten.
 * Readahead starts once a stream has read 16 pieces (Linux starts at the
 * second read, but its window starts smaller than our 64 KiB piece, and
 * read-around below covers the start of a run). Like Linux's window, a
 * stream's window grows while the stream lasts: it starts at twice the read
 * (at least `minBytes`), and each time the reader is less than half a window
 * from the end of what was fetched, the next half window is fetched and the
 * window doubles, up to `maxBytes`, but never past what the stream has read
 * so far (a stream that ends wastes at most about as much as it read).
 */
export interface ReadaheadOptions {
  /** The most fetched ahead of one stream (0: no readahead). */
  maxBytes: number;
  /** The smallest window: the fetch granularity. */
  minBytes: number;
  /** The object's size: nothing is fetched past it. */
  size: number;
}

interface Stream {
  /** Where the stream's reads started, and where the next one is expected. */
  start: number;
  next: number;
  /** Reads that continued it. */
  hits: number;
  /** The current window, and how far ahead of the stream is fetched already. */
  window: number;
  fetchedTo: number;
  used: number;
}

/** Streams followed at once (as ZFS's prefetcher follows up to 8). */
const STREAMS = 8;
/**
 * Readahead starts once a stream has read this many pieces (1 MiB by
 * default); before that, read-around (below) covers the start of a run.
 * Measured on the boot trace (BENCHMARKS.md), without read-around: starting at
 * the second read fetched 615 requests and 49.1 MiB, after 256 KiB 561 and
 * 44.4 MiB (most short runs there are files the kernel reads whole itself);
 * with read-around: after 256 KiB 316 and 59.4 MiB, after 1 MiB 310 and
 * 57.3 MiB, while 64 MiB read sequentially took 26 and 27 requests.
 */
const START_AFTER = 16;

export class SequentialDetector {
  private readonly streams: Stream[] = [];
  private clock = 0;

  constructor(private readonly opts: ReadaheadOptions) {}

  /**
   * Notes a read of [offset, offset + length); returns the range to fetch
   * ahead of it now, or null.
   */
  observe(offset: number, length: number): { start: number; end: number } | null {
    const end = offset + length;
    this.clock++;
    const s = this.streams.find((x) => offset >= x.next - length && offset <= x.next + length);
    if (s === undefined) {
      const inside = this.streams.find((x) => offset >= x.start && end <= x.next);
      // A straggler inside a stream (it arrived after the reads behind it) starts nothing.
      if (inside) inside.used = this.clock;
      else this.begin(offset, end);
      return null;
    }
    s.used = this.clock;
    if (end <= s.next) return null;
    s.next = end;
    s.hits++;
    if (this.opts.maxBytes <= 0) return null;
    const readSoFar = s.next - s.start;
    if (readSoFar < START_AFTER * this.opts.minBytes) return null;
    const cap = Math.min(this.opts.maxBytes, Math.max(this.opts.minBytes, readSoFar));
    let from: number;
    let to: number;
    if (s.window === 0) {
      s.window = Math.min(cap, Math.max(this.opts.minBytes, 2 * length));
      from = s.next;
      to = s.next + s.window;
    } else if (s.fetchedTo - s.next < s.window / 2) {
      // Half the window is used: the next half-window goes out (one request
      // each time at full size), and the window grows.
      s.window = Math.min(cap, 2 * s.window);
      from = Math.max(s.fetchedTo, s.next);
      to = Math.max(from + s.window / 2, s.next + s.window / 2);
    } else {
      return null;
    }
    to = Math.min(this.opts.size, to);
    s.fetchedTo = Math.max(s.fetchedTo, to);
    return to > from ? { start: from, end: to } : null;
  }

  private begin(start: number, next: number): void {
    const stream: Stream = { start, next, hits: 0, window: 0, fetchedTo: next, used: this.clock };
    if (this.streams.length < STREAMS) {
      this.streams.push(stream);
      return;
    }
    let oldest = 0;
    for (let i = 1; i < this.streams.length; i++) {
      if (this.streams[i]!.used < this.streams[oldest]!.used) oldest = i;
    }
    this.streams[oldest] = stream;
  }
}

/**
 * Read-around for misses, with feedback, as Linux does for page faults
 * outside a stream (its mmap_miss count): a miss also fetches the next few
 * pieces after it, in the same request, as long as such speculative pieces
 * get read. Every miss adds 1 to a score, every speculative piece that is
 * then read takes `gain` off; above `limit` misses fetch only themselves, so
 * random reads soon stop paying for pieces nobody reads. Measured on the boot
 * trace (BENCHMARKS.md), with a cache: a miss alone 561 requests and 44.4 MiB,
 * 1 piece after it 449 and 48.8 MiB, 2 pieces 310 and 57.3 MiB, 3 pieces 271
 * and 63.7 MiB (over 1.5x what the trace reads counted in 64 KiB pieces);
 * 1024 random 4 KiB reads cost 8% more bytes with 2 pieces than with none.
 */
export class ReadAround {
  private score = 0;
  /** Pieces fetched speculatively and not read yet (oldest first, bounded). */
  private readonly speculative = new Set<number>();

  constructor(
    /** Pieces fetched after a miss while the score allows it. */
    private readonly pieces: number,
    private readonly limit = 32,
    private readonly gain = 2,
  ) {}

  /** Piece p is being read. */
  read(p: number): void {
    if (this.speculative.delete(p)) this.score = Math.max(0, this.score - this.gain);
  }

  /** A read missed: how many pieces after it to fetch with it. */
  missed(): number {
    this.score++;
    return this.score <= this.limit ? this.pieces : 0;
  }

  /** Piece p is fetched without a read asking for it. */
  fetched(p: number): void {
    this.speculative.add(p);
    if (this.speculative.size > 4096) {
      this.speculative.delete(this.speculative.values().next().value as number);
    }
  }
}
