/**
 * Tenant disks, second round (issue 19): root mounts and inspects disks of
 * tenants who control every path component they own, may run servers, and
 * can signal their own processes. Each finding of the issue is a test here,
 * run as root with real tenant users (nobody, and uids without accounts),
 * real mounts and stand-in servers on 127.0.0.x; the checksums of every file
 * of root's and of the golden directory are taken before and after, and
 * commands run bounded in time. The legitimate layouts keep working.
 */
import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { type FileIO, openPosixFile } from "../../src/block/file-io";
import { openDisk } from "../../src/chain/open-chain";
import { snapshotTree, writeDisk, writeRaw } from "../helpers/bad-files";
import {
  MOUNT_BIN,
  cleanupAll,
  deferCleanup,
  mountDisk,
  processAlive,
  run,
  sh,
  tempDir,
  trackMount,
} from "../helpers/mount";
import {
  ADDCOW,
  KiB,
  NOBODY,
  addcow,
  asNobody,
  chownTo,
  env,
  mountRefused,
  mountedAt,
  oneLine,
  rootFile,
  spawnOk,
} from "../helpers/trust";
import { fingerprint } from "../helpers/cli";
import { closedPort, standIn } from "../helpers/stand-ins";

afterEach(cleanupAll);

/** A uid without an account: a second tenant. */
const OTHER = 4242;

interface Host {
  root: string;
  /** Root's own directories (0700 and 0755) and the shared golden images (0755, files 0644). */
  rootOnly: string;
  rootShared: string;
  golden: string;
  /** The tenants' directories. */
  tenant: string;
  other: string;
  mnt: string;
}

/** A temp tree laid out like a host serving tenants (docs/security.md). */
function host(): Host {
  const root = tempDir("addcow-tenant-");
  fs.chmodSync(root, 0o755);
  const h: Host = {
    root,
    rootOnly: path.join(root, "root-only"),
    rootShared: path.join(root, "root-shared"),
    golden: path.join(root, "golden"),
    tenant: path.join(root, "tenant"),
    other: path.join(root, "other"),
    mnt: path.join(root, "mnt"),
  };
  fs.mkdirSync(h.rootOnly, { mode: 0o700 });
  for (const d of [h.rootShared, h.golden, h.tenant, h.other]) fs.mkdirSync(d, { mode: 0o755 });
  fs.chmodSync(h.other, 0o700);
  chownTo(NOBODY, h.tenant);
  chownTo(OTHER, h.other);
  return h;
}

/** Everything root's and the golden directory hold, to compare before and after. */
function rootState(h: Host): string {
  return [h.rootOnly, h.rootShared, h.golden, h.other]
    .map((d) => `${d}\n${[...snapshotTree(d)].join("\n")}`)
    .join("\n---\n");
}

/** A symbolic link owned by uid (as that user would make it). */
function linkAs(uid: number, target: string, link: string): string {
  fs.symlinkSync(target, link);
  chownTo(uid, link);
  return link;
}

/** A disk of uid's in dir (its .add-cow and image files theirs). */
function diskOf(uid: number, dir: string, name: string, spec: Parameters<typeof writeDisk>[2]) {
  const d = writeDisk(dir, name, spec);
  chownTo(uid, d.addcow, ...(spec.noImage ? [] : [d.image]));
  return d;
}

/** info, map and check as root all refuse with one line matching `pattern`. */
async function inspectRefused(file: string, pattern: RegExp, flags: string[] = []): Promise<void> {
  for (const command of ["info", "map", "check"]) {
    const r = await addcow([command, ...flags, file], { timeoutMs: 30_000 });
    expect(oneLine(r, "addcow"), command).toMatch(pattern);
  }
}

