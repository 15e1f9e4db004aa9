import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { diskFileName, parseMountInfo } from "../../src/os/mount-table";
import { libfuseOptions } from "../../src/daemon/fuse-fs";
import { parseMountOptions } from "../../src/daemon/mount-options";
import { parseHelperArgs } from "../../src/cli/mount-helper";
import { mountDirOfCommandLine } from "../../src/chain/lock-holder";

describe("addcow-mount -o parsing", () => {
  it("reads the documented options, later ones winning", () => {
    expect(
      parseMountOptions(["ro,allow_other", "uid=1000,gid=100,umask=027,cache=writethrough"]),
    ).toEqual({
      readOnly: true,
      allowOther: true,
      uid: 1000,
      gid: 100,
      umask: 0o027,
      cacheMode: "writethrough",
      copyOnRead: false,
      log: undefined,
      confine: null,
      urls: { any: false, origins: [], auth: [] },
      fsname: undefined,
      debug: false,
      autoUnmount: false,
    });
    expect(parseMountOptions(["ro", "rw"]).readOnly).toBe(false);
    expect(parseMountOptions(["copy-on-read"]).copyOnRead).toBe(true);
    expect(() => parseMountOptions(["ro,copy-on-read"])).toThrow(/cannot be combined with -o ro/);
    expect(parseMountOptions([]).cacheMode).toBe("writeback");
    expect(parseMountOptions(["sync"]).cacheMode).toBe("writethrough");
    expect(parseMountOptions(["verify=required"]).verify).toBe("required");
    expect(parseMountOptions(["verify=required,verify=auto"]).verify).toBe("auto");
    expect(parseMountOptions([]).verify).toBeUndefined();
    expect(() => parseMountOptions(["verify=strict"])).toThrow(
      /^invalid -o verify=strict: use verify=required/,
    );
    expect(() => parseMountOptions(["verify"])).toThrow(/verify needs a value/);
  });

  it("log= chooses where warnings and errors go besides stderr", () => {
    expect(parseMountOptions(["log=syslog"]).log).toEqual({ kind: "syslog" });
    expect(parseMountOptions(["log=syslog:/run/x.sock"]).log).toEqual({
      kind: "syslog",
      socket: "/run/x.sock",
    });
    expect(parseMountOptions(["log=stderr"]).log).toEqual({ kind: "stderr" });
    expect(parseMountOptions(["log=/var/log/a.log"]).log).toEqual({
      kind: "file",
      path: "/var/log/a.log",
    });
    expect(() => parseMountOptions(["log="])).toThrow(/needs a value/);
    expect(() => parseMountOptions(["log=syslog:"])).toThrow(/give the socket/);
  });

  it("reads confine, allow_dir=DIR (repeatable, absolute, implies confine) and allow_url", () => {
    expect(parseMountOptions(["confine"]).confine).toEqual({ allowDirs: [], allowUrls: false });
    expect(parseMountOptions(["allow_dir=/srv/golden", "allow_dir=rel,allow_url"]).confine).toEqual(
      { allowDirs: ["/srv/golden", path.resolve("rel")], allowUrls: true },
    );
    expect(parseMountOptions(["allow_url"]).confine).toEqual({ allowDirs: [], allowUrls: true });
    expect(() => parseMountOptions(["allow_dir="])).toThrow(/needs a value/);
    // The bare allow_url (any origin) keeps its old meaning, confinement included.
    expect(parseMountOptions(["allow_url"]).urls).toEqual({ any: true, origins: [], auth: [] });
  });

  it("allow_url=ORIGIN,... and url_auth=ORIGIN,... take lists (without implying confine)", () => {
    const o = parseMountOptions([
      "ro,allow_url=https://Images.Example.com:443,s3://golden,http://127.0.0.2:8080/,allow_other",
      "url_auth=https://private.example.com",
    ]);
    expect(o.urls).toEqual({
      any: false,
      origins: [
        "https://images.example.com",
        "s3://golden",
        "http://127.0.0.2:8080",
        "https://private.example.com",
      ],
      auth: ["https://private.example.com"],
    });
    expect(o.confine).toBe(null);
    expect(o.readOnly && o.allowOther).toBe(true);
    expect(parseMountOptions(["confine,allow_url=s3://golden"]).confine).toEqual({
      allowDirs: [],
      allowUrls: true,
    });
    expect(() => parseMountOptions(["allow_url=https://a.example/path"])).toThrow(
      /invalid -o allow_url= "https:\/\/a\.example\/path": an origin has no path/,
    );
    expect(() => parseMountOptions(["allow_url=ftp://x"])).toThrow(
      /use http:\/\/, https:\/\/ or s3:\/\//,
    );
    expect(() => parseMountOptions(["url_auth=https://u:p@x"])).toThrow(/credentials/);
    expect(() => parseMountOptions(["confine=1"])).toThrow(/takes no value/);
  });

  it("reads fsname=, debug and auto_unmount", () => {
    expect(parseMountOptions(["fsname=/v/a.add-cow,debug,auto_unmount"])).toMatchObject({
      fsname: "/v/a.add-cow",
      debug: true,
      autoUnmount: true,
    });
    expect(() => parseMountOptions(["debug=1"])).toThrow(/takes no value/);
    const list = libfuseOptions(parseMountOptions(["auto_unmount"]), "/v/a,b\\c.add-cow");
    // Commas and backslashes in the fsname are escaped for libfuse's option parser.
    expect(list).toContain("fsname=/v/a\\,b\\\\c.add-cow");
    expect(list).toContain("subtype=addcow");
    expect(list).toContain("auto_unmount");
    expect(libfuseOptions(parseMountOptions(["fsname=mine"]), "/v/a.add-cow")).toContain(
      "fsname=mine",
    );
  });

  it("ignores what mount(8) and mount.fuse add (fstab), refuses everything else", () => {
    const o = parseMountOptions(["defaults,noatime,nofail,dev,suid,_netdev,x-systemd.automount"]);
    expect(o).toMatchObject({ readOnly: false, cacheMode: "writeback" });
    // Everything libmount hands a helper from fstab or mount -o (seen with a probe helper).
    const generic =
      "rw,ro,auto,noauto,user,users,nouser,owner,group,exec,noexec,suid,nosuid,dev,nodev," +
      "atime,noatime,diratime,nodiratime,relatime,strictatime,lazytime,sync,async,dirsync," +
      "silent,loud,mand,nomand,iversion,nosymfollow,nofail,_netdev,user=alice,comment=x," +
      "x-systemd.requires=foo.service,x-mount.mkdir,defaults";
    // ro (after rw) and sync mean something; the rest is ignored.
    expect(parseMountOptions([generic])).toMatchObject({
      readOnly: true,
      cacheMode: "writethrough",
      allowOther: false,
    });
    expect(() => parseMountOptions(["nofail=1"])).toThrow(/unknown mount option -o nofail=1/);
    expect(() => parseMountOptions(["bogus"])).toThrow(/unknown mount option -o bogus/);
    expect(() => parseMountOptions(["cache=none"])).toThrow(/cache=writeback/);
    expect(() => parseMountOptions(["uid=abc"])).toThrow(/numeric id/);
    expect(() => parseMountOptions(["umask=999"])).toThrow(/octal/);
    expect(() => parseMountOptions(["ro=1"])).toThrow(/takes no value/);
    expect(() => parseMountOptions(["uid="])).toThrow(/needs a value/);
  });

  it("always asks libfuse for large requests and O_TRUNC at open", () => {
    const list = libfuseOptions(parseMountOptions(["ro,allow_other"]));
    expect(list).toEqual(
      expect.arrayContaining([
        "big_writes",
        "max_write=131072",
        "atomic_o_trunc",
        "ro",
        "allow_other",
      ]),
    );
    expect(libfuseOptions(parseMountOptions([]))).not.toContain("allow_other");
  });
});

