/**
 * The table of hostile file sets, one per validation rule (docs/specs/add-cow.md,
 * "Validation rules"): each case builds its files in a fresh directory and says
 * which patterns the one-line error must match. Used by the engine test
 * (test/unit/hostile.test.ts) and the command-line test (test/mount/hostile-cli.test.ts).
 */
import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { encodeHeader } from "../../src/addcow/header";
import type { FileOpener } from "../../src/block/file-io";
import { openPosixFile } from "../../src/block/file-io";
import { MAX_CHAIN_DEPTH } from "../../src/chain/open-chain";
import { F, header, patchFile, setFormat, writeDisk, writeRaw } from "./bad-files";

export const KiB = 1024;
export const SIZE = 256 * KiB;
/** Files made immutable by a case; releaseImmutable() undoes it (also after failures). */
export const immutable: string[] = [];

export function releaseImmutable(): void {
  for (const f of immutable.splice(0)) spawnQuiet("chattr", ["-i", f]);
}

export function spawnQuiet(cmd: string, args: string[]): boolean {
  try {
    execFileSync(cmd, args, { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

export function esc(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

export interface Built {
  /** The .add-cow file to open. */
  file: string;
  /** Every pattern must match the message (field, value, file). */
  patterns: RegExp[];
  /** Which opens must fail (default both). */
  modes?: Array<"read" | "write">;
  opener?: FileOpener;
}

export interface Case {
  name: string;
  build(dir: string): Built;
}

/** A good 256 KiB disk with 4 KiB clusters (HEADER_SIZE 4096, one bitmap cluster). */
export function plain(dir: string, extra: Parameters<typeof writeDisk>[2] = { size: SIZE }) {
  return writeDisk(dir, "d", { clusterBits: 12, ...extra });
}

/** A good disk over a raw backing file base.raw. */
export function overRaw(dir: string) {
  writeRaw(path.join(dir, "base.raw"), SIZE);
  return plain(dir, { size: SIZE, backingName: "base.raw", backingFormat: "raw" });
}

export function headerCase(
  name: string,
  patch: (buf: Buffer) => Buffer | void,
  patterns: RegExp[],
  withBacking = false,
): Case {
  return {
    name,
    build(dir) {
      const d = withBacking ? overRaw(dir) : plain(dir);
      patchFile(d.addcow, patch);
      return { file: d.addcow, patterns: [new RegExp(`^${esc(d.addcow)}: `), ...patterns] };
    },
  };
}

export const u32 = (off: number, v: number) => (b: Buffer) => void b.writeUInt32LE(v, off);

/** Builds a chain of add-cow layers L0 (top) .. L{n-1}, the last over a raw file. */
export function chain(dir: string, n: number): string[] {
  const files: string[] = [];
  writeRaw(path.join(dir, "raw.img"), SIZE);
  for (let i = 0; i < n; i++) {
    const last = i === n - 1;
    files.push(
      writeDisk(dir, `L${i}`, {
        size: SIZE,
        clusterBits: 12,
        backingName: last ? "raw.img" : `L${i + 1}.add-cow`,
        backingFormat: last ? "raw" : "add-cow",
      }).addcow,
    );
  }
  return files;
}

export const hostileCases: Case[] = [
  // --- The header, field by field.
  headerCase("wrong magic", (b) => void b.write("QFI\xfb", 0, "latin1"), [
    /magic is 0x514649fb/,
    /expected "ACOW"/,
  ]),
  headerCase(
    "old big-endian layout (ADD_COW\\xff)",
    (b) => void b.write("ADD_COW\xff", 0, "latin1"),
    [
      /magic is "ADD_COW\\xff": the old big-endian add-cow layout/,
      /only the revision 19\/20 layout/,
    ],
  ),
  headerCase("empty .add-cow file", () => Buffer.alloc(0), [/empty \(0 bytes\)/]),
  headerCase("truncated fixed header", (b) => b.subarray(0, 50), [
    /header is truncated: the file has 50 bytes, the fixed header needs 76/,
  ]),
  headerCase("file shorter than HEADER_SIZE", (b) => b.subarray(0, 2000), [
    /HEADER_SIZE is 4096 but the file has only 2000 bytes/,
  ]),
  headerCase("HEADER_SIZE too small", u32(F.headerSize, 2048), [/HEADER_SIZE is 2048, too small/]),
  headerCase("HEADER_SIZE not a multiple of 4096", u32(F.headerSize, 6144), [
    /HEADER_SIZE is 6144, not a multiple of 4096/,
  ]),
  headerCase("HEADER_SIZE absurd (4 GiB)", u32(F.headerSize, 0xfffff000), [
    /HEADER_SIZE is 4294963200, larger than the largest valid header/,
  ]),
  headerCase("HEADER_SIZE larger than the file", u32(F.headerSize, 2 << 20), [
    /HEADER_SIZE is 2097152 but the file has only 8192 bytes/,
  ]),
  headerCase("cluster_bits below 12", u32(F.clusterBits, 11), [
    /cluster_bits is 11, must be 12\.\.21/,
  ]),
  headerCase("cluster_bits above 21", u32(F.clusterBits, 22), [
    /cluster_bits is 22, must be 12\.\.21/,
  ]),
  headerCase(
    "unknown incompatible feature bits",
    (b) => void b.writeBigUInt64LE((1n << 3n) | (1n << 63n), F.incompatible),
    [/incompatible features has unknown bits 3, 63 \(0x8000000000000008\)/, /newer addcow/],
  ),
  headerCase("backing name offset without size", u32(F.backingNameOffset, 76), [
    /backing name offset is 76 and backing name size 0/,
  ]),
  headerCase(
    "backing name out of the header",
    u32(F.backingNameOffset, 4090),
    [/backing name offset 4090 \+ size 8 = 4098 runs past HEADER_SIZE 4096/],
    true,
  ),
  headerCase("image name offset inside the fixed header", u32(F.imageNameOffset, 12), [
    /image name offset is 12, inside the fixed header/,
  ]),
  headerCase("image name size absurd", u32(F.imageNameSize, 0xffffffff), [
    /image name offset 76 \+ size 4294967295 = 4294967371 runs past HEADER_SIZE 4096/,
  ]),
  headerCase(
    "names overlapping",
    u32(F.imageNameOffset, 80),
    [/backing name \(bytes 76\.\.83\) and image name \(bytes 80\.\.84\) overlap/],
    true,
  ),
  headerCase("empty image name", u32(F.imageNameSize, 0), [/image name size is 0/]),
  headerCase("non-zero byte in the name area outside the names", (b) => void (b[1000] = 0x41), [
    /name area byte at offset 1000 is 65, outside both names/,
  ]),
  headerCase("control character in a name", (b) => void (b[77] = 0x0a), [
    /image name has control byte 0x0a at offset 77/,
  ]),
  headerCase(
    "backing format without NUL (16 characters)",
    (b) => setFormat(b, F.backingFormat, "rawrawrawrawrawr"),
    [/backing format is "rawrawrawrawrawr", not supported \(supported: raw, add-cow, qcow2\)/],
    true,
  ),
  headerCase(
    "backing format unknown",
    (b) => setFormat(b, F.backingFormat, "vmdk"),
    [/backing format is "vmdk", not supported/],
    true,
  ),
  headerCase(
    "backing format empty with a backing name",
    (b) => setFormat(b, F.backingFormat, ""),
    [/backing format is empty but a backing file is named/],
    true,
  ),
  headerCase("backing format without a backing name", (b) => setFormat(b, F.backingFormat, "raw"), [
    /backing format is "raw" but no backing file is named/,
  ]),
  headerCase("image format unknown", (b) => setFormat(b, F.imageFormat, "vmdk"), [
    /image format is "vmdk", not supported \(supported: raw\)/,
  ]),
  headerCase("image format empty", (b) => setFormat(b, F.imageFormat, ""), [
    /image format is empty/,
  ]),
  headerCase("image format with bytes after its NUL", (b) => void (b[F.imageFormat + 8] = 0x20), [
    /image format \(bytes 60\.\.75\) has byte 32 at offset 68, after its terminating NUL/,
  ]),
  {
    name: "image and backing names equal",
    build(dir) {
      const file = path.join(dir, "d.add-cow");
      const h = header({ clusterBits: 12, imageName: "d.raw", backingName: "d.raw" });
      fs.writeFileSync(file, Buffer.concat([encodeHeader(h), Buffer.alloc(4096)]));
      writeRaw(path.join(dir, "d.raw"), SIZE);
      return { file, patterns: [/image name and backing name are both "d\.raw"/] };
    },
  },

  // --- The bitmap against the image file.
  headerCase("bitmap shorter than the disk needs", (b) => b.subarray(0, 4096 + 5), [
    /bitmap is 5 bytes, shorter than the 8 bytes the disk needs/,
    /image file .*d\.raw \(262144 bytes, 64 clusters\)/,
  ]),

  // --- Files that are missing or not files.
  {
    name: ".add-cow file missing",
    build: (dir) => ({
      file: path.join(dir, "nope.add-cow"),
      patterns: [/add-cow file .*nope\.add-cow does not exist; check the path/],
    }),
  },
  {
    name: ".add-cow file is a directory",
    build(dir) {
      fs.mkdirSync(path.join(dir, "x.add-cow"));
      return {
        file: path.join(dir, "x.add-cow"),
        patterns: [/x\.add-cow is a directory, not a regular file/],
      };
    },
  },
  {
    name: "image file missing",
    build(dir) {
      const d = plain(dir, { size: SIZE, noImage: true });
      return {
        file: d.addcow,
        patterns: [
          new RegExp(`image file ${esc(d.image)} \\(named in ${esc(d.addcow)}\\) does not exist`),
        ],
      };
    },
  },
  {
    name: "image file is a directory",
    build(dir) {
      const d = plain(dir, { size: SIZE, noImage: true });
      fs.mkdirSync(d.image);
      return {
        file: d.addcow,
        patterns: [/image file .*d\.raw .* is a directory, not a regular file/],
      };
    },
  },
  {
    name: "image file is a FIFO (must not hang)",
    build(dir) {
      const d = plain(dir, { size: SIZE, noImage: true });
      execFileSync("mkfifo", [d.image]);
      return { file: d.addcow, patterns: [/image file .*d\.raw .* is a FIFO, not a regular file/] };
    },
  },
  {
    name: "image file is a dangling symbolic link",
    build(dir) {
      const d = plain(dir, { size: SIZE, noImage: true });
      fs.symlinkSync("gone.raw", d.image);
      return {
        file: d.addcow,
        patterns: [
          /image file .*d\.raw .* is a symbolic link to "gone\.raw", which does not exist/,
        ],
      };
    },
  },
  {
    name: "image file is the .add-cow file itself",
    build(dir) {
      const d = plain(dir, { size: SIZE, imageName: "d.add-cow", noImage: true });
      return {
        file: d.addcow,
        patterns: [/image file .*d\.add-cow .* is the same file as add-cow file .*d\.add-cow/],
      };
    },
  },

  // --- The backing file.
  {
    name: "backing file missing",
    build(dir) {
      const d = plain(dir, { size: SIZE, backingName: "base.raw", backingFormat: "raw" });
      return {
        file: d.addcow,
        patterns: [
          new RegExp(
            `backing file ${esc(path.join(dir, "base.raw"))} \\(named in ${esc(d.addcow)}\\) does not exist`,
          ),
          /addcow rebase -u -b NEW -F FORMAT /,
        ],
      };
    },
  },
  {
    name: "backing file is a dangling symbolic link",
    build(dir) {
      fs.symlinkSync("/nonexistent/base.raw", path.join(dir, "base.raw"));
      const d = plain(dir, { size: SIZE, backingName: "base.raw", backingFormat: "raw" });
      return {
        file: d.addcow,
        patterns: [
          /backing file .*base\.raw .* is a symbolic link to "\/nonexistent\/base\.raw", which does not exist/,
        ],
      };
    },
  },
  {
    name: "backing file unreadable: a symbolic link loop",
    build(dir) {
      fs.symlinkSync("base.raw", path.join(dir, "base.raw"));
      const d = plain(dir, { size: SIZE, backingName: "base.raw", backingFormat: "raw" });
      return {
        file: d.addcow,
        patterns: [/backing file .*base\.raw .* too many levels of symbolic links/],
      };
    },
  },
  {
    name: "backing file unreadable: a path through a regular file",
    build(dir) {
      writeRaw(path.join(dir, "plain"), 10);
      const d = plain(dir, { size: SIZE, backingName: "plain/base.raw", backingFormat: "raw" });
      return {
        file: d.addcow,
        patterns: [/backing file .*plain\/base\.raw .* a component of the path is not a directory/],
      };
    },
  },
  {
    name: "backing file unreadable: permission denied (opener refuses, as for a non-root user)",
    build(dir) {
      const d = overRaw(dir);
      const base = path.join(dir, "base.raw");
      const opener: FileOpener = async (p, mode) => {
        if (p === base)
          throw Object.assign(new Error("EACCES: permission denied"), { code: "EACCES" });
        return openPosixFile(p, mode);
      };
      return {
        file: d.addcow,
        opener,
        patterns: [
          new RegExp(
            `backing file ${esc(base)} \\(named in ${esc(d.addcow)}\\) cannot be opened for reading: permission denied`,
          ),
        ],
      };
    },
  },
  {
    name: "backing file is a directory",
    build(dir) {
      fs.mkdirSync(path.join(dir, "base.raw"));
      const d = plain(dir, { size: SIZE, backingName: "base.raw", backingFormat: "raw" });
      return {
        file: d.addcow,
        patterns: [/backing file .*base\.raw .* is a directory, not a regular file/],
      };
    },
  },
  {
    name: "backing file is the image file through another path",
    build(dir) {
      const d = plain(dir, { size: SIZE, backingName: "./d.raw", backingFormat: "raw" });
      return {
        file: d.addcow,
        patterns: [/backing file .*d\.raw .* is the same file as image file .*d\.raw/],
      };
    },
  },
  {
    name: "backing file is the image file through a symbolic link",
    build(dir) {
      const d = plain(dir, { size: SIZE, backingName: "link.raw", backingFormat: "raw" });
      fs.symlinkSync("d.raw", path.join(dir, "link.raw"));
      return {
        file: d.addcow,
        patterns: [
          /backing file .*link\.raw .* is the same file as image file .*d\.raw \(through another path, a symbolic link or a hard link\)/,
        ],
      };
    },
  },
  {
    name: "backing file is the image file through a hard link",
    build(dir) {
      const d = plain(dir, { size: SIZE, backingName: "hard.raw", backingFormat: "raw" });
      fs.linkSync(d.image, path.join(dir, "hard.raw"));
      return {
        file: d.addcow,
        patterns: [/backing file .*hard\.raw .* is the same file as image file/],
      };
    },
  },
  {
    name: "backing add-cow layer with a bad header",
    build(dir) {
      const [top, mid] = chain(dir, 2) as [string, string];
      patchFile(mid, (b) => void b.writeUInt32LE(30, F.clusterBits));
      return { file: top, patterns: [new RegExp(`^${esc(mid)}: cluster_bits is 30`)] };
    },
  },
  {
    name: "chain loop a -> b -> a",
    build(dir) {
      const [a, b] = chain(dir, 2) as [string, string];
      patchFile(b, () => {
        const h = header({
          clusterBits: 12,
          imageName: "L1.raw",
          backingName: "L0.add-cow",
          backingFormat: "add-cow",
        });
        return Buffer.concat([encodeHeader(h), Buffer.alloc(4096)]);
      });
      return {
        file: a,
        patterns: [
          new RegExp(
            `the backing chain loops: backing file ${esc(a)} \\(named in ${esc(b)}\\) is add-cow file ${esc(a)}`,
          ),
        ],
      };
    },
  },
  {
    name: "chain loop: a disk is its own backing file",
    build(dir) {
      const d = plain(dir, { size: SIZE, backingName: "d.add-cow", backingFormat: "add-cow" });
      return { file: d.addcow, patterns: [/the backing chain loops: backing file .*d\.add-cow/] };
    },
  },
  {
    name: `chain deeper than MAX_CHAIN_DEPTH (${MAX_CHAIN_DEPTH})`,
    build(dir) {
      const files = chain(dir, MAX_CHAIN_DEPTH + 1);
      return {
        file: files[0]!,
        patterns: [
          new RegExp(
            `^${esc(files[MAX_CHAIN_DEPTH]!)} \\(named in ${esc(files[MAX_CHAIN_DEPTH - 1]!)}\\): the backing chain is deeper than MAX_CHAIN_DEPTH = 64 layers`,
          ),
        ],
      };
    },
  },
  {
    name: "image file cannot be written (immutable): writable open refused",
    build(dir) {
      const d = plain(dir);
      if (!spawnQuiet("chattr", ["+i", d.image]))
        return { file: d.addcow, patterns: [], modes: [] };
      immutable.push(d.image);
      return {
        file: d.addcow,
        modes: ["write"],
        patterns: [
          /image file .*d\.raw \(named in .*d\.add-cow\) cannot be opened for writing: permission denied; open the disk read-only/,
        ],
      };
    },
  },
];
