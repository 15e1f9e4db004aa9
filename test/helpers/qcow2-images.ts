/**
 * qcow2 images made by QEMU's own tools (qemu-img, qemu-io), the independent
 * writer addcow's qcow2 reader is checked against. Each case gives the top
 * qcow2 file, every file of its chain (to prove nothing was modified), and
 * `qemu-img convert -O raw` of it: what the image must read as.
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { type RunResult, sh } from "./mount";
import { pattern } from "./pattern";

export interface Qcow2Case {
  name: string;
  /** The qcow2 image an add-cow disk is put on. */
  top: string;
  /** Every file the chain below the add-cow disk consists of. */
  files: string[];
  /** qemu-img convert -O raw of `top`. */
  reference: string;
  size: number;
  /** Where QEMU's tools must run to find the image's relative data file name. */
  cwd?: string;
}

const KiB = 1024;
const MiB = 1 << 20;

/**
 * Content that compresses like a real disk: runs of random bytes, of text-like
 * repeats and of zeros, in pieces of various lengths (seeded).
 */
export function mixedContent(size: number, seed: number): Buffer {
  const out = Buffer.alloc(size);
  const rnd = pattern(size, seed);
  let x = seed * 7919 + 17;
  for (let pos = 0; pos < size;) {
    x = (x * 1103515245 + 12345) >>> 0;
    const len = Math.min(size - pos, 512 * (1 + ((x >>> 8) % 200)));
    const kind = (x >>> 4) % 4;
    if (kind === 0) rnd.copy(out, pos, pos, pos + len);
    else if (kind === 1) out.fill(`block ${pos} seed ${seed} `, pos, pos + len);
    else if (kind === 2) for (let i = pos; i < pos + len; i += 7) out[i] = rnd[i]!;
    pos += len;
  }
  return out;
}

export async function qemuImg(args: string[]): Promise<void> {
  await sh("qemu-img", args);
}

/** Runs qemu-io commands on an image (many commands per call). */
export async function qemuIo(file: string, format: string, cmds: string[]): Promise<void> {
  for (let i = 0; i < cmds.length; i += 200) {
    await sh("qemu-io", ["-f", format, ...cmds.slice(i, i + 200).flatMap((c) => ["-c", c]), file]);
  }
}

/** Scattered pattern writes (qemu-io -P) of various lengths and alignments, seeded. */
export function scatteredWrites(size: number, count: number, seed: number, align = 512): string[] {
  const cmds: string[] = [];
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < count; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const len = align * (1 + ((x >>> 3) % 64));
    x = (x * 1103515245 + 12345) >>> 0;
    const at = Math.floor(((x >>> 0) / 2 ** 32) * ((size - len) / align)) * align;
    cmds.push(`write -P ${(x >>> 24) & 0xff} ${at} ${len}`);
  }
  return cmds;
}

/** qemu-img convert -c: a compressed qcow2 image of a raw file (-o options when given). */
export async function compressToQcow2(raw: string, out: string, options?: string): Promise<void> {
  const o = options ? ["-o", options] : [];
  await qemuImg(["convert", "-c", "-f", "raw", "-O", "qcow2", ...o, raw, out]);
}

/** qemu-img create -f qcow2, with -o options and a backing file (with its format) when given. */
export async function createQcow2(
  file: string,
  opts: { size?: string; options?: string; backing?: string; backingFormat?: string } = {},
): Promise<void> {
  await qemuImg([
    "create",
    "-q",
    "-f",
    "qcow2",
    ...(opts.options ? ["-o", opts.options] : []),
    ...(opts.backing ? ["-b", opts.backing, "-F", opts.backingFormat ?? "raw"] : []),
    file,
    ...(opts.size ? [opts.size] : []),
  ]);
}

export function sha256(file: string): string {
  return crypto.createHash("sha256").update(fs.readFileSync(file)).digest("hex");
}

