/**
 * Verified blocks and the cache by digest through the mount, as an operator
 * runs them (docs/remote.md, "Verified blocks"): `addcow manifest` published
 * at URL.manifest, `create` pins it, the mounted file reads the base exactly;
 * a mirror that serves one wrong byte under the right ETag (the fault proxy)
 * gives EIO for that block only, one line in the daemon's log, nothing
 * cached for it; `-o verify=required` refuses a base without a manifest; and
 * v2 of a base that differs from v1 in 5% of its blocks fetches those blocks
 * only once v1 is cached (bytes counted in nginx's access log).
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { cleanupAll, mountDisk, run, sh, tempDir } from "../helpers/mount";
import { ADDCOW } from "../helpers/cli";
import { servedBase, servedBytes, startNginx, startProxy } from "../helpers/remote-servers";
import { cacheState } from "../helpers/remote-cache-layout";
import { sha256, twoVersions } from "../helpers/manifests";

afterEach(cleanupAll);

const KiB = 1024;
const MiB = 1024 * KiB;
const BS = 64 * KiB;

async function addcow(env: NodeJS.ProcessEnv, cwd: string, ...args: string[]) {
  return run(process.execPath, [ADDCOW, ...args], { env: { ...process.env, ...env }, cwd });
}

function remoteEnv(dir: string): NodeJS.ProcessEnv {
  return {
    ADDCOW_CACHE_DIR: path.join(dir, "cache"),
    ADDCOW_REMOTE_TIMEOUT: "5",
    ADDCOW_REMOTE_RETRIES: "1",
  };
}

/** `addcow manifest URL`, published beside the base (nginx serves `www`). */
async function publishManifest(env: NodeJS.ProcessEnv, dir: string, url: string, file: string) {
  const r = await addcow(env, dir, "manifest", url, "-o", `${file}.manifest`);
  expect(r.code, r.stderr).toBe(0);
  expect(r.stdout).toMatch(/ blocks of 65536 bytes over /);
}

