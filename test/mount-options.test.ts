import * as path from "node:path";
import { describe, expect, it } from "vitest";
import { diskFileName, parseMountInfo } from "../src/os/mount-table";
import { libfuseOptions } from "../src/daemon/fuse-fs";
import { parseMountOptions } from "../src/daemon/mount-options";

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
    });
    expect(parseMountOptions(["ro", "rw"]).readOnly).toBe(false);
    expect(parseMountOptions(["copy-on-read"]).copyOnRead).toBe(true);
    expect(() => parseMountOptions(["ro,copy-on-read"])).toThrow(/cannot be combined with -o ro/);
    expect(parseMountOptions([]).cacheMode).toBe("writeback");
    expect(parseMountOptions(["sync"]).cacheMode).toBe("writethrough");
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
    expect(() => parseMountOptions(["confine=1"])).toThrow(/takes no value/);
  });

  it("ignores what mount(8) and mount.fuse add (fstab), refuses everything else", () => {
    const o = parseMountOptions(["defaults,noatime,nofail,dev,suid,_netdev,x-systemd.automount"]);
    expect(o).toMatchObject({ readOnly: false, cacheMode: "writeback" });
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
      "42 27 0:39 / /tmp/a\\040b rw,nosuid - fuse.addcow addcow rw,user_id=0\n" +
      "22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n";
    expect(parseMountInfo(text)).toEqual([
      { device: "0:39", mountPoint: "/tmp/a b", fsType: "fuse.addcow" },
      { device: "8:1", mountPoint: "/", fsType: "ext4" },
    ]);
  });

  it("names a disk after its file without .add-cow", () => {
    expect(diskFileName("/x/vm1.add-cow")).toBe("vm1");
    expect(diskFileName("disk.img")).toBe("disk.img");
    expect(diskFileName(".add-cow")).toBe(".add-cow");
  });
});