/**
 * Rewrites the backing format header extension of a qcow2 file in place (qemu-img
 * refuses formats it does not know, such as add-cow). The new name must fit the
 * old extension's padded length.
 */
export function setBackingFormat(file: string, format: string): void {
  const buf = fs.readFileSync(file);
  const version = buf.readUInt32BE(4);
  let pos = version === 2 ? 72 : buf.readUInt32BE(100);
  for (;;) {
    const type = buf.readUInt32BE(pos);
    const len = buf.readUInt32BE(pos + 4);
    if (type === 0) throw new Error(`${file} has no backing format extension`);
    if (type === 0xe2792aca) {
      const room = Math.ceil(len / 8) * 8;
      if (format.length > room) throw new Error(`${format} does not fit ${room} bytes`);
      buf.writeUInt32BE(format.length, pos + 4);
      buf.fill(0, pos + 8, pos + 8 + room);
      buf.write(format, pos + 8, "latin1");
      fs.writeFileSync(file, buf);
      return;
    }
    pos += 8 + Math.ceil(len / 8) * 8;
  }
}

type Maker = (dir: string) => Promise<{ top: string; files: string[]; cwd?: string }>;

/** Runs a QEMU tool in `dir` (relative data file names are resolved from there). */
async function inDir(dir: string, cmd: string, args: string[]): Promise<RunResult> {
  const quoted = [cmd, ...args].map((a) => `'${a.replace(/'/g, "'\\''")}'`).join(" ");
  return sh("bash", ["-c", `cd '${dir}' && ${quoted}`]);
}

const f = (dir: string, name: string) => path.join(dir, name);

/** A raw file of mixed content; returns its path. */
function rawBase(dir: string, name: string, size: number, seed: number): string {
  const p = f(dir, name);
  fs.writeFileSync(p, mixedContent(size, seed));
  return p;
}

