import createDebug from "debug";

/** Tracing namespaces; enable with DEBUG=addcow:* (or e.g. DEBUG=addcow:fuse). */
export const log = {
  engine: createDebug("addcow:engine"),
  bitmap: createDebug("addcow:bitmap"),
  open: createDebug("addcow:open"),
  io: createDebug("addcow:io"),
  fuse: createDebug("addcow:fuse"),
  daemon: createDebug("addcow:daemon"),
  job: createDebug("addcow:job"),
  cli: createDebug("addcow:cli"),
  remote: createDebug("addcow:remote"),
};

/** Turns on every addcow namespace (addcow-mount -d), keeping what DEBUG enabled already. */
export function enableTracing(): void {
  const current = process.env.DEBUG;
  createDebug.enable(current ? `${current},addcow:*` : "addcow:*");
}
