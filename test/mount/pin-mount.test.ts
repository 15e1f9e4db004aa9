/**
 * A base that changed between two mounts is refused (docs/specs/add-cow.md,
 * "The backing pin"; docs/remote.md, "Identity"), through the mount as a user
 * runs it: create over a base, write through the mounted file, replace the
 * base (a remote object on nginx with a new ETag; a local raw file with other
 * bytes of the same size), mount again: refused in one line; `rebase -u`
 * with the same URL or path accepts it after a warning, and the mount then
 * shows the guest's writes over the new base. A manifest published at
 * URL.manifest is pinned too.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, mountDisk, run, sh, writePatternFile } from "../helpers/mount";
import { ADDCOW } from "../helpers/cli";
import { servedBase, startS3 } from "../helpers/remote-servers";
import { tempDir } from "../helpers/mount";

afterEach(cleanupAll);

const MiB = 1 << 20;
const BASE = 6 * MiB + 4096;

async function addcow(env: NodeJS.ProcessEnv, cwd: string, ...args: string[]) {
  return run(process.execPath, [ADDCOW, ...args], { env: { ...process.env, ...env }, cwd });
}

/** Writes through the mounted file: two pieces, one across a cluster boundary. */
async function guestWrites(file: string, data: string) {
  await sh("dd", [
    `if=${data}`,
    `of=${file}`,
    "bs=64k",
    "seek=3",
    "conv=notrunc,fsync",
    "status=none",
  ]);
  await sh("dd", [
    `if=${data}`,
    `of=${file}`,
    "bs=1",
    "count=3000",
    "seek=5000000",
    "conv=notrunc,fsync",
    "status=none",
  ]);
}

/** What the disk must read: the base with the guest's writes over it. */
function expected(base: string, data: string): Buffer {
  const out = fs.readFileSync(base);
  const d = fs.readFileSync(data);
  d.copy(out, 3 * 64 * 1024);
  d.copy(out, 5000000, 0, 3000);
  return out;
}

const CLUSTER = 64 * 1024;
const WRITTEN: Array<[number, number]> = [
  [3 * CLUSTER, 200 * 1024 + 17],
  [5000000, 3000],
];

/**
 * What the disk reads once re-pinned on a new base: the new base, except the
 * clusters the guest wrote, which the overlay holds whole (copy-on-write
 * filled them from the old base): why guest data may not match the new one.
 */
function overNewBase(before: Buffer, newBase: string): Buffer {
  const out = fs.readFileSync(newBase);
  for (const [at, len] of WRITTEN) {
    const c0 = Math.floor(at / CLUSTER) * CLUSTER;
    const c1 = Math.min(out.length, Math.ceil((at + len) / CLUSTER) * CLUSTER);
    before.copy(out, c0, c0, c1);
  }
  return out;
}

/** Replaces a file by other bytes of the same size, with a later mtime (nginx's ETag changes). */
function replaceBase(file: string, seed: number) {
  const st = fs.statSync(file);
  writePatternFile(file, st.size, seed);
  const later = new Date(st.mtimeMs + 10_000);
  fs.utimesSync(file, later, later);
}

function remoteEnv(dir: string): NodeJS.ProcessEnv {
  return {
    ADDCOW_CACHE_DIR: path.join(dir, "cache"),
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "1",
  };
}

async function mountFails(disk: string, mnt: string, env: NodeJS.ProcessEnv): Promise<string> {
  try {
    const m = await mountDisk(disk, mnt, { env: { ...process.env, ...env } });
    await m.unmount();
  } catch (err) {
    return (err as Error).message;
  }
  throw new Error(`${disk} was mounted on a changed base`);
}