describe("who controls the way to a disk judges it (findings 1 and 3)", () => {
  it("finding 1: a tenant's link to root's disk with relative names, and the tenant's links beside it", async () => {
    const h = host();
    // Root's own VM disk in a 0700 directory: relative names vm.raw (image) and base.raw.
    const secret = rootFile(path.join(h.rootOnly, "secret"), 128 * KiB, 0o600, 0x5e);
    const target = rootFile(path.join(h.rootOnly, "target"), 128 * KiB, 0o600, 0x7a);
    const vm = path.join(h.rootOnly, "vm");
    fs.mkdirSync(vm, { mode: 0o700 });
    rootFile(path.join(vm, "base.raw"), 128 * KiB, 0o600, 0x11);
    const rootDisk = writeDisk(vm, "vm", {
      size: 128 * KiB,
      backingName: "base.raw",
      backingFormat: "raw",
    });
    // The tenant's plants: the disk is a link to root's; vm.raw and base.raw beside it lead to root's secrets.
    const disk = linkAs(NOBODY, rootDisk.addcow, path.join(h.tenant, "disk.add-cow"));
    linkAs(NOBODY, target, path.join(h.tenant, "vm.raw"));
    linkAs(NOBODY, secret, path.join(h.tenant, "base.raw"));
    const before = rootState(h);

    const refusal =
      /^add-cow file .*tenant\/disk\.add-cow is refused: uid 65534, who owns directory .*tenant, may not read (and write )?it \(EACCES\)/;
    await inspectRefused(disk, refusal);
    expect(
      await mountRefused(["-o", `uid=${NOBODY},allow_other`, disk], h.mnt, { timeoutMs: 30_000 }),
    ).toMatch(refusal);
    expect(rootState(h)).toBe(before);
  });

  it("finding 1 under confinement: the tenant's vm.raw beside a link to root's disk leads to the golden base", async () => {
    const h = host();
    const golden = rootFile(path.join(h.golden, "base.raw"), 128 * KiB, 0o644, 0x22);
    // Root's disk in a directory the tenant may read: its image is root's vm.raw there.
    const rootDisk = writeDisk(h.rootShared, "vm", { size: 128 * KiB, fill: 0x44, allSet: true });
    const disk = linkAs(NOBODY, rootDisk.addcow, path.join(h.tenant, "disk.add-cow"));
    linkAs(NOBODY, golden, path.join(h.tenant, "vm.raw"));
    const before = rootState(h);

    const options = `confine,allow_dir=${h.golden},uid=${NOBODY},allow_other`;
    expect(await mountRefused(["-o", options, disk], h.mnt)).toMatch(
      /^add-cow file .*tenant\/disk\.add-cow is refused: uid 65534, who owns directory .*tenant, may not read and write it \(EACCES\)/,
    );
    expect(rootState(h)).toBe(before);

    // Read-only, the tenant gets what it could read anyway: root's own image file,
    // named relative to the directory of the file actually opened, never the tenant's vm.raw.
    const m = await mountDisk(disk, h.mnt, { options: `ro,confine,allow_dir=${h.golden}` });
    expect(fs.readFileSync(m.file).equals(fs.readFileSync(rootDisk.image))).toBe(true);
    await m.unmount();
    expect(rootState(h)).toBe(before);
  });

  it("finding 3: a link to another tenant's disk in that tenant's 0700 directory", async () => {
    const h = host();
    const victim = diskOf(OTHER, h.other, "private", {
      size: 128 * KiB,
      imageName: path.join(h.other, "private.raw"),
      fill: 0x66,
    });
    const disk = linkAs(NOBODY, victim.addcow, path.join(h.tenant, "stolen.add-cow"));
    const before = rootState(h);
    const refusal =
      /^add-cow file .*tenant\/stolen\.add-cow is refused: uid 65534, who owns directory .*tenant, may not read (and write )?it \(EACCES\)/;
    await inspectRefused(disk, refusal);
    expect(await mountRefused(["-o", `uid=${NOBODY},allow_other`, disk], h.mnt)).toMatch(refusal);
    expect(rootState(h)).toBe(before);
  });

  it("root's own disk in a tenant's directory is the tenant's disk", async () => {
    const h = host();
    const secret = rootFile(path.join(h.rootOnly, "secret"), 128 * KiB, 0o600);
    // Left behind by an older addcow create run as root: root's files, in the tenant's directory.
    const d = writeDisk(h.tenant, "old", { size: 128 * KiB, backingName: "base.raw" });
    linkAs(NOBODY, secret, path.join(h.tenant, "base.raw"));
    const before = rootState(h);
    expect(await mountRefused(["-o", "ro", d.addcow], h.mnt)).toMatch(
      /^backing file .*tenant\/base\.raw \(named in .*old\.add-cow\) is refused: uid 65534, who owns directory .*tenant, may not read it \(EACCES\)/,
    );
    await inspectRefused(d.addcow, /^backing file .*tenant\/base\.raw .*is refused: uid 65534/);
    expect(rootState(h)).toBe(before);
  });

  it("a directory on the way that its group or everyone may change (no sticky bit) is refused", async () => {
    const h = host();
    const shared = path.join(h.rootShared, "drop");
    fs.mkdirSync(shared);
    fs.chmodSync(shared, 0o777);
    const d = writeDisk(shared, "d", { size: 128 * KiB });
    const before = rootState(h);
    await inspectRefused(
      d.addcow,
      /^add-cow file .*drop\/d\.add-cow is refused: directory .*drop \(mode 0777\) may be changed by every user without the sticky bit/,
    );
    expect(rootState(h)).toBe(before);
    fs.chmodSync(shared, 0o1777);
    const r = await addcow(["info", d.addcow]);
    expect(r.code, r.stderr).toBe(0);
  });
});