describe("verified blocks through the mount", () => {
  it("a pinned manifest: the mount reads the base; a mirror flipping a byte under the right ETag fails that block only, says so once, caches none of it", async () => {
    const BASE = 8 * MiB + 3 * 4096;
    const { dir, base, nginx } = await servedBase(BASE, 51);
    const env = remoteEnv(dir);
    const proxy = await startProxy(`http://127.0.0.1:${nginx.port}`);
    const url = `${proxy.url}/base.raw`;
    await publishManifest(env, dir, url, base);
    const disk = path.join(dir, "vm.add-cow");
    const c = await addcow(env, dir, "create", "-q", "-b", url, "-F", "raw", disk);
    expect(c.code, c.stderr).toBe(0);
    const info = await addcow(env, dir, "info", disk);
    expect(info.code, info.stderr).toBe(0);
    expect(info.stdout).toMatch(
      /^remote blocks: verified \(each 64 KiB block against manifest http:\/\/127\.0\.0\.1:\d+\/base\.raw\.manifest, sha256 [0-9a-f]{16}\.\.\.\)$/m,
    );
    expect(info.stdout).toMatch(
      /^remote cache: .*\/cache\/v3\/sha256: 0 B of 8\.01 MiB cached \(0\.00%\), blocks stored by SHA-256/m,
    );

    const local = fs.readFileSync(base);
    const bad = 5 * MiB + 777; // in block 80
    proxy.mode = { kind: "corrupt", at: [bad] };
    const log = path.join(dir, "daemon.log");
    const m = await mountDisk(disk, path.join(dir, "mnt"), {
      env: { ...process.env, ...env, ADDCOW_MOUNT_LOG: log },
    });
    const out = path.join(dir, "read.bin");
    // dd reads on past the bad block (noerror) and pads it (sync): everything else must be the base.
    const r = await run("dd", [
      `if=${m.file}`,
      `of=${out}`,
      "bs=64k",
      `count=${Math.ceil(BASE / BS)}`,
      "iflag=direct",
      "conv=noerror,sync",
    ]);
    const again = await run("dd", [
      `if=${m.file}`,
      "of=/dev/null",
      "bs=4k",
      "count=1",
      `skip=${Math.floor(bad / 4096)}`,
      "iflag=direct",
    ]);
    await m.unmount();
    expect(r.stderr.match(/Input\/output error/g), r.stderr).toHaveLength(1);
    expect(again.stderr).toMatch(/Input\/output error/);
    const got = fs.readFileSync(out).subarray(0, BASE);
    const expected = Buffer.from(local);
    expected.fill(0, 80 * BS, 81 * BS);
    expect(got.equals(expected)).toBe(true);
    const lines = fs
      .readFileSync(log, "utf8")
      .split("\n")
      .filter((l) => /does not match its manifest/.test(l));
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(
      new RegExp(
        `block 80 \\(bytes 5242880-5308415\\) does not match its manifest http://127\\.0\\.0\\.1:\\d+/base\\.raw\\.manifest: sha256 expected ${sha256(
          local.subarray(80 * BS, 81 * BS),
        )
          .toString("hex")
          .slice(0, 16)}\\.\\.\\., got [0-9a-f]{16}\\.\\.\\.`,
      ),
    );
    const state = cacheState(env.ADDCOW_CACHE_DIR!);
    expect(state.badDigests).toEqual([]);
    // (create read the first and last blocks, unpinned yet: those are in a URL-keyed entry.)
    expect(state.files.map((f) => path.basename(f)).sort()).toEqual(["0.blk", "8.blk"]);
    expect(state.digests).not.toContain(sha256(local.subarray(80 * BS, 81 * BS)).toString("hex"));
    expect(state.digests).toHaveLength(Math.ceil(BASE / BS) - 1);

    // The mirror fixed: the block is fetched and the disk reads whole; info counts bytes.
    proxy.mode = { kind: "pass" };
    const m2 = await mountDisk(disk, path.join(dir, "mnt"), { env: { ...process.env, ...env } });
    await sh("cmp", ["-n", String(BASE), m2.file, base]);
    await m2.unmount();
    const after = await addcow(env, dir, "info", disk);
    expect(after.stdout).toMatch(/^remote cache: .*: 8\.01 MiB of 8\.01 MiB cached \(100\.00%\)/m);
    const json = JSON.parse((await addcow(env, dir, "info", "--json", disk)).stdout);
    expect(json.backing.details).toMatchObject({
      cachedBytes: BASE,
      verifiedBy: { blockSize: BS, blocks: Math.ceil(BASE / BS) },
    });
  }, 120_000);

  it("-o verify=required refuses a base without a manifest in one line (ADDCOW_VERIFY=required for the commands); once one is published it mounts and checks", async () => {
    const { dir, base, url } = await servedBase(4 * MiB, 52);
    const env = remoteEnv(dir);
    const disk = path.join(dir, "vm.add-cow");
    expect((await addcow(env, dir, "create", "-q", "-b", url, "-F", "raw", disk)).code).toBe(0);
    const plain = await addcow(env, dir, "info", disk);
    expect(plain.stdout).toMatch(/^remote blocks: not verified \(no manifest pinned;/m);
    let err = "";
    try {
      const m = await mountDisk(disk, path.join(dir, "mnt"), {
        env: { ...process.env, ...env },
        options: "verify=required",
      });
      await m.unmount();
    } catch (e) {
      err = (e as Error).message;
    }
    expect(err).toMatch(
      /verification is required \(verify=required\) but it has no manifest: none is pinned in the disk and none is published at http:\/\/127\.0\.0\.1:\d+\/base\.raw\.manifest \(HTTP 404\)/,
    );
    expect(err.trim().split("\n")).toHaveLength(1);
    const info = await addcow({ ...env, ADDCOW_VERIFY: "required" }, dir, "info", disk);
    expect(info.code).toBe(1);
    expect(info.stderr).toMatch(/verification is required/);
    expect(info.stderr.trim().split("\n")).toHaveLength(1);
    const bogus = await addcow({ ...env, ADDCOW_VERIFY: "maybe" }, dir, "info", disk);
    expect(bogus.stderr).toMatch(/^addcow: invalid ADDCOW_VERIFY=maybe: use verify=required/);

    await publishManifest(env, dir, url, base);
    const m = await mountDisk(disk, path.join(dir, "mnt"), {
      env: { ...process.env, ...env },
      options: "verify=required",
    });
    await sh("cmp", ["-n", String(4 * MiB), m.file, base]);
    await m.unmount();
    expect(cacheState(env.ADDCOW_CACHE_DIR!).digests).toHaveLength(64);
  }, 120_000);

  it("v2 that differs from v1 in 5% of its 64 KiB blocks fetches about 5% when v1 is cached (nginx counts the bytes)", async () => {
    const dir = tempDir();
    const SIZE = 32 * MiB;
    const { www, blocks, changed } = twoVersions(dir, SIZE, BS, 53);
    const nginx = await startNginx(path.join(dir, "nginx"), www);
    const env = remoteEnv(dir);
    for (const v of ["v1", "v2"]) {
      const url = `${nginx.baseUrl}${v}.raw`;
      await publishManifest(env, dir, url, path.join(www, `${v}.raw`));
      const c = await addcow(env, dir, "create", "-q", "-b", url, "-F", "raw", `${v}.add-cow`);
      expect(c.code, c.stderr).toBe(0);
    }
    const readThrough = async (v: string) => {
      const before = servedBytes(nginx.requests(), `/${v}.raw`);
      const m = await mountDisk(path.join(dir, `${v}.add-cow`), path.join(dir, `mnt-${v}`), {
        env: { ...process.env, ...env },
      });
      await sh("cmp", ["-n", String(SIZE), m.file, path.join(www, `${v}.raw`)]);
      await m.unmount();
      return servedBytes(nginx.requests(), `/${v}.raw`) - before;
    };
    expect(await readThrough("v1")).toBe(SIZE);
    const fetched = await readThrough("v2");
    // 26 of 512 blocks changed (5.1%): those and nothing else.
    expect(changed).toHaveLength(26);
    expect(fetched).toBe(changed.length * BS);
    expect(cacheState(env.ADDCOW_CACHE_DIR!).digests).toHaveLength(blocks + changed.length);
  }, 120_000);
});
