/**
 * Range requests in flight at once, at most `slots`; the others wait in
 * order, reads before readahead, and readahead never takes the last slot (a
 * read always finds one soon). A waiting request whose deadline passes leaves
 * the queue with the `late` error instead of being sent late: a read's wait
 * is bounded from when it arrives, queued or not.
 */
export type Priority = "read" | "ahead";

/** One request's place: a read that comes to need a readahead request promotes it. */
export class Ticket {
  constructor(
    public priority: Priority,
    readonly deadline: number,
  ) {}
  /** Set by the queue while the request waits. */
  onPromote: (() => void) | null = null;

  promote(): void {
    if (this.priority === "read") return;
    this.priority = "read";
    this.onPromote?.();
  }
}

interface Waiter {
  ticket: Ticket;
  /** Arrival order: a promoted readahead request keeps its place among the reads. */
  seq: number;
  start: () => void;
  timer: NodeJS.Timeout;
}

export class RequestQueue {
  private active = 0;
  private activeAhead = 0;
  private readonly waiting: Waiter[] = [];
  private arrivals = 0;

  constructor(
    private readonly slots: number,
    private readonly late: () => Error,
  ) {}

  /** Requests waiting for a slot (for tests and info). */
  get queued(): number {
    return this.waiting.length;
  }

  async run<T>(ticket: Ticket, fn: () => Promise<T>): Promise<T> {
    const kind = await this.slot(ticket);
    try {
      return await fn();
    } finally {
      this.active--;
      if (kind === "ahead") this.activeAhead--;
      this.pump();
    }
  }

  private canStart(p: Priority): boolean {
    if (this.active >= this.slots) return false;
    return p === "read" || this.slots === 1 || this.activeAhead < this.slots - 1;
  }

  private take(p: Priority): Priority {
    this.active++;
    if (p === "ahead") this.activeAhead++;
    return p;
  }

  /** Resolves with the priority the slot was taken at. */
  private slot(ticket: Ticket): Promise<Priority> {
    const first = this.waiting[0];
    const ahead =
      first === undefined || (ticket.priority === "read" && first.ticket.priority !== "read");
    if (ahead && this.canStart(ticket.priority)) return Promise.resolve(this.take(ticket.priority));
    return new Promise<Priority>((resolve, reject) => {
      const w: Waiter = {
        ticket,
        seq: this.arrivals++,
        start: () => resolve(this.take(ticket.priority)),
        timer: setTimeout(
          () => {
            this.remove(w);
            reject(this.late());
          },
          Math.max(0, ticket.deadline - Date.now()),
        ),
      };
      ticket.onPromote = () => {
        this.remove(w);
        this.insert(w);
        this.pump();
      };
      this.insert(w);
    });
  }

  /** Reads in arrival order before every readahead request. */
  private insert(w: Waiter): void {
    if (w.ticket.priority === "ahead") {
      this.waiting.push(w);
      return;
    }
    const at = this.waiting.findIndex((x) => x.ticket.priority !== "read" || x.seq > w.seq);
    this.waiting.splice(at < 0 ? this.waiting.length : at, 0, w);
  }

  private remove(w: Waiter): void {
    const i = this.waiting.indexOf(w);
    if (i >= 0) this.waiting.splice(i, 1);
  }

  private pump(): void {
    for (;;) {
      const w = this.waiting[0];
      if (w === undefined || !this.canStart(w.ticket.priority)) return;
      this.waiting.shift();
      clearTimeout(w.timer);
      w.ticket.onPromote = null;
      w.start();
    }
  }
}