/** The qcow2 matrix, by name. Sizes stay small so the whole matrix builds in seconds. */
export const QCOW2_CASES: Record<string, Maker> = {
  "v2 (compat=0.10), 64K clusters, writes and write -z": async (dir) => {
    const top = f(dir, "v2.qcow2");
    await createQcow2(top, { options: "compat=0.10", size: "6M" });
    await qemuIo(top, "qcow2", [
      ...scatteredWrites(6 * MiB, 60, 1),
      "write -z 1M 256k",
      "write -z 3000k 4k",
    ]);
    return { top, files: [top] };
  },
  ...Object.fromEntries(
    [4 * KiB, 64 * KiB, 512 * KiB, 2 * MiB].map((cs) => [
      `v3, ${cs / KiB}K clusters, writes, write -z, discard`,
      async (dir: string) => {
        const top = f(dir, `v3-${cs}.qcow2`);
        const size = Math.max(8 * MiB, cs * 6) + 12345 * 0; // a whole number of sectors
        await createQcow2(top, { options: `cluster_size=${cs}`, size: `${size}` });
        await qemuIo(top, "qcow2", [
          ...scatteredWrites(size, 50, cs),
          `write -z ${cs} ${cs}`,
          `write -z ${3 * cs + 512} 4096`,
          `discard ${4 * cs} ${cs}`,
        ]);
        return { top, files: [top] };
      },
    ]),
  ),
  "compressed zlib, 64K clusters (qemu-img convert -c)": async (dir) => {
    const raw = rawBase(dir, "src.raw", 6 * MiB + 7 * 512, 11);
    const top = f(dir, "zlib.qcow2");
    await compressToQcow2(raw, top);
    fs.rmSync(raw);
    return { top, files: [top] };
  },
  "compressed zlib, 4K clusters": async (dir) => {
    const raw = rawBase(dir, "src.raw", 3 * MiB, 12);
    const top = f(dir, "zlib4k.qcow2");
    await compressToQcow2(raw, top, "cluster_size=4k");
    fs.rmSync(raw);
    return { top, files: [top] };
  },
  "compressed zstd, 64K clusters": async (dir) => {
    const raw = rawBase(dir, "src.raw", 6 * MiB, 13);
    const top = f(dir, "zstd.qcow2");
    await compressToQcow2(raw, top, "compression_type=zstd");
    fs.rmSync(raw);
    return { top, files: [top] };
  },
  "compressed zstd, 2M clusters, then uncompressed writes": async (dir) => {
    const raw = rawBase(dir, "src.raw", 8 * MiB, 14);
    const top = f(dir, "zstd2m.qcow2");
    await compressToQcow2(raw, top, "compression_type=zstd,cluster_size=2M");
    await qemuIo(top, "qcow2", scatteredWrites(8 * MiB, 10, 3));
    fs.rmSync(raw);
    return { top, files: [top] };
  },
  "extended_l2=on over a raw backing: subclusters allocated, zero, unallocated": async (dir) => {
    const base = rawBase(dir, "base.raw", 4 * MiB, 21);
    const top = f(dir, "extl2.qcow2");
    await qemuImg([
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "extended_l2=on,cluster_size=64k",
      "-b",
      "base.raw",
      "-F",
      "raw",
      top,
      "6M",
    ]);
    await qemuIo(top, "qcow2", [
      ...scatteredWrites(6 * MiB, 40, 5, 2048),
      "write -z 64k 8k",
      "write -z 1M 128k",
      "write -c -P 0x3c 2M 64k",
      "discard 3M 4k",
    ]);
    return { top, files: [top, base] };
  },
  "external data file (data_file=, relative name)": async (dir) => {
    const top = f(dir, "ext.qcow2");
    // QEMU opens a relative data file name from the working directory; addcow from the image's.
    await inDir(dir, "qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-o",
      "data_file=ext.data",
      "ext.qcow2",
      "6M",
    ]);
    const cmds = [...scatteredWrites(6 * MiB, 40, 6), "write -z 128k 64k"];
    await inDir(dir, "qemu-io", ["-f", "qcow2", ...cmds.flatMap((c) => ["-c", c]), "ext.qcow2"]);
    return { top, files: [top, f(dir, "ext.data")], cwd: dir };
  },
  "qcow2 over a smaller raw backing (virtual size past the backing)": async (dir) => {
    const base = rawBase(dir, "base.raw", 3 * MiB + 1536, 31);
    const top = f(dir, "over-raw.qcow2");
    await createQcow2(top, { backing: "base.raw", backingFormat: "raw", size: "8M" });
    await qemuIo(top, "qcow2", [
      ...scatteredWrites(8 * MiB, 30, 7),
      "write -z 512k 64k",
      "write -c -P 0x5a 4M 64k",
    ]);
    return { top, files: [top, base] };
  },
  "chain of three: compressed zstd base, qcow2, qcow2 (relative names)": async (dir) => {
    const raw = rawBase(dir, "src.raw", 6 * MiB, 41);
    const base = f(dir, "c-base.qcow2");
    await compressToQcow2(raw, base, "compression_type=zstd");
    fs.rmSync(raw);
    const mid = f(dir, "c-mid.qcow2");
    await createQcow2(mid, { backing: "c-base.qcow2", backingFormat: "qcow2", size: "7M" });
    await qemuIo(mid, "qcow2", [...scatteredWrites(7 * MiB, 30, 8), "write -z 2M 128k"]);
    const top = f(dir, "c-top.qcow2");
    await createQcow2(top, {
      options: "cluster_size=16k",
      backing: "c-mid.qcow2",
      backingFormat: "qcow2",
    });
    await qemuIo(top, "qcow2", [...scatteredWrites(7 * MiB, 30, 9), "write -z 3M 16k"]);
    return { top, files: [top, mid, base] };
  },
  "internal snapshots: snapshot -c, then more writes": async (dir) => {
    const top = f(dir, "snap.qcow2");
    await createQcow2(top, { size: "6M" });
    await qemuIo(top, "qcow2", scatteredWrites(6 * MiB, 30, 10));
    await qemuImg(["snapshot", "-c", "first", top]);
    await qemuIo(top, "qcow2", [...scatteredWrites(6 * MiB, 30, 11), "write -z 1M 64k"]);
    await qemuImg(["snapshot", "-c", "second", top]);
    await qemuIo(top, "qcow2", [...scatteredWrites(6 * MiB, 10, 12), "discard 2M 128k"]);
    return { top, files: [top] };
  },
};

