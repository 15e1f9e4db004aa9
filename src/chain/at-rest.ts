import type { AddCowDevice } from "../addcow/addcow-device";
import { waitingForExitingDaemon } from "./exiting-daemon";
import { type OpenOptions, openDisk } from "./open-chain";

/**
 * Opens a disk at rest (waiting for a daemon that is letting go of it), runs
 * fn, closes it. `explain` may turn an error of the open into a better one.
 */
export async function withDiskAtRest<T>(
  file: string,
  open: OpenOptions,
  fn: (dev: AddCowDevice) => Promise<T>,
  explain?: (err: unknown) => Promise<unknown>,
): Promise<T> {
  let dev: AddCowDevice;
  try {
    dev = await waitingForExitingDaemon(file, () => openDisk(file, open));
  } catch (err) {
    throw explain ? await explain(err) : err;
  }
  let result: T;
  try {
    result = await fn(dev);
  } catch (err) {
    await dev.close().catch(() => undefined);
    throw err;
  }
  await dev.close();
  return result;
}
