import type * as fs from "node:fs";
import { readHeader } from "../../src/addcow/open-addcow";
import { RawDevice } from "../../src/block/raw-device";
import {
  AddCowDevice,
  type AddCowDeviceParts,
  type CacheMode,
} from "../../src/addcow/addcow-device";
import { resolveStoredName } from "../../src/chain/open-chain";
import {
  FEATURE_BACKING_PIN,
  bitmapBytes,
  encodeHeader,
  headerSizeFor,
} from "../../src/addcow/header";
import { checkPin, encodePinArea, pinRecord, readPinState } from "../../src/addcow/pin";
import type { FileIO, FileOpener, OpenMode } from "../../src/block/file-io";
import type { FileReplacer } from "../../src/block/replace-file";

const PAGE = 4096;

/**
 * The bytes of one file, kept sparse in 4 KiB pages so a disk of hundreds of
 * MiB costs only the pages that were written. Missing pages read as zeros.
 */
export class SparseBytes {
  private readonly pages = new Map<number, Buffer>();
  constructor(public length = 0) {}

  static from(data: Buffer): SparseBytes {
    const s = new SparseBytes();
    s.write(data, 0);
    return s;
  }

  clone(): SparseBytes {
    const c = new SparseBytes(this.length);
    for (const [i, p] of this.pages) c.pages.set(i, Buffer.from(p));
    return c;
  }

  /** Copies [pos, pos + buf.length) into buf (zeros past the end); returns the bytes inside the file. */
  read(buf: Buffer, pos: number): number {
    const n = Math.max(0, Math.min(buf.length, this.length - pos));
    buf.fill(0);
    let done = 0;
    while (done < n) {
      const at = pos + done;
      const page = Math.floor(at / PAGE);
      const inPage = at % PAGE;
      const take = Math.min(n - done, PAGE - inPage);
      const p = this.pages.get(page);
      if (p) p.copy(buf, done, inPage, inPage + take);
      done += take;
    }
    return n;
  }

  write(data: Buffer, pos: number): void {
    let done = 0;
    while (done < data.length) {
      const at = pos + done;
      const page = Math.floor(at / PAGE);
      const inPage = at % PAGE;
      const take = Math.min(data.length - done, PAGE - inPage);
      let p = this.pages.get(page);
      if (!p) {
        p = Buffer.alloc(PAGE);
        this.pages.set(page, p);
      }
      data.copy(p, inPage, done, done + take);
      done += take;
    }
    this.length = Math.max(this.length, pos + data.length);
  }

  /** ftruncate: shorter drops the bytes past the end (they read as zeros if it grows again). */
  truncate(length: number): void {
    if (length < this.length) {
      for (const page of [...this.pages.keys()]) {
        if (page * PAGE >= length) this.pages.delete(page);
      }
      const last = this.pages.get(Math.floor(length / PAGE));
      if (last) last.fill(0, length % PAGE);
    }
    this.length = length;
  }

  /** Ranges of [start, end) inside the file that no write ever touched (whole pages): holes. */
  holes(start: number, end: number): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    const stop = Math.min(end, this.length);
    for (let page = Math.floor(start / PAGE); page * PAGE < stop; page++) {
      if (this.pages.has(page)) continue;
      const a = Math.max(start, page * PAGE);
      const b = Math.min(stop, (page + 1) * PAGE);
      const last = out[out.length - 1];
      if (last && last[1] === a) last[1] = b;
      else out.push([a, b]);
    }
    return out;
  }

  toBuffer(): Buffer {
    const b = Buffer.alloc(this.length);
    this.read(b, 0);
    return b;
  }

  equals(other: SparseBytes): boolean {
    if (other.length !== this.length) return false;
    // Only pages present on either side can differ: never walk a huge sparse file.
    const a = Buffer.alloc(PAGE);
    const b = Buffer.alloc(PAGE);
    for (const page of new Set([...this.pages.keys(), ...other.pages.keys()])) {
      this.read(a, page * PAGE);
      other.read(b, page * PAGE);
      if (!a.equals(b)) return false;
    }
    return true;
  }
}

