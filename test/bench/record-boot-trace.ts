/**
 * Records the boot-like read pattern the remote benchmark replays
 * (test/bench/traces/boot-ext4.trace), from real tools on a real file system:
 *
 *  1. a 256 MiB ext4 image (mkfs.ext4 -d, 4 KiB blocks) holding a copy of this
 *     machine's /usr/lib/python3.11, /usr/lib/python3, /usr/share/perl and /etc
 *     (about 125 MB in 5800 files);
 *  2. served by nginx and opened through addcow as a remote base that fetches
 *     exactly what is read (4 KiB pieces, no readahead, no cache), mounted;
 *  3. the "boot", on the mounted file: `e2fsck -fn` (what a boot-time check
 *     reads: every inode table, bitmap and directory), then the image
 *     loop-mounted read-only by the kernel (its ext4 and readahead), `find -ls`
 *     over everything, and the files a start-up reads: all of /etc, the
 *     top-level Python modules, every 64th other file;
 *  4. nginx's access log in order is the trace: one line "OFFSET LENGTH" per
 *     range the kernel and the tools asked for that was not already read.
 *
 * Run as root after `npm run build`: node dist/test/bench/record-boot-trace.js [OUT]
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { cleanupAll, mountBlock, mountDisk, run, sh, tempDir } from "../helpers/mount";
import { startNginx } from "../helpers/remote-servers";
import { repoRoot } from "./systems";

const ADDCOW = path.join(repoRoot, "dist/src/cli/addcow.js");

const IMAGE_BYTES = 256 << 20;
const TREES = ["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/perl", "/etc"];

export const DEFAULT_TRACE = path.join(repoRoot, "test/bench/traces/boot-ext4.trace");

async function record(out: string): Promise<void> {
  const dir = tempDir("addcow-trace-");
  const tree = path.join(dir, "tree");
  for (const t of TREES) {
    fs.mkdirSync(path.join(tree, path.dirname(t)), { recursive: true });
    await sh("cp", ["-a", t, path.join(tree, t)]);
  }
  const www = path.join(dir, "www");
  fs.mkdirSync(www);
  const image = path.join(www, "base.raw");
  await sh("mkfs.ext4", ["-q", "-F", "-b", "4096", "-L", "bootlike", "-d", tree, image, "256M"]);
  fs.rmSync(tree, { recursive: true, force: true });
  if (fs.statSync(image).size !== IMAGE_BYTES) throw new Error("unexpected image size");
  const nginx = await startNginx(path.join(dir, "nginx"), www);
  const env = {
    ...process.env,
    ADDCOW_CACHE_DIR: "none",
    ADDCOW_REMOTE_MIN_REQUEST: "4K",
    ADDCOW_REMOTE_READAHEAD: "0",
    ADDCOW_REMOTE_MAX_REQUEST: "64M",
  };
  const disk = path.join(dir, "boot.add-cow");
  const c = await run(
    process.execPath,
    [ADDCOW, "create", "-q", "-b", `${nginx.baseUrl}base.raw`, "-F", "raw", disk],
    { env },
  );
  if (c.code !== 0) throw new Error(c.stderr);
  const m = await mountDisk(disk, path.join(dir, "m"), { env });
  const ranges = (from: number) =>
    nginx
      .requests()
      .slice(from)
      .map((l) => /"bytes=(\d+)-(\d+)"/.exec(l))
      .filter((r): r is RegExpExecArray => r !== null)
      .map((r) => `${r[1]} ${Number(r[2]) - Number(r[1]) + 1}`);
  const lines: string[] = [];
  let seen = nginx.requests().length; // the probe is not part of the boot
  const phase = (name: string) => {
    const now = nginx.requests().length;
    lines.push(`# ${name}`, ...ranges(seen));
    seen = now;
  };
  // e2fsck exits 0 for a clean file system (-n: read only, answer no).
  await sh("e2fsck", ["-fn", m.file]);
  phase("e2fsck -fn");
  const loop = (await sh("losetup", ["-r", "-f", "--show", m.file])).stdout.trim();
  const root = path.join(dir, "root");
  try {
    await mountBlock(loop, root, "ro,noload");
    await sh("find", [root, "-xdev", "-ls"]);
    phase("mount -o ro, find -ls");
    const files = (await sh("find", [root, "-xdev", "-type", "f"])).stdout
      .split("\n")
      .filter((f) => f !== "")
      .sort();
    const wanted = files.filter(
      (f, i) =>
        f.startsWith(path.join(root, "etc") + "/") ||
        /\/usr\/lib\/python3\.11\/[^/]+\.py$/.test(f) ||
        i % 64 === 0,
    );
    for (let i = 0; i < wanted.length; i += 200) {
      await sh("cat", wanted.slice(i, i + 200)).catch(() => undefined);
    }
    phase("cat: /etc, top-level Python modules, every 64th other file");
    await sh("umount", [root]);
  } finally {
    await run("umount", ["-l", root]);
    await run("losetup", ["-d", loop]);
  }
  await m.unmount();
  phase("umount");
  const header = [
    "# addcow boot-like read trace: OFFSET LENGTH (bytes) per line, in the order read.",
    `# ${IMAGE_BYTES} byte ext4 image of ${TREES.join(", ")}; e2fsck -fn, then a read-only`,
    "# kernel mount: find -ls, all of /etc, the top-level Python modules, every 64th other file.",
    "# Made by test/bench/record-boot-trace.ts (see there); first reads only (re-reads hit caches).",
  ];
  fs.mkdirSync(path.dirname(out), { recursive: true });
  fs.writeFileSync(out, [...header, ...lines].join("\n") + "\n");
  const reads = lines.filter((l) => !l.startsWith("#"));
  const total = reads.reduce((s, l) => s + Number(l.split(" ")[1]), 0);
  process.stdout.write(`${out}: ${reads.length} reads, ${(total / 2 ** 20).toFixed(1)} MiB\n`);
}

if (require.main === module) {
  record(process.argv[2] ?? DEFAULT_TRACE)
    .catch((err: unknown) => {
      process.stderr.write(`${(err as Error).stack ?? String(err)}\n`);
      process.exitCode = 1;
    })
    .finally(() => cleanupAll());
}