/**
 * A qcow2 whose backing is an add-cow disk (qemu-img knows no add-cow: the
 * image is made over a raw file with the add-cow disk's content, converted for
 * the reference, then rebased and its backing format extension rewritten).
 * `makeAddCow` creates the add-cow disk over `base` and applies `writes`.
 */
export async function qcow2OverAddCow(
  dir: string,
  makeAddCow: (
    addcow: string,
    base: string,
    writes: Array<{ at: number; data: Buffer }>,
  ) => Promise<void>,
): Promise<Qcow2Case> {
  const size = 4 * MiB;
  const base = rawBase(dir, "ac-base.raw", size, 51);
  const writes = [0, 1, 2, 3, 4].map((i) => ({
    at: i * 777_777 + 4096 * i,
    data: pattern(10_000 + i * 30_000, 60 + i),
  }));
  const flatContent = fs.readFileSync(base);
  for (const w of writes) w.data.copy(flatContent, w.at);
  const flat = f(dir, "ac-flat.raw");
  fs.writeFileSync(flat, flatContent);
  const top = f(dir, "over-addcow.qcow2");
  await createQcow2(top, { backing: "ac-flat.raw", backingFormat: "raw", size: "6M" });
  await qemuIo(top, "qcow2", [...scatteredWrites(6 * MiB, 30, 52), "write -z 1M 64k"]);
  const reference = f(dir, "over-addcow.ref.raw");
  await convertToRaw(top, reference);
  await qemuImg(["rebase", "-q", "-u", "-f", "qcow2", "-b", "ac.add-cow", "-F", "raw", top]);
  setBackingFormat(top, "add-cow");
  fs.rmSync(flat);
  const addcow = f(dir, "ac.add-cow");
  await makeAddCow(addcow, base, writes);
  return {
    name: "qcow2 over an add-cow disk (backing format add-cow)",
    top,
    files: [top, addcow, f(dir, "ac.raw"), base],
    reference,
    size: 6 * MiB,
  };
}

/** Builds every case of the matrix in `dir` (one subdirectory each) with its reference. */
export async function buildMatrix(dir: string): Promise<Qcow2Case[]> {
  const cases: Qcow2Case[] = [];
  let i = 0;
  for (const [name, make] of Object.entries(QCOW2_CASES)) {
    const sub = path.join(dir, `case${i++}`);
    fs.mkdirSync(sub);
    const { top, files, cwd } = await make(sub);
    const reference = path.join(sub, "reference.raw");
    if (cwd) await inDir(cwd, "qemu-img", ["convert", "-f", "qcow2", "-O", "raw", top, reference]);
    else await convertToRaw(top, reference);
    cases.push({ name, top, files, reference, size: fs.statSync(reference).size, cwd });
  }
  return cases;
}

/** qemu-img convert -O raw: the reference content. */
export async function convertToRaw(qcow2: string, out: string, format = "qcow2"): Promise<void> {
  await qemuImg(["convert", "-f", format, "-O", "raw", qcow2, out]);
}

export interface QemuMapEntry {
  start: number;
  length: number;
  depth: number;
  zero: boolean;
  data: boolean;
}

/** qemu-img map --output=json, run in `cwd` when given (QEMU finds relative data files there). */
export async function qemuMap(file: string, cwd?: string): Promise<QemuMapEntry[]> {
  const args = ["map", "-f", "qcow2", "--output=json", file];
  const r = cwd ? await inDir(cwd, "qemu-img", args) : await sh("qemu-img", args);
  return JSON.parse(r.stdout) as QemuMapEntry[];
}