/** A file held in memory; sync does nothing (durability is the simulator's business). */
export class MemoryFile implements FileIO {
  constructor(
    readonly path: string,
    readonly bytes: SparseBytes,
    readonly writable: boolean,
  ) {}

  async read(buf: Buffer, pos: number): Promise<number> {
    return this.bytes.read(buf, pos);
  }

  async write(buf: Buffer, pos: number): Promise<void> {
    if (!this.writable)
      throw Object.assign(new Error(`EBADF: ${this.path} is read-only`), { code: "EBADF" });
    this.bytes.write(buf, pos);
  }

  async sync(): Promise<void> {}

  async size(): Promise<number> {
    return this.bytes.length;
  }

  async truncate(length: number): Promise<void> {
    if (!this.writable)
      throw Object.assign(new Error(`EBADF: ${this.path} is read-only`), { code: "EBADF" });
    this.bytes.truncate(length);
  }

  holes(start: number, end: number): Array<[number, number]> {
    return this.bytes.holes(start, end);
  }

  stat(): fs.BigIntStats {
    throw Object.assign(new Error(`${this.path} is in memory: it has no fstat`), {
      code: "ENOTSUP",
    });
  }

  async realPath(): Promise<string> {
    return this.path;
  }

  /** Nothing to lock: no other process can reach a file in memory. */
  lock(): void {}

  async close(): Promise<void> {}
}

/** A set of in-memory files by path; opener() serves them to the engine. */
export class MemoryFs {
  readonly files = new Map<string, SparseBytes>();

  set(path: string, data: Buffer | SparseBytes): void {
    this.files.set(path, data instanceof SparseBytes ? data : SparseBytes.from(data));
  }

  get(path: string): SparseBytes {
    const f = this.files.get(path);
    if (!f) throw Object.assign(new Error(`ENOENT: no such file ${path}`), { code: "ENOENT" });
    return f;
  }

  readonly opener: FileOpener = async (path: string, mode: OpenMode) =>
    new MemoryFile(path, this.get(path), mode === "write");

  /** Files written beside others and renamed over them (the .add-cow file of a rebase). */
  readonly replacer: FileReplacer = {
    createBeside: async (target) => {
      const aside = `${target}.aside`;
      this.set(aside, new SparseBytes());
      return new MemoryFile(aside, this.get(aside), true);
    },
    replace: async (aside, target) => {
      this.files.set(target, this.get(aside.path));
      this.files.delete(aside.path);
    },
    discard: async (aside) => {
      this.files.delete(aside.path);
    },
  };
}

export interface MemoryDiskSpec {
  clusterBits: number;
  /** Virtual disk size (the image file's length). */
  size: number;
  /** Backing file contents; omit for a disk without backing file. */
  backing?: Buffer | SparseBytes;
  dir?: string;
}

export interface MemoryDiskPaths {
  addcow: string;
  image: string;
  backing: string | null;
}

/** Lays out a fresh add-cow disk in a MemoryFs: header, zero bitmap, sparse image, backing. */
export function createMemoryDisk(mfs: MemoryFs, spec: MemoryDiskSpec): MemoryDiskPaths {
  const dir = spec.dir ?? "/mem";
  const paths: MemoryDiskPaths = {
    addcow: `${dir}/disk.add-cow`,
    image: `${dir}/disk.raw`,
    backing: spec.backing ? `${dir}/base.raw` : null,
  };
  const headerSize = headerSizeFor(spec.clusterBits);
  const header = encodeHeader({
    clusterBits: spec.clusterBits,
    headerSize,
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    backingName: spec.backing ? "base.raw" : null,
    backingFormat: spec.backing ? "raw" : null,
    imageName: "disk.raw",
    imageFormat: "raw",
  });
  const numClusters = Math.ceil(spec.size / 2 ** spec.clusterBits);
  const meta = new SparseBytes(headerSize + bitmapBytes(numClusters, spec.clusterBits).padded);
  meta.write(header, 0);
  mfs.set(paths.addcow, meta);
  mfs.set(paths.image, new SparseBytes(spec.size));
  if (spec.backing) mfs.set(paths.backing!, spec.backing);
  return paths;
}