describe("a changed base, through the mount", () => {
  it("remote (nginx): a new ETag is refused at mount; rebase -u with the same URL re-pins after a warning", async () => {
    const { dir, base, url } = await servedBase(BASE, 41);
    const env = remoteEnv(dir);
    const disk = path.join(dir, "vm.add-cow");
    const c = await addcow(env, dir, "create", "-q", "-b", url, "-F", "raw", disk, "8M");
    expect(c.code, c.stderr).toBe(0);
    const data = path.join(dir, "guest.bin");
    writePatternFile(data, 200 * 1024 + 17, 42);
    let m = await mountDisk(disk, path.join(dir, "mnt"), { env: { ...process.env, ...env } });
    await guestWrites(m.file, data);
    await m.unmount();
    const first = expected(base, data);

    // The base is replaced under the same URL: another ETag.
    replaceBase(base, 43);
    const refused = await mountFails(disk, path.join(dir, "mnt"), env);
    expect(refused).toMatch(
      /vm\.add-cow: backing file http:\/\/127\.0\.0\.1:\d+\/base\.raw is not the one this disk was made on \(ETag was "[^"]+", now "[^"]+"\): .*addcow rebase -u -b http:\/\/127\.0\.0\.1:\d+\/base\.raw -F raw .*vm\.add-cow$/,
    );
    expect(refused.split("\n")).toHaveLength(1);

    const u = await addcow(env, dir, "rebase", "-u", "-b", url, "-F", "raw", disk);
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toMatch(
      /^addcow: warning: .*vm\.add-cow was pinned to another base than .* is now \(ETag was "[^"]+", now "[^"]+"\): guest data written over the old base may not match the new one/,
    );
    m = await mountDisk(disk, path.join(dir, "mnt"), { env: { ...process.env, ...env } });
    const now = fs.readFileSync(m.file);
    await m.unmount();
    expect(now.subarray(0, BASE).equals(overNewBase(first, base))).toBe(true);
    expect(now.subarray(BASE).every((b) => b === 0)).toBe(true);
  });

  it("remote (nginx) with a manifest at URL.manifest: pinned; one left from the old base refuses the re-pin; one altered on the server refuses the mount", async () => {
    const { dir, base, url } = await servedBase(BASE, 44);
    const env = remoteEnv(dir);
    // The manifest, made from the URL (read from the server), is the local file's.
    const made = await addcow(env, dir, "manifest", url);
    expect(made.code, made.stderr).toBe(0);
    expect(made.stdout).toMatch(
      new RegExp(
        `^wrote base\\.raw\\.manifest: 97 blocks of 65536 bytes over ${BASE} bytes, sha256 [0-9a-f]{64}; publish it at ${url}\\.manifest`,
      ),
    );
    const local = await addcow(env, dir, "manifest", base, "-o", path.join(dir, "local.manifest"));
    expect(local.code, local.stderr).toBe(0);
    expect(fs.readFileSync(path.join(dir, "base.raw.manifest"))).toEqual(
      fs.readFileSync(path.join(dir, "local.manifest")),
    );
    fs.copyFileSync(path.join(dir, "base.raw.manifest"), `${base}.manifest`);

    const disk = path.join(dir, "vm.add-cow");
    const c = await addcow(env, dir, "create", "-q", "-b", url, "-F", "raw", disk);
    expect(c.code, c.stderr).toBe(0);
    const info = JSON.parse((await addcow(env, dir, "info", "--json", disk)).stdout);
    expect(info.pin).toMatchObject({
      state: "pinned",
      identity: {
        kind: "remote",
        size: BASE,
        etag: expect.stringMatching(/^".+"$/),
        endpoint: null,
        manifest: { location: null, sha256: expect.stringMatching(/^[0-9a-f]{64}$/) },
      },
    });
    let m = await mountDisk(disk, path.join(dir, "mnt"), { env: { ...process.env, ...env } });
    expect(fs.readFileSync(m.file).equals(fs.readFileSync(base))).toBe(true);
    await m.unmount();

    // A new base, but the manifest beside it is still the old one: not pinned.
    replaceBase(base, 45);
    let u = await addcow(env, dir, "rebase", "-u", "-b", url, "-F", "raw", disk);
    expect(u.code).toBe(1);
    expect(u.stderr).toMatch(/manifest .*base\.raw\.manifest does not match the base: block 0/);
    // Published again: the re-pin goes through, naming both changes.
    expect((await addcow(env, dir, "manifest", "-q", base, "-o", `${base}.manifest`)).code).toBe(0);
    u = await addcow(env, dir, "rebase", "-u", "-b", url, "-F", "raw", disk);
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toMatch(
      /\(ETag was "[^"]+", now "[^"]+"; manifest was [0-9a-f]{16}\.\.\., now [0-9a-f]{16}\.\.\.\)/,
    );
    m = await mountDisk(disk, path.join(dir, "mnt"), { env: { ...process.env, ...env } });
    await m.unmount();

    // Another manifest on the server (same base): the pinned digest differs.
    expect(
      (
        await addcow(
          env,
          dir,
          "manifest",
          "-q",
          "--block-size",
          "1M",
          base,
          "-o",
          `${base}.manifest`,
        )
      ).code,
    ).toBe(0);
    const other = await mountFails(disk, path.join(dir, "mnt"), env);
    expect(other).toMatch(
      /is not the one this disk was made on \(manifest was [0-9a-f]{16}\.\.\., now [0-9a-f]{16}\.\.\.\)/,
    );
    // An altered one is refused by its own checksum.
    expect((await addcow(env, dir, "manifest", "-q", base, "-o", `${base}.manifest`)).code).toBe(0);
    const manifest = fs.readFileSync(`${base}.manifest`);
    manifest[100] = manifest[100]! ^ 1;
    fs.writeFileSync(`${base}.manifest`, manifest);
    const bad = await mountFails(disk, path.join(dir, "mnt"), env);
    expect(bad).toMatch(
      /manifest http:\/\/.*base\.raw\.manifest: its checksum does not match its contents/,
    );
    // Gone from the server: refused too, saying so.
    fs.rmSync(`${base}.manifest`);
    const gone = await mountFails(disk, path.join(dir, "mnt"), env);
    expect(gone).toMatch(
      /its manifest .*base\.raw\.manifest, pinned in the disk, is not found \(HTTP 404\)/,
    );
  });

  it("local raw: other bytes of the same size are refused at mount; rebase -u accepts them", async () => {
    const dir = tempDir();
    const base = path.join(dir, "base.raw");
    writePatternFile(base, BASE, 51);
    const disk = path.join(dir, "vm.add-cow");
    expect((await addcow({}, dir, "create", "-q", "-b", "base.raw", "-F", "raw", disk)).code).toBe(
      0,
    );
    const data = path.join(dir, "guest.bin");
    writePatternFile(data, 200 * 1024 + 17, 52);
    let m = await mountDisk(disk, path.join(dir, "mnt"));
    await guestWrites(m.file, data);
    await m.unmount();
    const first = expected(base, data);

    replaceBase(base, 53);
    const refused = await mountFails(disk, path.join(dir, "mnt"), {});
    expect(refused).toMatch(
      /vm\.add-cow: backing file .*base\.raw is not the one this disk was made on \(fingerprint was [0-9a-f]{16}\.\.\., now [0-9a-f]{16}\.\.\.\)/,
    );
    const u = await addcow({}, dir, "rebase", "-u", "-b", "base.raw", "-F", "raw", disk);
    expect(u.code, u.stderr).toBe(0);
    expect(u.stderr).toMatch(
      /^addcow: warning: .*guest data written over the old base may not match/,
    );
    m = await mountDisk(disk, path.join(dir, "mnt"));
    expect(fs.readFileSync(m.file).equals(overNewBase(first, base))).toBe(true);
    await m.unmount();
  });

  it("a live snapshot pins the mounted disk (by its id) in the new top, which then refuses a replaced lower disk", async () => {
    const dir = tempDir();
    writePatternFile(path.join(dir, "base.raw"), BASE, 71);
    const disk = path.join(dir, "vm.add-cow");
    expect((await addcow({}, dir, "create", "-q", "-b", "base.raw", "-F", "raw", disk)).code).toBe(
      0,
    );
    const lower = JSON.parse((await addcow({}, dir, "info", "--json", disk)).stdout).pin;
    const m = await mountDisk(disk, path.join(dir, "mnt"));
    const s = await addcow({}, dir, "snapshot", disk, path.join(dir, "top.add-cow"));
    expect(s.code, s.stderr).toBe(0);
    expect(s.stdout).toMatch(/mounted file switched to it/);
    await m.unmount();
    const top = path.join(dir, "top.add-cow");
    const pin = JSON.parse((await addcow({}, dir, "info", "--json", top)).stdout).pin;
    expect(pin).toMatchObject({
      state: "pinned",
      identity: { kind: "add-cow", size: BASE, disk: lower.disk },
    });
    // vm.add-cow made again over the same base: same names, same size, another disk.
    fs.rmSync(disk);
    fs.rmSync(path.join(dir, "vm.raw"));
    expect((await addcow({}, dir, "create", "-q", "-b", "base.raw", "-F", "raw", disk)).code).toBe(
      0,
    );
    const refused = await mountFails(top, path.join(dir, "mnt"), {});
    expect(refused).toMatch(
      /vm\.add-cow is not the one this disk was made on \(disk id was [0-9a-f]{32}, now [0-9a-f]{32}\)/,
    );
  });

  it("s3: the endpoint is part of the pin, a replaced object refused", async () => {
    const dir = tempDir();
    const s3 = await startS3(path.join(dir, "s3"), ["golden"]);
    const base = path.join(dir, "base.raw");
    writePatternFile(base, BASE, 61);
    await s3.put("golden", "base.raw", base);
    const env = { ...s3.env, ADDCOW_CACHE_DIR: "none" };
    const disk = path.join(dir, "vm.add-cow");
    const c = await addcow(
      env,
      dir,
      "create",
      "-q",
      "-b",
      "s3://golden/base.raw",
      "-F",
      "raw",
      disk,
    );
    expect(c.code, c.stderr).toBe(0);
    const info = JSON.parse((await addcow(env, dir, "info", "--json", disk)).stdout);
    expect(info.pin.identity).toMatchObject({
      kind: "remote",
      endpoint: s3.endpoint,
      manifest: null,
    });
    writePatternFile(base, BASE, 62);
    await s3.put("golden", "base.raw", base);
    const r = await addcow(env, dir, "info", disk);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(
      /s3:\/\/golden\/base\.raw is not the one this disk was made on \(ETag was/,
    );
  });
});
