import type { LogEntry } from "./recording-io";
import type { BlockDevice } from "../../src/block/block-device";
import { SECTOR } from "./power-loss";

/** One version of a sector: its bytes after some write (writeId -1: the disk before any write). */
interface Version {
  writeId: number;
  value: Buffer;
}

interface WriteInfo {
  id: number;
  offset: number;
  length: number;
  /** Log positions of the marks placed when the write was issued and acknowledged. */
  issued: number;
  acked: number;
}

export interface Violation {
  point: number;
  sector: number;
  offset: number;
  message: string;
}

/**
 * What the disk may hold after a crash, sector by sector. Writes in flight at
 * the same time must not share a sector, so each sector's versions form one
 * sequence. At a crash point, a sector may hold the version of the newest write
 * made durable by a completed flush (or the original), or any newer version
 * whose write was issued before the crash (promises 1 and 2 of the crash-safety
 * promise). A flush that fails promises nothing and takes nothing back: a later
 * flush that succeeds still covers every write acknowledged before it started
 * (the engine keeps the bits it could not write, and after a failed data sync
 * it lets no flush succeed again).
 */
export class DiskModel {
  private readonly versions = new Map<number, Version[]>();
  private readonly writes: WriteInfo[] = [];
  /** [start, done] log positions of flushes that completed. */
  private readonly flushes: Array<[number, number]> = [];

  constructor(
    readonly size: number,
    /** The disk's contents before the workload (backing data, zeros past its end). */
    readonly original: (sector: number) => Buffer,
    /** writethrough: every acknowledged write counts as flushed (promise 3). */
    readonly writethrough = false,
  ) {
    if (size % SECTOR !== 0)
      throw new Error("the model needs a disk size that is a multiple of 512");
  }

  private versionsOf(sector: number): Version[] {
    let v = this.versions.get(sector);
    if (!v) {
      v = [{ writeId: -1, value: this.original(sector) }];
      this.versions.set(sector, v);
    }
    return v;
  }

  /** Records a write being issued at log position `issued`; returns its id. */
  issue(offset: number, data: Buffer, issued: number): number {
    const id = this.writes.length;
    this.writes.push({ id, offset, length: data.length, issued, acked: Infinity });
    const s0 = Math.floor(offset / SECTOR);
    const s1 = Math.ceil((offset + data.length) / SECTOR);
    for (let s = s0; s < s1; s++) {
      const list = this.versionsOf(s);
      const value = Buffer.from(list[list.length - 1]!.value);
      const from = Math.max(offset, s * SECTOR);
      const to = Math.min(offset + data.length, (s + 1) * SECTOR);
      data.copy(value, from - s * SECTOR, from - offset, to - offset);
      list.push({ writeId: id, value });
    }
    return id;
  }

  ack(id: number, acked: number): void {
    this.writes[id]!.acked = acked;
  }

  flushed(start: number, done: number): void {
    this.flushes.push([start, done]);
  }

  private isDurable(w: WriteInfo, point: number): boolean {
    if (w.acked >= point) return false;
    if (this.writethrough) return true;
    return this.flushes.some(([start, done]) => done < point && w.acked < start);
  }

  /** The versions a sector may hold after a crash at this point. */
  allowed(sector: number, point: number): Version[] {
    const list = this.versions.get(sector);
    if (!list) return [{ writeId: -1, value: this.original(sector) }];
    let floor = 0;
    for (let i = 1; i < list.length; i++) {
      if (this.isDurable(this.writes[list[i]!.writeId]!, point)) floor = i;
    }
    return list.slice(floor).filter((v) => v.writeId < 0 || this.writes[v.writeId]!.issued < point);
  }

  /** Sectors any write touched. */
  touchedSectors(): number[] {
    return [...this.versions.keys()].sort((a, b) => a - b);
  }

