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
