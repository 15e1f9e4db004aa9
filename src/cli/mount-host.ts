import * as fs from "node:fs";
import * as path from "node:path";
import { ControlClient } from "../control/client";
import { checkRuntimeDir, ensureRuntimeDir, hostSocketPath } from "../control/paths";
import type { AttachRequest, HelloResponse, HostMount } from "../control/protocol";
import type { FileOpener } from "../block/file-io";
import type { DaemonReporter } from "../daemon/daemon";
import type { HostDaemon } from "../daemon/host";
import { DaemonLog } from "../daemon/daemon-log";
import { parseMountOptions } from "../daemon/mount-options";
import { diskFileName } from "../os/mount-table";
import { AddCowError, errnoCode } from "../util/errors";

/**
 * Host daemons (addcow-mount --serve NAME): one process serving many mounts,
 * each attached with `addcow-mount -o host=NAME FILE DIR` and detached by
 * unmounting it. This module is the wiring: the client side of an attach,
 * and the daemon side that joins the HostDaemon (src/daemon/host.ts) to its
 * control socket (src/control/server.ts), which never import each other.
 */

/** The answer of a running host daemon NAME, or null when none runs (no socket, or a stale one). */
async function helloHost(
  name: string,
): Promise<{ client: ControlClient; hello: HelloResponse } | null> {
  checkRuntimeDir();
  const socket = hostSocketPath(name);
  if (!fs.existsSync(socket)) return null;
  const client = new ControlClient(socket);
  try {
    return { client, hello: await client.call<HelloResponse>({ op: "hello" }) };
  } catch (err) {
    const code = errnoCode(err);
    if (code === "ECONNREFUSED" || code === "ENOENT") return null;
    throw err;
  }
}

/**
 * `addcow-mount -o host=NAME [-o ...] FILE... MOUNTDIR`: asks host daemon NAME
 * to serve the disks at MOUNTDIR; resolves once they are ready (the daemon
 * opens and judges them exactly as a direct mount would, with these options).
 */
export async function attachToHost(
  name: string,
  files: string[],
  mountDir: string,
  options: string[],
  diskName: string | undefined,
): Promise<HostMount> {
  const host = await helloHost(name);
  if (!host) {
    throw new AddCowError(
      `no host daemon ${name} is running: start it with addcow-mount --serve ${name} (or mount without -o host=)`,
    );
  }
  const req: AttachRequest = {
    op: "attach",
    files: files.map((f) => path.resolve(f)),
    mountDir: path.resolve(mountDir),
    options,
    cwd: process.cwd(),
    ...(diskName === undefined ? {} : { name: diskName }),
  };
  const res = await host.client.call<{ ok: true; mount: HostMount }>(req);
  return res.mount;
}

/** An attach request as a HostDaemon attach: the options parsed here, by the daemon, as a direct mount parses them. */
export async function handleAttach(host: HostDaemon, req: AttachRequest): Promise<HostMount> {
  if (!Array.isArray(req.files) || req.files.length === 0 || typeof req.mountDir !== "string") {
    throw new AddCowError("attach needs one or more FILE.add-cow and a MOUNTDIR");
  }
  if (req.name !== undefined && req.files.length > 1) {
    throw new AddCowError(`--name applies to a single disk; ${req.files.length} disks were given`);
  }
  const cwd = typeof req.cwd === "string" && path.isAbsolute(req.cwd) ? req.cwd : "/";
  const options = parseMountOptions(Array.isArray(req.options) ? req.options : [], cwd);
  const disks = req.files.map((f) => ({
    file: path.resolve(cwd, f),
    name: req.name ?? diskFileName(f),
  }));
  const daemon = await host.attach({ disks, mountDir: path.resolve(cwd, req.mountDir), options });
  return { mountDir: daemon.mountDir, disks: daemon.entries.map((e) => e.file) };
}

/** A running host daemon: its HostDaemon and control server, to stop in order. */
export interface ServedHost {
  stopped: Promise<number>;
  stop(reason: string): Promise<void>;
}

/**
 * Starts host daemon NAME in this process: refuses when one of that name
 * runs already, then listens on its socket (0600 in the 0700 runtime
 * directory: only this user attaches disks).
 */
export async function serveHost(
  name: string,
  program: string,
  reporter: DaemonLog,
  opener: FileOpener | undefined,
): Promise<ServedHost> {
  const running = await helloHost(name);
  if (running) {
    throw new AddCowError(
      `host daemon ${name} is already running (pid ${running.hello.pid}); attach disks with addcow-mount -o host=${name} FILE.add-cow MOUNTDIR`,
    );
  }
  ensureRuntimeDir();
  const { HostDaemon } = require("../daemon/host") as typeof import("../daemon/host");
  const { ControlServer, hostMountService } =
    require("../control/server") as typeof import("../control/server");
  const host = new HostDaemon({
    name,
    reporter,
    reporterFor: (o): DaemonReporter => (o.log ? new DaemonLog(program, o.log) : reporter),
    ...(opener ? { opener } : {}),
  });
  const control = await ControlServer.startHost(
    {
      name,
      attach: (req) => handleAttach(host, req),
      detach: (dir) => host.detach(dir),
      mounts: () => host.list(),
    },
    hostSocketPath(name),
  );
  host.mountServices = [hostMountService(control)];
  let stopping: Promise<void> | null = null;
  return {
    stopped: host.stopped,
    stop(reason) {
      stopping ??= host.stop(reason).then(() => control.stop());
      return stopping;
    },
  };
}