describe("what addcow creates for a tenant is the tenant's (finding 2)", () => {
  /** uid and gid of a file (not following a link). */
  const ownerOf = (f: string) => {
    const st = fs.lstatSync(f);
    return [st.uid, st.gid];
  };

  /** The tenant's disk over a golden base. */
  function tenantOverGolden() {
    const h = host();
    const golden = rootFile(path.join(h.golden, "base.raw"), 256 * KiB, 0o644, 0x5a);
    const d = diskOf(NOBODY, h.tenant, "disk", {
      size: 256 * KiB,
      backingName: golden,
      backingFormat: "raw",
    });
    return { h, golden, d };
  }

  it("create in a tenant's directory: the .add-cow and image files are the tenant's", async () => {
    const h = host();
    const golden = rootFile(path.join(h.golden, "base.raw"), 256 * KiB, 0o644, 0x5a);
    const disk = path.join(h.tenant, "disk.add-cow");
    const r = await addcow(["create", "-q", "-b", golden, "-F", "raw", disk]);
    expect(r.code, r.stderr).toBe(0);
    expect(ownerOf(disk)).toEqual([NOBODY, NOBODY]);
    expect(ownerOf(path.join(h.tenant, "disk.raw"))).toEqual([NOBODY, NOBODY]);
    // The tenant's disk opens as the tenant's (names judged for the tenant).
    const info = await asNobody(process.execPath, [ADDCOW, "info", disk]);
    expect(info.code, info.stderr).toBe(0);
  });

  it("create never follows a link the tenant planted at the image file's name", async () => {
    const h = host();
    const golden = rootFile(path.join(h.golden, "base.raw"), 256 * KiB, 0o644);
    const small = rootFile(path.join(h.rootOnly, "twelve"), 12, 0o600, 0x61);
    linkAs(NOBODY, small, path.join(h.tenant, "disk.raw"));
    const before = rootState(h);
    const disk = path.join(h.tenant, "disk.add-cow");
    expect(
      oneLine(await addcow(["create", "-b", golden, "-F", "raw", disk, "1M"]), "addcow"),
    ).toMatch(
      /^image file .*tenant\/disk\.raw \(named in .*tenant\/disk\.add-cow\) is refused: uid 65534, who owns .*disk\.add-cow, may not read and write it \(EACCES\)/,
    );
    expect(fs.statSync(small).size).toBe(12);
    expect(rootState(h)).toBe(before);
    expect(fs.existsSync(disk)).toBe(false);
  });

  it("create judges the backing file for the tenant whose disk it makes", async () => {
    const h = host();
    const disk = path.join(h.tenant, "disk.add-cow");
    expect(
      oneLine(await addcow(["create", "-b", "/etc/shadow", "-F", "raw", disk]), "addcow"),
    ).toMatch(
      /^backing file \/etc\/shadow \(named in .*tenant\/disk\.add-cow\) is refused: uid 65534/,
    );
    expect(fs.readdirSync(h.tenant)).toEqual([]);
  });

  it("snapshot at rest: the new layer is the tenant's, and its swapped image file cannot reach the golden base", async () => {
    const { h, golden, d } = tenantOverGolden();
    const snap = path.join(h.tenant, "snap.add-cow");
    const r = await addcow(["snapshot", "-q", "--allow-dir", h.golden, d.addcow, snap]);
    expect(r.code, r.stderr).toBe(0);
    expect(ownerOf(snap)).toEqual([NOBODY, NOBODY]);
    expect(ownerOf(path.join(h.tenant, "snap.raw"))).toEqual([NOBODY, NOBODY]);
    // The tenant swaps the new image file for a link to the golden base.
    fs.rmSync(path.join(h.tenant, "snap.raw"));
    linkAs(NOBODY, golden, path.join(h.tenant, "snap.raw"));
    const before = rootState(h);
    expect(
      await mountRefused(["-o", `confine,allow_dir=${h.golden},uid=${NOBODY}`, snap], h.mnt),
    ).toMatch(
      /^image file .*tenant\/snap\.raw \(named in .*snap\.add-cow\) is refused: uid 65534, who owns .*snap\.add-cow, may not read and write it \(EACCES\)/,
    );
    expect(rootState(h)).toBe(before);
  });

  it("snapshot never follows a link planted at the new files' names", async () => {
    const h = host();
    const d = diskOf(NOBODY, h.tenant, "disk", { size: 128 * KiB });
    // Dangling: a plain existence check would not see them.
    linkAs(NOBODY, path.join(h.rootOnly, "new.raw"), path.join(h.tenant, "snap.raw"));
    linkAs(NOBODY, path.join(h.golden, "new.add-cow"), path.join(h.tenant, "snap2.add-cow"));
    const before = rootState(h);
    expect(
      oneLine(await addcow(["snapshot", d.addcow, path.join(h.tenant, "snap.add-cow")]), "addcow"),
    ).toMatch(/^image file .*snap\.raw already exists; a snapshot never reuses a file/);
    expect(
      oneLine(await addcow(["snapshot", d.addcow, path.join(h.tenant, "snap2.add-cow")]), "addcow"),
    ).toMatch(/snap2\.add-cow already exists/);
    expect(rootState(h)).toBe(before);
  });

  it("live snapshot of a mounted tenant disk: the new layer is the tenant's", async () => {
    const { h, d } = tenantOverGolden();
    const m = await mountDisk(d.addcow, h.mnt, {
      options: `confine,allow_dir=${h.golden},uid=${NOBODY}`,
    });
    const snap = path.join(h.tenant, "live.add-cow");
    const r = await addcow(["snapshot", "-q", d.addcow, snap]);
    expect(r.code, r.stderr).toBe(0);
    expect(ownerOf(snap)).toEqual([NOBODY, NOBODY]);
    expect(ownerOf(path.join(h.tenant, "live.raw"))).toEqual([NOBODY, NOBODY]);
    await m.unmount();
  });
});

