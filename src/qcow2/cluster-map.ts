import { AddCowError } from "../util/errors";
import type { FileIO } from "../block/file-io";
import type { Qcow2Header } from "./header";
import { PromiseLru } from "./lru";
import { entryOffset, l2EntriesPerTable } from "./tables";

/**
 * Guest offsets to where their bytes are: the L1/L2 lookup, with L2 tables in
 * a bounded cache. The answer is a list of pieces, neighbours merged:
 * - data: at `host` in the data file (the qcow2 file, or its external data file)
 * - compressed: one whole compressed cluster at `coffset`, `csize` bytes on disk
 * - zero: reads as zeros (zero flag, zero subclusters)
 * - unallocated: from the backing file (zeros without one or past its end)
 * - invalid: an entry QEMU would also refuse; reads of it fail with EIO
 */
export type Piece =
  | { kind: "data"; start: number; length: number; host: number }
  | {
      kind: "compressed";
      start: number;
      length: number;
      /** Guest offset of the compressed cluster (the cache key). */
      cluster: number;
      coffset: number;
      csize: number;
    }
  | { kind: "zero"; start: number; length: number }
  | { kind: "unallocated"; start: number; length: number }
  | { kind: "invalid"; start: number; length: number; error: AddCowError };

/** Default bytes of L2 tables kept in memory (at least two tables are always kept). */
export const DEFAULT_L2_CACHE_BYTES = 4 << 20;

export class ClusterMap {
  private readonly l2Entries: number;
  private readonly entryBytes: number;
  private readonly cache: PromiseLru<Buffer>;
  private readonly subclusterSize: number;
  private readonly csizeShift: number;
  private readonly csizeMask: bigint;
  private readonly coffsetMask: bigint;

  constructor(
    private readonly io: FileIO,
    private readonly h: Qcow2Header,
    private readonly l1: Float64Array,
    private readonly file: string,
    /** Length of the qcow2 file: data and compressed clusters must start inside it. */
    private readonly fileSize: number,
    l2CacheBytes = DEFAULT_L2_CACHE_BYTES,
  ) {
    this.l2Entries = l2EntriesPerTable(h);
    this.entryBytes = h.extendedL2 ? 16 : 8;
    this.cache = new PromiseLru(Math.max(2, Math.floor(l2CacheBytes / h.clusterSize)));
    this.subclusterSize = h.extendedL2 ? h.clusterSize / 32 : h.clusterSize;
    this.csizeShift = 62 - (h.clusterBits - 8);
    this.csizeMask = (1n << BigInt(h.clusterBits - 8)) - 1n;
    this.coffsetMask = (1n << BigInt(this.csizeShift)) - 1n;
  }

  /** Guest bytes mapped by one L2 table. */
  get l2Span(): number {
    return this.l2Entries * this.h.clusterSize;
  }

  get cachedTables(): number {
    return this.cache.size;
  }

  private table(l1Index: number): Promise<Buffer> {
    return this.cache.get(l1Index, async () => {
      const at = this.l1[l1Index]!;
      const buf = Buffer.alloc(this.h.clusterSize);
      const n = await this.io.read(buf, at);
      if (n < buf.length) {
        throw this.invalid(
          `L1 entry ${l1Index}`,
          this.h.l1TableOffset + l1Index * 8,
          `points at an L2 table at ${at} that is cut off by the end of the file`,
        );
      }
      return buf;
    });
  }

  private invalid(field: string, offset: number, message: string): AddCowError {
    return new AddCowError(
      `${this.file}: qcow2 ${field} ${message}; the image is damaged (reads of this range fail)`,
      { file: this.file, field, offset, reason: "bad-field", code: "EIO" },
    );
  }

