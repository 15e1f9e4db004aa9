import * as fs from "node:fs";
import { AddCowDevice } from "../addcow/addcow-device";
import { openDisk } from "../open/open-disk";
import { AddCowError } from "../util/errors";
import type { LiveDisk } from "../control/server";
import { defaultImageName } from "./create";
import { type SnapshotOptions, snapshotDisk } from "./snapshot";

/**
 * Live snapshot: with every request held back, flush the mounted disk, create
 * NEW over it, open NEW with the already open disk as its backing (no second
 * open, no window without a lock), and switch the mounted file to NEW. A
 * request sees either the old device or the new one, never a half state:
 * writes before the switch are in the old layer, writes after it in NEW.
 */
export async function liveSnapshot(
  live: LiveDisk,
  top: string,
  newFile: string,
  opts: SnapshotOptions = {},
): Promise<string> {
  return live.exclusive(async () => {
    const old = live.device;
    if (!(old instanceof AddCowDevice)) {
      throw new AddCowError(`${top} is busy with another operation; try again`);
    }
    await old.flush();
    const image = opts.image ?? defaultImageName(newFile);
    const message = await snapshotDisk(top, newFile, { ...opts, image, backingSize: old.size });
    let dev: AddCowDevice;
    try {
      dev = await openDisk(newFile, {
        confine: opts.confine,
        writable: true,
        backingDevice: old,
        cacheMode: old.cacheMode,
      });
    } catch (err) {
      // Nothing switched: take the new files away again.
      fs.rmSync(newFile, { force: true });
      fs.rmSync(image, { force: true });
      throw err;
    }
    live.replaceDevice(dev);
    return `${message} (the mounted file switched to it)`;
  });
}
