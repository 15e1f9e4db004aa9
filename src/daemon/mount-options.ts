import * as path from "node:path";
import { AddCowError } from "../util/errors";
import type { Confinement } from "../chain/access-policy";
import { NO_URL_RULES, type UrlRules, parseOrigins, withOrigins } from "../chain/url-policy";
import type { CacheMode } from "../addcow/addcow-device";
import type { LogDestination } from "./daemon-log";
import { type VerifyMode, parseVerifyMode } from "../remote/verify";

/** What `-o` can say; everything else is refused so typos do not pass silently. */
export interface MountOptions {
  readOnly: boolean;
  allowOther: boolean;
  /** Owner of the files; default the daemon's uid/gid. */
  uid: number | undefined;
  gid: number | undefined;
  /**
   * Permission bits to clear; undefined = owner only, like a block device:
   * files 0600 (0400 with ro), directory 0700.
   */
  umask: number | undefined;
  cacheMode: CacheMode;
  /** Reads from the backing chain also fill the image file. */
  copyOnRead: boolean;
  /** Where warnings and errors go besides stderr; undefined: syslog in the background, else none. */
  log: LogDestination | undefined;
  /** confine, allow_dir=DIR, allow_url: where names in headers may lead (docs/security.md). */
  confine: Confinement | null;
  /** allow_url=ORIGIN,..., url_auth=ORIGIN,...: the URL rules for other users' disks (chain/url-policy.ts). */
  urls: UrlRules;
  /** What /proc/mounts, findmnt and df show as the source; default the (first) .add-cow file. */
  fsname: string | undefined;
  /** -o debug (or -d): stay in the foreground and trace every request (DEBUG=addcow:*). */
  debug: boolean;
  /** -o auto_unmount: fusermount unmounts the directory if the daemon dies (even by SIGKILL). */
  autoUnmount: boolean;
  /** -o host=NAME: serve the disks in the running host daemon NAME (addcow-mount --serve NAME). */
  host: string | undefined;
  /** -o verify=required|auto: remote bases need a manifest (default: ADDCOW_VERIFY, else auto). */
  verify: VerifyMode | undefined;
}

export const KNOWN_OPTIONS =
  "ro, rw, allow_other, uid=N, gid=N, umask=OCTAL, cache=writeback|writethrough, copy-on-read, log=syslog|stderr|FILE, confine, allow_dir=DIR, allow_url[=ORIGIN,...], url_auth=ORIGIN,..., fsname=NAME, debug, auto_unmount, host=NAME, verify=required|auto";

/**
 * Generic options mount(8) and mount.fuse hand every filesystem (from fstab or
 * `mount -t fuse`); they mean nothing for a file holding a disk image, so they
 * are accepted and ignored.
 */
const IGNORED_OPTIONS = new Set([
  "defaults",
  "async",
  "dev",
  "nodev",
  "suid",
  "nosuid",
  "exec",
  "noexec",
  "atime",
  "noatime",
  "diratime",
  "nodiratime",
  "relatime",
  "norelatime",
  "strictatime",
  "nostrictatime",
  "lazytime",
  "nolazytime",
  "auto",
  "noauto",
  "user",
  "nouser",
  "users",
  "owner",
  "group",
  "nofail",
  "_netdev",
  "dirsync",
  "mand",
  "nomand",
  "iversion",
  "noiversion",
  "silent",
  "loud",
  "nosymfollow",
]);

/** Generic options that carry a value, ignored too (`user=NAME` from user mounts, `comment=...`). */
const IGNORED_WITH_VALUE = new Set(["comment", "user", "context", "fscontext", "defcontext"]);

export function defaultMountOptions(): MountOptions {
  return {
    readOnly: false,
    allowOther: false,
    uid: undefined,
    gid: undefined,
    umask: undefined,
    cacheMode: "writeback",
    copyOnRead: false,
    log: undefined,
    confine: null,
    urls: NO_URL_RULES,
    fsname: undefined,
    debug: false,
    autoUnmount: false,
    host: undefined,
    verify: undefined,
  };
}

/** A host daemon's name: it names its control socket, so a plain word. */
export function checkHostName(name: string): string {
  if (!/^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$/.test(name)) {
    throw new AddCowError(
      `invalid host daemon name ${JSON.stringify(name)}: use letters, digits, '_', '.' and '-' (at most 64, not starting with '.' or '-')`,
    );
  }
  return name;
}

function idValue(name: string, value: string): number {
  if (!/^\d+$/.test(value) || Number(value) > 0xfffffffe) {
    throw new AddCowError(`invalid -o ${name}=${value}: give a numeric id such as ${name}=1000`);
  }
  return Number(value);
}

