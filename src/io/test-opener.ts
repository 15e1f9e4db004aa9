import * as path from "node:path";
import { AddCowError } from "../util/errors";
import { type FileOpener, openPosixFile } from "../block/file-io";

/**
 * TEST ONLY hook. When the environment variable ADDCOW_TEST_FILE_OPENER names a
 * JavaScript module, the mount daemon opens its files through that module's
 * `wrapOpener(openPosixFile)`, so fault tests can make the daemon's own I/O fail
 * (see docs/crash-safety.md). Unset, which is every normal run, this returns
 * undefined and files are opened the ordinary way.
 */
export function openerFromEnvironment(): FileOpener | undefined {
  const file = process.env.ADDCOW_TEST_FILE_OPENER;
  if (!file) return undefined;
  const mod = require(path.resolve(file)) as {
    wrapOpener?: (inner: FileOpener) => FileOpener;
  };
  if (typeof mod.wrapOpener !== "function") {
    throw new AddCowError(
      `ADDCOW_TEST_FILE_OPENER=${file} has no wrapOpener export; unset it for normal use`,
    );
  }
  return mod.wrapOpener(openPosixFile);
}