describe("URLs and credentials are the operator's (finding 4)", () => {
  const IMAGE = Buffer.alloc(128 * KiB, 0x3c);
  const TOKEN = "root-token-0123";

  /** Root's environment for remote backings: no shared cache, one attempt, short timeouts. */
  function remoteEnv(h: Host, extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
    return {
      ...env,
      ADDCOW_CACHE_DIR: "none",
      ADDCOW_REMOTE_RETRIES: "0",
      ADDCOW_REMOTE_TIMEOUT: "5",
      ADDCOW_HTTP_AUTH_FILE: path.join(h.root, "no-auth-file.json"),
      ...extra,
    };
  }

  /** The tenant's disk whose backing file is `url` (raw). */
  function tenantUrlDisk(h: Host, name: string, url: string) {
    return diskOf(NOBODY, h.tenant, name, { size: 128 * KiB, backingName: url }).addcow;
  }

  async function refusedEverywhere(
    h: Host,
    disk: string,
    pattern: RegExp,
    e: NodeJS.ProcessEnv,
    flags: string[] = [],
    mountOptions?: string,
  ): Promise<void> {
    for (const command of ["info", "map", "check"]) {
      const r = await addcow([command, ...flags, disk], { env: e, timeoutMs: 30_000 });
      expect(oneLine(r, "addcow"), command).toMatch(pattern);
    }
    const o = mountOptions ? ["-o", mountOptions] : [];
    expect(await mountRefused([...o, disk], h.mnt, { env: e, timeoutMs: 30_000 })).toMatch(pattern);
  }

  it("a tenant's disk naming a 'metadata service' only root may ask: refused, nothing reaches it", async () => {
    const h = host();
    const metadata = await standIn("127.0.0.2", IMAGE);
    const disk = tenantUrlDisk(h, "meta", `${metadata.origin}/latest/meta-data/iam/credentials`);
    await refusedEverywhere(
      h,
      disk,
      /^backing file http:\/\/127\.0\.0\.2:\d+\/latest\/meta-data\/iam\/credentials \(named in .*meta\.add-cow\) is refused: it is a URL in a disk of uid 65534, who owns .*meta\.add-cow, and another user's disk may name only the origins the operator allows/,
      remoteEnv(h),
    );
    // Any origin allowed (the old bare --allow-url): loopback and link-local still need their name.
    const link = tenantUrlDisk(h, "link", "http://169.254.169.254/latest/meta-data/");
    await refusedEverywhere(
      h,
      link,
      /^backing file http:\/\/169\.254\.169\.254\/latest\/meta-data\/ .*is refused: 169\.254\.169\.254 is a loopback, link-local or unspecified address/,
      remoteEnv(h),
      ["--allow-url"],
      "allow_url",
    );
    const named = tenantUrlDisk(h, "named", `http://localhost:${metadata.port}/latest/meta-data/`);
    await refusedEverywhere(
      h,
      named,
      /^backing file http:\/\/localhost:\d+\/latest\/meta-data\/ .*is refused: localhost resolves to (127\.0\.0\.1|::1), which is a loopback, link-local or unspecified address/,
      remoteEnv(h),
      ["--allow-url"],
      "allow_url",
    );
    expect(metadata.requests).toEqual([]);
  });

  it("a refusal does not tell how a server answered: an open port and a closed one read the same", async () => {
    const h = host();
    const open = await standIn("127.0.0.2", IMAGE, "whole");
    const closed = await closedPort("127.0.0.2");
    const messages: string[] = [];
    for (const [name, url] of [
      ["open", `${open.origin}/x.raw`],
      ["closed", `http://127.0.0.2:${closed}/x.raw`],
    ] as const) {
      const disk = tenantUrlDisk(h, name, url);
      const r = await addcow(["info", disk], { env: remoteEnv(h) });
      const msg = oneLine(r, "addcow").replaceAll(url, "URL").replaceAll(`${name}.add-cow`, "DISK");
      messages.push(msg.replace(/127\.0\.0\.2:\d+/g, "ORIGIN"));
    }
    expect(messages[0]).toBe(messages[1]);
    expect(messages[0]).not.toMatch(/200|range|refused \(|connection/);
    expect(open.requests).toEqual([]);
  });

  it("ADDCOW_HTTP_TOKEN goes only to the origins the operator lends it to", async () => {
    const h = host();
    const theirs = await standIn("127.0.0.3", IMAGE);
    const disk = tenantUrlDisk(h, "t", `${theirs.origin}/x.raw`);
    const e = remoteEnv(h, { ADDCOW_HTTP_TOKEN: TOKEN });
    // Not allowed: refused, nothing sent.
    expect(oneLine(await addcow(["info", disk], { env: e }), "addcow")).toMatch(
      /is refused: it is a URL in a disk of uid 65534/,
    );
    expect(theirs.requests).toEqual([]);
    // Allowed, without credentials: the server gets anonymous requests.
    const allowed = await addcow(["info", "--allow-url", theirs.origin, disk], { env: e });
    expect(allowed.code, allowed.stderr).toBe(0);
    expect(theirs.requests.length).toBeGreaterThan(0);
    expect(theirs.requests.map((r) => r.authorization)).toEqual(
      theirs.requests.map(() => undefined),
    );
    // Lent: the token goes with them (a mount reads the image through it).
    theirs.requests.length = 0;
    const lent = await addcow(["info", "--url-auth", theirs.origin, disk], { env: e });
    expect(lent.code, lent.stderr).toBe(0);
    expect(theirs.requests.every((r) => r.authorization === `Bearer ${TOKEN}`)).toBe(true);
    const m = await mountDisk(disk, h.mnt, {
      options: `url_auth=${theirs.origin},uid=${NOBODY}`,
      env: e,
    });
    // Read asynchronously: the stand-in server answers the daemon from this very process.
    expect((await fs.promises.readFile(m.file)).equals(IMAGE)).toBe(true);
    await m.unmount();
  });

  it("the auth file's entry goes only to an origin the operator lends it to", async () => {
    const h = host();
    const theirs = await standIn("127.0.0.3", IMAGE);
    const authFile = path.join(h.rootOnly, "http-auth.json");
    fs.writeFileSync(authFile, JSON.stringify({ [theirs.origin]: { token: "file-token" } }));
    const e = remoteEnv(h, { ADDCOW_HTTP_AUTH_FILE: authFile });
    const disk = tenantUrlDisk(h, "t", `${theirs.origin}/x.raw`);
    expect(oneLine(await addcow(["info", disk], { env: e }), "addcow")).toMatch(
      /is refused: it is a URL in a disk of uid 65534/,
    );
    expect(theirs.requests).toEqual([]);
    expect((await addcow(["check", "--allow-url", theirs.origin, disk], { env: e })).code).toBe(0);
    expect(theirs.requests.length).toBeGreaterThan(0);
    expect(theirs.requests.some((r) => r.authorization !== undefined)).toBe(false);
    theirs.requests.length = 0;
    expect((await addcow(["check", "--url-auth", theirs.origin, disk], { env: e })).code).toBe(0);
    expect(theirs.requests.every((r) => r.authorization === "Bearer file-token")).toBe(true);
  });

  it("root's AWS keys sign only requests for buckets the operator lends them to", async () => {
    const h = host();
    const s3 = await standIn("127.0.0.4", IMAGE, "s3");
    const e = remoteEnv(h, {
      ADDCOW_S3_ENDPOINT: s3.origin,
      AWS_ACCESS_KEY_ID: "ROOTKEYEXAMPLE",
      AWS_SECRET_ACCESS_KEY: "root-secret-example",
      AWS_REGION: "us-east-1",
    });
    const secret = tenantUrlDisk(h, "secret", "s3://private/vm/secret.raw");
    expect(oneLine(await addcow(["info", secret], { env: e }), "addcow")).toMatch(
      /is refused: it is a URL in a disk of uid 65534/,
    );
    expect(s3.requests).toEqual([]);
    await refusedEverywhere(
      h,
      secret,
      /^backing file s3:\/\/private\/vm\/secret\.raw .*is refused: it is a URL in a disk of uid 65534/,
      e,
      ["--allow-url", "s3://golden"],
      "allow_url=s3://golden",
    );
    expect(s3.requests).toEqual([]);
    const golden = tenantUrlDisk(h, "golden", "s3://golden/base.raw");
    const anon = await addcow(["info", "--allow-url", "s3://golden", golden], { env: e });
    expect(anon.code, anon.stderr).toBe(0);
    expect(s3.requests.length).toBeGreaterThan(0);
    expect(
      s3.requests.every((r) => r.path === "/golden/base.raw" && r.authorization === undefined),
    ).toBe(true);
    s3.requests.length = 0;
    const signed = await addcow(["info", "--url-auth", "s3://golden", golden], { env: e });
    expect(signed.code, signed.stderr).toBe(0);
    expect(
      s3.requests.every((r) => /Credential=ROOTKEYEXAMPLE\//.test(r.authorization ?? "")),
    ).toBe(true);
  });

  it("root's own disk in root's directory names what it likes, with root's token (as before)", async () => {
    const h = host();
    const server = await standIn("127.0.0.2", IMAGE);
    const d = writeDisk(h.rootShared, "own", {
      size: 128 * KiB,
      backingName: `${server.origin}/base.raw`,
    });
    const e = remoteEnv(h, { ADDCOW_HTTP_TOKEN: TOKEN });
    const m = await mountDisk(d.addcow, h.mnt, { env: e });
    // Read asynchronously: the stand-in server answers the daemon from this very process.
    expect((await fs.promises.readFile(m.file)).equals(IMAGE)).toBe(true);
    await m.unmount();
    expect(server.requests.length).toBeGreaterThan(0);
    expect(server.requests.every((r) => r.authorization === `Bearer ${TOKEN}`)).toBe(true);
  });
});

describe("log files (finding 6)", () => {
  /** addcow-mount whose daemon opens its files through a fault injector (test/helpers). */
  const FAULTY = path.resolve(__dirname, "../../dist/test/helpers/faulty-addcow-mount.js");

  /**
   * Mounts the tenant's disk with -o log=LOG. When the daemon starts, it is
   * made to log a line (a failed data sync of the image file, said in the log)
   * and unmounted. Returns the one-line refusal, or null when it mounted.
   */
  async function mountLogging(h: Host, log: string): Promise<string | null> {
    const d = diskOf(NOBODY, h.tenant, `d${Math.random().toString(36).slice(2, 8)}`, {
      size: 128 * KiB,
    });
    const faults = path.join(h.root, "faults.json");
    fs.writeFileSync(faults, "[]");
    let m;
    try {
      m = await mountDisk(d.addcow, h.mnt, {
        bin: FAULTY,
        foreground: true,
        options: `log=${log}`,
        env: { ...env, ADDCOW_TEST_FAULTS: faults },
      });
    } catch (err) {
      const text = (err as Error).message;
      expect(text.split("\n"), text).toHaveLength(1);
      return text.replace(/^addcow-mount -f exited 1: addcow-mount: /, "");
    }
    // Bounded: a daemon stuck writing its log (to a FIFO) would hang these calls.
    const daemon = m;
    let timer: NodeJS.Timeout | undefined;
    const hung = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        if (processAlive(daemon.pid)) process.kill(daemon.pid, "SIGKILL");
        reject(new Error("the daemon hung while writing its log"));
      }, 10_000);
    });
    const drive = async () => {
      const fh = await fs.promises.open(daemon.file, "r+");
      try {
        await fh.write(Buffer.alloc(4096, 0x61), 0, 4096, 0);
        fs.writeFileSync(
          faults,
          JSON.stringify([{ file: path.basename(d.image), op: "sync", code: "EIO", times: 1 }]),
        );
        await expect(fh.datasync()).rejects.toThrow(/EIO/);
      } finally {
        // The failed disk fails the close's flush too.
        await fh.close().catch(() => undefined);
      }
      fs.writeFileSync(faults, "[]");
      await sh("fusermount", ["-u", daemon.dir]);
      await daemon.exited;
    };
    try {
      await Promise.race([drive(), hung]);
    } finally {
      clearTimeout(timer);
    }
    return null;
  }

  it("a link the tenant planted at the log file's name: refused, root's file untouched", async () => {
    const h = host();
    const secret = rootFile(path.join(h.rootOnly, "secret"), 4096, 0o600);
    const log = linkAs(NOBODY, secret, path.join(h.tenant, "addcow.log"));
    const before = rootState(h);
    const refusal = await mountLogging(h, log);
    expect(rootState(h)).toBe(before);
    expect(refusal).toMatch(
      /^log file .*tenant\/addcow\.log is refused: directory .*tenant on the way to it belongs to uid 65534/,
    );
  });

  it("a new log file is created 0600 and gets the daemon's lines", async () => {
    const h = host();
    const logs = path.join(h.root, "logs");
    fs.mkdirSync(logs, { mode: 0o755 });
    const log = path.join(logs, "addcow.log");
    expect(await mountLogging(h, log)).toBe(null);
    expect(fs.statSync(log).mode & 0o777).toBe(0o600);
    expect(fs.readFileSync(log, "utf8")).toMatch(/addcow-mount\[\d+\]: err: DISK FAILED/);
  });

  it("a FIFO, another user's file, a hard link or a tenant's directory on the way: refused", async () => {
    const h = host();
    const logs = path.join(h.root, "logs");
    fs.mkdirSync(logs, { mode: 0o755 });
    spawnOk("mkfifo", [path.join(logs, "fifo")]);
    const theirs = path.join(logs, "theirs.log");
    fs.writeFileSync(theirs, "");
    chownTo(NOBODY, theirs);
    const secret = rootFile(path.join(h.rootOnly, "secret"), 4096, 0o600);
    fs.linkSync(secret, path.join(logs, "hard.log"));
    const before = rootState(h);
    expect(await mountLogging(h, path.join(logs, "fifo"))).toMatch(
      /^log file .*logs\/fifo is refused: it is not a regular file/,
    );
    expect(await mountLogging(h, theirs)).toMatch(
      /^log file .*theirs\.log is refused: it belongs to uid 65534/,
    );
    expect(await mountLogging(h, path.join(logs, "hard.log"))).toMatch(
      /^log file .*hard\.log is refused: it has 2 hard links/,
    );
    expect(await mountLogging(h, path.join(h.tenant, "new.log"))).toMatch(
      /^log file .*tenant\/new\.log is refused: directory .*tenant on the way to it belongs to uid 65534/,
    );
    expect(fs.existsSync(path.join(h.tenant, "new.log"))).toBe(false);
    expect(rootState(h)).toBe(before);
    expect(fs.readFileSync(theirs, "utf8")).toBe("");
  });
});