  /** Checks one sector's bytes; returns a description of what is wrong, or null. */
  checkSector(sector: number, got: Buffer, point: number): string | null {
    const allowed = this.allowed(sector, point);
    if (allowed.some((v) => v.value.equals(got))) return null;
    const all = this.versions.get(sector) ?? [{ writeId: -1, value: this.original(sector) }];
    const match = all.find((v) => v.value.equals(got));
    const expected = allowed
      .map((v) => (v.writeId < 0 ? "original" : `write #${v.writeId}`))
      .join(" or ");
    let what: string;
    if (match) {
      what =
        match.writeId < 0
          ? "the original (backing) data although a flushed write replaced it"
          : `an older version (write #${match.writeId}) although a newer write was flushed`;
    } else if (got.every((b) => b === 0)) {
      what = "zeros";
    } else {
      what = "bytes that no write and no backing data ever held (garbage or a mixed sector)";
    }
    return `holds ${what}; allowed: ${expected}`;
  }

  /** Reads byte ranges (sector aligned) through a device and checks every sector in them. */
  async check(
    dev: BlockDevice,
    point: number,
    ranges: ReadonlyArray<readonly [number, number]>,
  ): Promise<Violation[]> {
    const out: Violation[] = [];
    for (const [start, end] of ranges) {
      const buf = Buffer.alloc(end - start);
      await dev.read(buf, start);
      for (let off = start; off < end; off += SECTOR) {
        const s = off / SECTOR;
        const got = buf.subarray(off - start, off - start + SECTOR);
        const problem = this.checkSector(s, got, point);
        if (problem) {
          out.push({
            point,
            sector: s,
            offset: off,
            message: `sector ${s} (offset ${off}) ${problem}`,
          });
        }
      }
    }
    return out;
  }
}

/**
 * Checks the ordering rule on a recorded log, independently of any model: when
 * a bitmap write turns a cluster's bit from 0 to 1, every sector of that
 * cluster must already hold data from image writes covered by a completed sync
 * of the image file (later overwrites of an allocated cluster may still be in
 * flight: losing them only brings back an older version). One line per offence.
 */
export function orderViolations(
  log: readonly LogEntry[],
  p: {
    image: string;
    meta: string;
    headerSize: number;
    clusterSize: number;
    numClusters: number;
    size: number;
  },
): string[] {
  const out: string[] = [];
  const imageWrites = new Map<number, Array<{ seq: number; start: number; end: number }>>();
  let covered = 0;
  const bits = Buffer.alloc(Math.ceil(p.numClusters / 8));
  for (const e of log) {
    if (e.kind === "sync" && e.file === p.image) covered = Math.max(covered, e.covers);
    if (e.kind !== "write") continue;
    if (e.file === p.image) {
      const end = e.pos + e.data.length;
      for (let c = Math.floor(e.pos / p.clusterSize); c * p.clusterSize < end; c++) {
        const list = imageWrites.get(c) ?? [];
        list.push({ seq: e.seq, start: e.pos, end });
        imageWrites.set(c, list);
      }
    } else if (e.file === p.meta) {
      for (let i = 0; i < e.data.length; i++) {
        const at = e.pos + i - p.headerSize;
        if (at < 0 || at >= bits.length) continue;
        const fresh = e.data[i]! & ~bits[at]!;
        for (let b = 0; b < 8; b++) {
          const c = at * 8 + b;
          if (!(fresh & (1 << b)) || c >= p.numClusters) continue;
          const cStart = c * p.clusterSize;
          const cEnd = Math.min(cStart + p.clusterSize, p.size);
          const durable = (imageWrites.get(c) ?? []).filter((w) => w.seq < covered);
          for (let s = cStart; s < cEnd; s += SECTOR) {
            if (!durable.some((w) => w.start <= s && Math.min(s + SECTOR, cEnd) <= w.end)) {
              out.push(
                `bit of cluster ${c} written (log entry ${e.seq}) while its sector at ${s} held no synced data`,
              );
              break;
            }
          }
        }
        bits[at] = bits[at]! | e.data[i]!;
      }
    }
  }
  return out;
}
