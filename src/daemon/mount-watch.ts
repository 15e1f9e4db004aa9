import { type MountEntry, readMountTableAsync } from "../os/mount-table";
import { describeError } from "../util/errors";
import { log } from "../util/log";

/**
 * Reads the mount table every few hundred milliseconds for the mounts that
 * want to know when they were unmounted from outside (FUSE does not tell a
 * daemon about `fusermount -u`). One reader for every mount of a process: a
 * host daemon with a hundred disks reads /proc/self/mountinfo once per
 * round, not a hundred times. The timer runs while someone watches.
 */
export class MountWatch {
  private timer: NodeJS.Timeout | null = null;
  private readonly watchers = new Set<(table: MountEntry[]) => void>();
  private reading = false;

  constructor(private readonly intervalMs = 200) {}

  /** Calls fn with the mount table every round until the returned function is called. */
  watch(fn: (table: MountEntry[]) => void): () => void {
    this.watchers.add(fn);
    this.timer ??= setInterval(() => this.round(), this.intervalMs);
    return () => {
      this.watchers.delete(fn);
      if (this.watchers.size === 0 && this.timer) {
        clearInterval(this.timer);
        this.timer = null;
      }
    };
  }

  private round(): void {
    if (this.reading) return;
    this.reading = true;
    readMountTableAsync()
      .then(
        (table) => {
          for (const fn of [...this.watchers]) fn(table);
        },
        (err: unknown) => log.daemon("reading the mount table: %s", describeError(err)),
      )
      .finally(() => (this.reading = false));
  }
}