describe("smaller findings (point 8)", () => {
  it("a name swapped after it was judged: the file opened is the one judged, never the one swapped in", async () => {
    const h = host();
    const victim = rootFile(path.join(h.rootOnly, "victim"), 128 * KiB, 0o600, 0x31);
    const victimIno = fs.statSync(victim).ino;
    const d = diskOf(NOBODY, h.tenant, "d", { size: 128 * KiB, fill: 0x42 });
    const imageIno = fs.statSync(d.image).ino;
    const before = rootState(h);
    const opened: Array<{ name: string; mode: string; ino: number }> = [];
    // The tenant swaps its image file for a link to root's file between the check and the open.
    const swapping = async (p: string, mode: "read" | "write", at?: string): Promise<FileIO> => {
      if (
        path.basename(p) === "d.raw" &&
        mode === "write" &&
        !fs.lstatSync(d.image).isSymbolicLink()
      ) {
        fs.renameSync(d.image, `${d.image}.moved`);
        linkAs(NOBODY, victim, d.image);
      }
      const io = await openPosixFile(p, mode, at);
      opened.push({ name: path.basename(p), mode, ino: Number(io.stat().ino) });
      return io;
    };
    const dev = await openDisk(d.addcow, { writable: true, opener: swapping }).catch(
      (e: unknown) => e,
    );
    if (!(dev instanceof Error)) {
      await (dev as { close(): Promise<void> }).close();
      expect(opened.find((o) => o.name === "d.raw" && o.mode === "write")?.ino).toBe(imageIno);
    }
    expect(opened.filter((o) => o.ino === victimIno)).toEqual([]);
    expect(rootState(h)).toBe(before);
  });

  it("a uid without an account is judged with nogroup, not the group a setgid directory gave its file", async () => {
    const h = host();
    const uid = 4243;
    const shadowGroup = Number(fs.statSync("/etc/shadow").gid);
    const dir = path.join(h.root, "setgid");
    fs.mkdirSync(dir);
    fs.chownSync(dir, uid, shadowGroup);
    fs.chmodSync(dir, 0o2755);
    const d = writeDisk(dir, "d", { size: 128 * KiB, backingName: "/etc/shadow" });
    for (const f of [d.addcow, d.image]) fs.chownSync(f, uid, shadowGroup);
    expect(fs.statSync(d.addcow).gid).toBe(shadowGroup);
    const before = `${rootState(h)}\n${fingerprint("/etc/shadow")}`;
    await inspectRefused(
      d.addcow,
      /^backing file \/etc\/shadow \(named in .*setgid\/d\.add-cow\) is refused: uid 4243, who owns .*d\.add-cow, may not read it \(EACCES\)/,
    );
    expect(await mountRefused(["-o", "ro,allow_other,umask=022", d.addcow], h.mnt)).toMatch(
      /^backing file \/etc\/shadow .*is refused: uid 4243/,
    );
    expect(`${rootState(h)}\n${fingerprint("/etc/shadow")}`).toBe(before);
  });

  it("refusals do not tell whether a file exists where the tenant cannot look, nor where root's links point", async () => {
    const h = host();
    rootFile(path.join(h.rootOnly, "exists.raw"), 128 * KiB, 0o600);
    fs.symlinkSync("/very/secret/place-of-root", path.join(h.rootOnly, "dangling"));
    fs.symlinkSync("exists.raw", path.join(h.rootOnly, "link.raw"));
    spawnOk("mkfifo", [path.join(h.rootOnly, "fifo")]);
    const messages: string[] = [];
    for (const name of ["exists.raw", "missing.raw", "dangling", "link.raw", "fifo", "no/dir"]) {
      const stem = name.replace(/\W/g, "-");
      const d = diskOf(NOBODY, h.tenant, stem, {
        size: 128 * KiB,
        backingName: path.join(h.rootOnly, name),
        backingFormat: "raw",
      });
      for (const command of ["info", "check"]) {
        const msg = oneLine(await addcow([command, d.addcow]), "addcow");
        messages.push(msg.replace(name, "NAME").replace(new RegExp(stem, "g"), "DISK"));
      }
      const mount = await mountRefused(["-o", "ro", d.addcow], h.mnt);
      messages.push(mount.replace(name, "NAME").replace(new RegExp(stem, "g"), "DISK"));
    }
    for (const m of messages) {
      expect(m).toMatch(
        /^backing file .*root-only\/NAME .*is refused: uid 65534, .* may not read it \(EACCES\)/,
      );
      expect(m).not.toMatch(/exist|FIFO|place-of-root|symbolic link/);
    }
    expect(new Set(messages).size).toBe(1);
  });
});