/**
 * Pins a memory disk's raw backing as `addcow create` does: feature bit 1 and
 * the pin extension after the bitmap, with the backing's identity now.
 */
export async function pinMemoryDisk(mfs: MemoryFs, paths: MemoryDiskPaths): Promise<void> {
  const metaIo = await mfs.opener(paths.addcow, "read");
  const header = await readHeader(metaIo, paths.addcow);
  const backing = await RawDevice.open(await mfs.opener(paths.backing!, "read"));
  const identity = await backing.identity();
  await backing.close();
  const meta = mfs.get(paths.addcow);
  const fixed = encodeHeader({
    ...header,
    compatibleFeatures: header.compatibleFeatures | FEATURE_BACKING_PIN,
  });
  meta.write(fixed, 0);
  meta.write(encodePinArea(pinRecord(header, identity), 1n), meta.length);
}

export type DeviceClass = new (parts: AddCowDeviceParts) => AddCowDevice;

/**
 * Opens an add-cow disk through any opener without touching the real file
 * system (openDisk stats real paths): header, image, raw backing file. The
 * device class can be swapped for a test-only subclass.
 */
export async function openDiskVia(
  opener: FileOpener,
  addcowPath: string,
  opts: {
    writable: boolean;
    cacheMode?: CacheMode;
    bitmapCacheBytes?: number;
    Device?: DeviceClass;
    /** Open the raw backing file for writing too (commit writes into it). */
    writableBacking?: boolean;
    copyOnRead?: boolean;
    /** How the .add-cow file is rewritten (a pinned disk's resize). */
    replacer?: FileReplacer;
  },
): Promise<AddCowDevice> {
  const mode = opts.writable ? "write" : "read";
  const meta = await opener(addcowPath, mode);
  const header = await readHeader(meta, addcowPath);
  const pin = await readPinState(meta, header, await meta.size());
  const imagePath = resolveStoredName(addcowPath, header.imageName);
  const image = await opener(imagePath, mode);
  let backing: RawDevice | null = null;
  let backingPath: string | null = null;
  if (header.backingName !== null) {
    backingPath = resolveStoredName(addcowPath, header.backingName);
    backing = await RawDevice.open(
      await opener(backingPath, opts.writableBacking ? "write" : "read"),
    );
    // As openAddCow does: a pinned disk opens only on the backing it was made on.
    checkPin(addcowPath, header, backingPath, pin, await backing.identity());
  }
  const Device = opts.Device ?? AddCowDevice;
  return new Device({
    path: addcowPath,
    header,
    meta,
    image,
    imageSize: await image.size(),
    backing,
    imagePath,
    backingPath,
    pin,
    replacer: opts.replacer,
    cacheMode: opts.cacheMode,
    bitmapCacheBytes: opts.bitmapCacheBytes,
    copyOnRead: opts.copyOnRead,
  });
}

/** What a power-loss test starts from: what the disk reads, and a copy of every file. */
export interface CrashTestStart {
  before: Buffer;
  initial: Map<string, SparseBytes>;
}

/**
 * Writes `count` random pieces (1..maxLen bytes, ending before `end`) into the
 * disk through the engine, then keeps what it reads and a copy of every file:
 * the state a job then starts from.
 */
export async function scribbleAndKeep(
  mfs: MemoryFs,
  addcow: string,
  rng: { int(lo: number, hi: number): number; bytes(n: number): Buffer },
  count: number,
  maxLen: number,
  end?: number,
): Promise<CrashTestStart> {
  const dev = await openDiskVia(mfs.opener, addcow, { writable: true });
  const limit = end ?? dev.size;
  for (let i = 0; i < count; i++) {
    const len = rng.int(1, maxLen);
    await dev.write(rng.bytes(len), rng.int(0, limit - len));
  }
  const before = Buffer.alloc(dev.size);
  await dev.read(before, 0);
  await dev.close();
  const initial = new Map<string, SparseBytes>();
  for (const [p, b] of mfs.files) initial.set(p, b.clone());
  return { before, initial };
}
