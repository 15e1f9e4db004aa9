/**
 * Runs a flush so that every caller gets a flush that started after its call,
 * while concurrent callers share one: at most one runs and at most one waits.
 */
export class FlushCoalescer {
  private running: Promise<void> | null = null;
  private queued: Promise<void> | null = null;

  constructor(private readonly doFlush: () => Promise<void>) {}

  flush(): Promise<void> {
    if (!this.running) {
      this.running = this.doFlush().finally(() => {
        this.running = null;
      });
      return this.running;
    }
    if (!this.queued) {
      this.queued = this.running
        .catch(() => undefined)
        .then(() => {
          this.queued = null;
          return this.flush();
        });
    }
    return this.queued;
  }
}