  /**
   * Pieces covering [offset, offset + length). With `oneTable`, the answer
   * stops at the end of the first L2 table's range (block status answers in
   * pieces it can find cheaply).
   */
  async pieces(offset: number, length: number, oneTable = false): Promise<Piece[]> {
    const out: Piece[] = [];
    const end = offset + length;
    const cs = this.h.clusterSize;
    let pos = offset;
    while (pos < end) {
      const l1Index = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1Index + 1) * this.l2Span);
      if (this.l1[l1Index] === 0) {
        push(out, { kind: "unallocated", start: pos, length: tableEnd - pos });
      } else {
        const table = await this.table(l1Index);
        for (let p = pos; p < tableEnd;) {
          const cluster = Math.floor(p / cs);
          const cEnd = Math.min(tableEnd, (cluster + 1) * cs);
          this.classify(table, l1Index, cluster, p, cEnd, out);
          p = cEnd;
        }
      }
      pos = tableEnd;
      if (oneTable) break;
    }
    return out;
  }

  /** Pieces of [from, to) inside guest cluster `cluster`. */
  private classify(
    table: Buffer,
    l1Index: number,
    cluster: number,
    from: number,
    to: number,
    out: Piece[],
  ): void {
    const h = this.h;
    const cs = h.clusterSize;
    const l2Index = cluster % this.l2Entries;
    const at = l2Index * this.entryBytes;
    const hi = table.readUInt32BE(at);
    const lo = table.readUInt32BE(at + 4);
    const entryAt = this.l1[l1Index]! + at;
    const field = `L2 entry for guest offset ${cluster * cs}`;
    const bad = (message: string) =>
      push(out, {
        kind: "invalid",
        start: from,
        length: to - from,
        error: this.invalid(field, entryAt, message),
      });
    const allocBits = h.extendedL2 ? table.readUInt32BE(at + 12) : 0;
    const zeroBits = h.extendedL2 ? table.readUInt32BE(at + 8) : 0;

    if ((hi >>> 30) & 1) {
      if (h.hasDataFile)
        return bad(`is a compressed cluster, which images with a data file cannot have`);
      if (allocBits !== 0 || zeroBits !== 0) {
        return bad(`is a compressed cluster with a subcluster bitmap (must be 0)`);
      }
      const entry = (BigInt(hi) << 32n) | BigInt(lo);
      const coffset = Number(entry & this.coffsetMask);
      const sectors = Number((entry >> BigInt(this.csizeShift)) & this.csizeMask) + 1;
      const csize = sectors * 512 - (coffset % 512);
      if (coffset < cs) return bad(`points compressed data into the header cluster`);
      if (coffset >= this.fileSize) {
        return bad(
          `points compressed data at ${coffset}, past the end of the file (${this.fileSize} bytes)`,
        );
      }
      return push(out, {
        kind: "compressed",
        start: from,
        length: to - from,
        cluster: cluster * cs,
        coffset,
        csize,
      });
    }
    if (!h.extendedL2 && lo & 1) return push(out, { kind: "zero", start: from, length: to - from });
    const host = entryOffset(hi, lo);
    const allocated = host !== 0 || (h.hasDataFile && hi >>> 31 === 1);
    if (!allocated) {
      if (!h.extendedL2) return push(out, { kind: "unallocated", start: from, length: to - from });
      if (allocBits !== 0) return bad(`has allocated subclusters but no cluster offset`);
    } else {
      if (host % cs !== 0) return bad(`points at ${host}, not aligned to the cluster size ${cs}`);
      if (host > Number.MAX_SAFE_INTEGER - cs) {
        return bad(`points at ${host}, beyond any file addcow can read (2^53 bytes)`);
      }
      if (!h.hasDataFile && host >= this.fileSize) {
        return bad(`points at ${host}, past the end of the file (${this.fileSize} bytes)`);
      }
      if (!h.extendedL2) {
        return push(out, {
          kind: "data",
          start: from,
          length: to - from,
          host: host + (from - cluster * cs),
        });
      }
      if ((allocBits & zeroBits) !== 0) return bad(`marks subclusters both allocated and zero`);
    }
    // Extended L2: one piece per subcluster, merged.
    const sc = this.subclusterSize;
    for (let p = from; p < to;) {
      const i = Math.floor((p - cluster * cs) / sc);
      const scEnd = Math.min(to, cluster * cs + (i + 1) * sc);
      const bit = 1 << i;
      if (allocBits & bit) {
        push(out, { kind: "data", start: p, length: scEnd - p, host: host + (p - cluster * cs) });
      } else if (zeroBits & bit) {
        push(out, { kind: "zero", start: p, length: scEnd - p });
      } else {
        push(out, { kind: "unallocated", start: p, length: scEnd - p });
      }
      p = scEnd;
    }
  }
}

/** Appends a piece, merging it into the previous one when they continue each other. */
function push(out: Piece[], piece: Piece): void {
  const last = out[out.length - 1];
  if (last && last.kind === piece.kind && last.start + last.length === piece.start) {
    if (
      piece.kind === "zero" ||
      piece.kind === "unallocated" ||
      (piece.kind === "data" && last.kind === "data" && last.host + last.length === piece.host)
    ) {
      last.length += piece.length;
      return;
    }
  }
  out.push(piece);
}