describe("mount table and names", () => {
  it("parses mountinfo with escaped mount points", () => {
    const text =
      "42 27 0:39 / /tmp/a\\040b rw,nosuid - fuse.addcow /v/my\\040vm.add-cow rw,user_id=0\n" +
      "22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n";
    expect(parseMountInfo(text)).toEqual([
      {
        device: "0:39",
        mountPoint: "/tmp/a b",
        fsType: "fuse.addcow",
        source: "/v/my vm.add-cow",
      },
      { device: "8:1", mountPoint: "/", fsType: "ext4", source: "/dev/sda1" },
    ]);
  });

  it("names a disk after its file without .add-cow", () => {
    expect(diskFileName("/x/vm1.add-cow")).toBe("vm1");
    expect(diskFileName("disk.img")).toBe("disk.img");
    expect(diskFileName(".add-cow")).toBe(".add-cow");
  });
});

describe("mount.fuse.addcow arguments (as mount(8) and mount.fuse pass them)", () => {
  it("reads SOURCE DIR, -o (repeated or glued), -s -f -n -v and -t fuse.addcow", () => {
    expect(
      parseHelperArgs(["/v/a.add-cow", "/mnt/a", "-s", "-n", "-v", "-o", "ro,nofail", "-orw"]),
    ).toEqual({
      source: "/v/a.add-cow",
      mountDir: "/mnt/a",
      options: ["ro,nofail,rw"],
      fake: false,
      verbose: true,
    });
    expect(parseHelperArgs(["-f", "a", "b", "-t", "fuse.addcow"])).toMatchObject({ fake: true });
    expect(() => parseHelperArgs(["a", "b", "-t", "fuse.sshfs"])).toThrow(/fuse\.addcow/);
    expect(() => parseHelperArgs(["a"])).toThrow(/usage: mount\.fuse\.addcow/);
    expect(() => parseHelperArgs(["a", "b", "-x"])).toThrow(/unknown argument -x/);
  });

  it("keeps unknown options (refused later) unless -s (sloppy) drops them", () => {
    expect(parseHelperArgs(["a", "b", "-o", "ro,bogus"]).options).toEqual(["ro,bogus"]);
    expect(parseHelperArgs(["a", "b", "-s", "-o", "ro,bogus=1,allow_other"]).options).toEqual([
      "ro,allow_other",
    ]);
  });

  it("finds the mount directory on any addcow-mount command line", () => {
    const node = "/usr/bin/node";
    const bin = "/usr/lib/node_modules/addcow/dist/src/cli/addcow-mount.js";
    expect(mountDirOfCommandLine([node, bin, "-o", "ro", "/v/a.add-cow", "/mnt/a"], "/")).toBe(
      "/mnt/a",
    );
    // Options after the directory, and a relative directory of a foreground daemon.
    expect(mountDirOfCommandLine([node, bin, "a.add-cow", "mnt", "-o", "ro", "-f"], "/w")).toBe(
      "/w/mnt",
    );
    expect(
      mountDirOfCommandLine(
        [node, bin, "--name", "x", "a.add-cow", "/mnt/b", "--daemon-child", ""],
        "/",
      ),
    ).toBe("/mnt/b");
    expect(mountDirOfCommandLine([node, "/x/addcow.js", "info", "a.add-cow"], "/")).toBe(undefined);
  });
});