/** `log=syslog`, `log=syslog:SOCKET`, `log=stderr`, or `log=FILE` (relative to the working directory). */
function logDestination(value: string, cwd: string): LogDestination {
  if (value === "syslog") return { kind: "syslog" };
  if (value.startsWith("syslog:")) {
    const socket = value.slice("syslog:".length);
    if (socket === "") {
      throw new AddCowError(`invalid -o log=${value}: give the socket, e.g. log=syslog:/dev/log`);
    }
    return { kind: "syslog", socket: path.resolve(cwd, socket) };
  }
  if (value === "stderr") return { kind: "stderr" };
  return { kind: "file", path: path.resolve(cwd, value) };
}

function addOrigins(opts: MountOptions, option: "allow_url" | "url_auth", text: string): void {
  opts.urls = withOrigins(opts.urls, parseOrigins(text, `-o ${option}=`), option === "url_auth");
}

/**
 * Parses one or more `-o` arguments (comma-separated, mount style), later ones
 * winning. Relative paths are relative to `cwd` (a host daemon parses an
 * attaching client's options with the client's directory).
 */
export function parseMountOptions(args: string[], cwd: string = process.cwd()): MountOptions {
  const opts = defaultMountOptions();
  // allow_url= and url_auth= take comma-separated lists: an item that is a URL continues them.
  let list: "allow_url" | "url_auth" | null = null;
  for (const arg of args) {
    for (const item of arg.split(",")) {
      if (item === "") continue;
      if (list !== null && /^[a-z][a-z0-9+.-]*:\/\//i.test(item)) {
        addOrigins(opts, list, item);
        continue;
      }
      list = null;
      const eq = item.indexOf("=");
      const name = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? undefined : item.slice(eq + 1);
      const flag = (): void => {
        if (value !== undefined) {
          throw new AddCowError(`invalid -o ${item}: ${name} takes no value`);
        }
      };
      const needValue = (): string => {
        if (value === undefined || value === "") {
          throw new AddCowError(`invalid -o ${item}: ${name} needs a value (${name}=...)`);
        }
        return value;
      };
      switch (name) {
        case "ro":
          flag();
          opts.readOnly = true;
          break;
        case "rw":
          flag();
          opts.readOnly = false;
          break;
        case "allow_other":
          flag();
          opts.allowOther = true;
          break;
        case "uid":
          opts.uid = idValue(name, needValue());
          break;
        case "gid":
          opts.gid = idValue(name, needValue());
          break;
        case "umask": {
          const v = needValue();
          if (!/^[0-7]{1,4}$/.test(v)) {
            throw new AddCowError(
              `invalid -o umask=${v}: give octal permission bits such as umask=022`,
            );
          }
          opts.umask = parseInt(v, 8) & 0o777;
          break;
        }
        case "cache": {
          const v = needValue();
          if (v !== "writeback" && v !== "writethrough") {
            throw new AddCowError(
              `invalid -o cache=${v}: use cache=writeback (default) or cache=writethrough`,
            );
          }
          opts.cacheMode = v;
          break;
        }
        case "copy-on-read":
        case "copy_on_read":
          flag();
          opts.copyOnRead = true;
          break;
        case "log":
          opts.log = logDestination(needValue(), cwd);
          break;
        case "confine":
          flag();
          opts.confine ??= { allowDirs: [], allowUrls: false };
          break;
        case "allow_dir":
          // Implies confine. Resolved now: the background daemon later leaves the working directory.
          opts.confine ??= { allowDirs: [], allowUrls: false };
          opts.confine.allowDirs.push(path.resolve(cwd, needValue()));
          break;
        case "allow_url":
          if (value === undefined) {
            // The old spelling: any origin, under confinement (as before).
            opts.confine ??= { allowDirs: [], allowUrls: false };
            opts.confine.allowUrls = true;
            opts.urls = { ...opts.urls, any: true };
          } else {
            list = "allow_url";
            addOrigins(opts, list, needValue());
          }
          break;
        case "url_auth":
          list = "url_auth";
          addOrigins(opts, list, needValue());
          break;
        case "sync":
          // mount(8)'s "every write synchronous": the same promise as cache=writethrough.
          flag();
          opts.cacheMode = "writethrough";
          break;
        case "fsname":
          opts.fsname = needValue();
          break;
        case "debug":
          flag();
          opts.debug = true;
          break;
        case "auto_unmount":
          flag();
          opts.autoUnmount = true;
          break;
        case "host":
          opts.host = checkHostName(needValue());
          break;
        case "verify":
          opts.verify = parseVerifyMode(needValue(), "-o verify=");
          break;
        default:
          if (IGNORED_OPTIONS.has(name) && value === undefined) break;
          if (IGNORED_WITH_VALUE.has(name) || name.startsWith("x-")) break;
          throw new AddCowError(
            `unknown mount option -o ${item}: the options are ${KNOWN_OPTIONS}`,
          );
      }
    }
  }
  // A confined disk may use URLs when any are allowed (info shows it).
  if (opts.confine && opts.urls.origins.length > 0) opts.confine.allowUrls = true;
  if (opts.copyOnRead && opts.readOnly) {
    throw new AddCowError(
      "-o copy-on-read writes what is read into the image file: it cannot be combined with -o ro",
    );
  }
  return opts;
}