/** Pids of the processes whose parent is pid (any of its threads). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
      const text = fs.readFileSync(`/proc/${pid}/task/${tid}/children`, "utf8").trim();
      if (text) out.push(...text.split(" ").map(Number));
    }
  } catch {
    // Gone meanwhile.
  }
  return out;
}

/**
 * Runs a command whose access helper gets stopped the moment it exists. Root
 * stands in for the tenant here (the helper runs as the tenant, who may send
 * it SIGSTOP once it has changed ids; catching it then would be a race).
 */
async function withHelperStopped(
  program: string,
  args: string[],
  timeoutMs: number,
): Promise<{ code: number | null; stderr: string; ms: number; helpers: number[] }> {
  const started = Date.now();
  const child: ChildProcess = spawn(process.execPath, [program, ...args], {
    env: { ...env, ADDCOW_ACCESS_TIMEOUT: "3" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8").on("data", (c: string) => (stderr += c));
  const helpers = new Set<number>();
  // The command's only child is its helper: stopped as soon as it runs its program (not
  // between fork and exec, where the parent waits for the exec: the tenant cannot reach it there).
  const stopper = setInterval(() => {
    for (const p of childrenOf(child.pid!)) {
      if (helpers.has(p)) continue;
      let cmd = "";
      try {
        cmd = fs.readFileSync(`/proc/${p}/cmdline`, "utf8");
      } catch {
        continue;
      }
      if (!cmd.includes("\0-e\0")) continue;
      helpers.add(p);
      process.kill(p, "SIGSTOP");
    }
  }, 1);
  deferCleanup(() => {
    for (const p of helpers) if (processAlive(p)) process.kill(p, "SIGKILL");
  });
  const code = await new Promise<number | null>((resolve) => {
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("exit", (c) => {
      clearTimeout(timer);
      resolve(c);
    });
  });
  clearInterval(stopper);
  return { code, stderr, ms: Date.now() - started, helpers: [...helpers] };
}

describe("the access helper has a deadline (finding 7)", () => {
  it("a stopped helper: info and mount are refused in one line within the deadline, and the helper is killed", async () => {
    const h = host();
    writeRaw(path.join(h.tenant, "base.raw"), 128 * KiB);
    chownTo(NOBODY, path.join(h.tenant, "base.raw"));
    const d = diskOf(NOBODY, h.tenant, "d", { size: 128 * KiB, backingName: "base.raw" });
    for (const [program, args] of [
      [ADDCOW, ["info", d.addcow]],
      [MOUNT_BIN, ["-f", d.addcow, h.mnt]],
    ] as const) {
      trackMount(h.mnt);
      const r = await withHelperStopped(program, [...args], 25_000);
      expect(r.helpers.length, `${program}: ${r.stderr}`).toBeGreaterThan(0);
      expect(r.code, r.stderr).toBe(1);
      const lines = r.stderr.trim().split("\n");
      expect(lines, r.stderr).toHaveLength(1);
      expect(lines[0]).toMatch(
        /^addcow(-mount)?: cannot check whether uid 65534 may open .*d\.raw \(named in .*d\.add-cow\): the helper process running as uid 65534 did not answer within 3 s \(that user can stop it\); the disk is refused/,
      );
      expect(r.ms).toBeLessThan(15_000);
      for (const p of r.helpers) expect(processAlive(p), `helper ${p}`).toBe(false);
    }
    expect(mountedAt(h.mnt)).toBe(false);
  });
});

describe("docs/security.md's recommended tenant setup", () => {
  it("runs as written, end to end: the tenant's files are the tenant's, the golden base is untouched", async () => {
    const doc = fs.readFileSync(path.resolve(__dirname, "../../docs/security.md"), "utf8");
    const section = doc.slice(
      doc.indexOf("## Serving tenant disks"),
      doc.indexOf("## Where it lives"),
    );
    const blocks = [...section.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]!);
    expect(blocks).toHaveLength(5);
    const h = host();
    const srv = path.join(h.root, "srv");
    fs.mkdirSync(srv, { mode: 0o755 });
    // The commands as an installed addcow provides them.
    const bin = path.join(h.root, "bin");
    fs.mkdirSync(bin);
    for (const [name, file] of [
      ["addcow", ADDCOW],
      ["addcow-mount", MOUNT_BIN],
    ] as const) {
      fs.writeFileSync(path.join(bin, name), `#!/bin/sh\nexec ${process.execPath} ${file} "$@"\n`, {
        mode: 0o755,
      });
    }
    const base = Buffer.alloc(256 * KiB, 0x5a);
    fs.writeFileSync(path.join(h.root, "base.raw"), base);
    const e = { ...env, SRV: srv, TENANT: String(NOBODY), PATH: `${bin}:${env.PATH}` };
    trackMount(path.join(srv, "mnt/t42"));
    const runBlock = async (i: number) => {
      const r = await run("bash", ["-euo", "pipefail", "-c", blocks[i]!], {
        env: e,
        cwd: h.root,
        timeoutMs: 60_000,
      });
      expect(r.code, `block ${i + 1}: ${r.stderr}`).toBe(0);
    };
    for (let i = 0; i < 4; i++) await runBlock(i);
    // The tenant's VM writes through the mounted file, as the tenant.
    const mounted = path.join(srv, "mnt/t42/disk");
    const w = await asNobody("dd", [
      "if=/dev/zero",
      `of=${mounted}`,
      "bs=4k",
      "count=4",
      "conv=notrunc,fsync",
    ]);
    expect(w.code, w.stderr).toBe(0);
    await runBlock(4);
    expect(mountedAt(path.join(srv, "mnt/t42"))).toBe(false);
    const t42 = path.join(srv, "tenants/t42");
    expect(fs.readdirSync(t42).sort()).toEqual([
      "disk.add-cow",
      "disk.raw",
      "snap1.add-cow",
      "snap1.raw",
    ]);
    for (const f of fs.readdirSync(t42)) {
      const st = fs.lstatSync(path.join(t42, f));
      expect([f, st.uid, st.gid]).toEqual([f, NOBODY, NOBODY]);
    }
    expect(fs.readFileSync(path.join(srv, "golden/base.raw")).equals(base)).toBe(true);
    expect(
      fs
        .readFileSync(path.join(t42, "disk.raw"))
        .subarray(0, 16 * KiB)
        .equals(Buffer.alloc(16 * KiB)),
    ).toBe(true);
    expect(fs.statSync(path.join(srv, "addcow-t42.log")).mode & 0o777).toBe(0o600);
    const check = await asNobody(process.execPath, [
      ADDCOW,
      "check",
      "--allow-dir",
      path.join(srv, "golden"),
      path.join(t42, "snap1.add-cow"),
    ]);
    expect(check.code, check.stderr).toBe(0);
  });
});

describe("legitimate tenant layouts keep working", () => {
  it("a tenant's chain with relative names over a golden base, mounted confined for the tenant", async () => {
    const h = host();
    const golden = rootFile(path.join(h.golden, "base.raw"), 256 * KiB, 0o644, 0x5a);
    diskOf(NOBODY, h.tenant, "mid", { size: 256 * KiB, backingName: golden, backingFormat: "raw" });
    const top = diskOf(NOBODY, h.tenant, "top", {
      size: 256 * KiB,
      backingName: "mid.add-cow",
      backingFormat: "add-cow",
    });
    const before = rootState(h);
    for (const command of ["info", "map", "check"]) {
      const r = await addcow([command, "--allow-dir", h.golden, top.addcow]);
      expect(r.code, `${command}: ${r.stderr}`).toBe(0);
    }
    const m = await mountDisk(top.addcow, h.mnt, {
      options: `confine,allow_dir=${h.golden},uid=${NOBODY},allow_other`,
    });
    await sh("cmp", [m.file, golden]);
    const w = await asNobody("dd", [
      "if=/dev/zero",
      `of=${m.file}`,
      "bs=4k",
      "count=2",
      "conv=notrunc,fsync",
    ]);
    expect(w.code, w.stderr).toBe(0);
    await m.unmount();
    expect(fs.readFileSync(top.image).subarray(0, 8192).equals(Buffer.alloc(8192))).toBe(true);
    expect(rootState(h)).toBe(before);
  });

  it("a tenant's own link to its own disk in its own directory, and a uid without an account", async () => {
    const h = host();
    const dir = path.join(h.root, "acct-less");
    fs.mkdirSync(dir);
    chownTo(OTHER, dir);
    writeRaw(path.join(dir, "base.raw"), 128 * KiB, 0x12);
    chownTo(OTHER, path.join(dir, "base.raw"));
    const d = diskOf(OTHER, dir, "d", { size: 128 * KiB, backingName: "base.raw" });
    const link = linkAs(OTHER, "d.add-cow", path.join(dir, "current.add-cow"));
    const m = await mountDisk(link, h.mnt, { options: `uid=${OTHER}` });
    await sh("cmp", [m.file, path.join(dir, "base.raw")]);
    await m.unmount();
    expect((await addcow(["check", d.addcow])).code).toBe(0);
  });
});
