import { type BackingFormat, BACKING_FORMATS, type Namer } from "../block/chain-opener";
import * as fs from "node:fs";
import * as path from "node:path";
import type { AddCowLayer } from "../addcow/addcow-layer";
import type { BlockDevice } from "../block/block-device";
import { AddCowError, describeError } from "../util/errors";
import { type OpenOptions, openBacking } from "../chain/open-chain";
import { isUrlName } from "../chain/access-policy";
import { storedName } from "../ops/create";
import { sharedFile } from "../chain/loops";
import type { OldBacking, RebaseTarget } from "./rebase";
import { identityToPin } from "../ops/backing-identity";
import { manifestForRebase } from "./rebase-pin";

/** What `addcow rebase` was asked: a backing file ("" for none), its format, -u. */
export interface RebaseRequest {
  backing: string;
  format?: string;
  unsafe?: boolean;
}

/** The first bytes of the image formats addcow knows, to refuse `-F raw` on one of them. */
const MAGICS: Array<[string, Buffer]> = [
  ["add-cow", Buffer.from("ACOW", "latin1")],
  ["qcow2", Buffer.from("QFI\xfb", "latin1")],
];

/**
 * A raw backing that starts like an add-cow or qcow2 image is a mistake:
 * its header would be read as disk data. Formats are never guessed; a clear
 * mismatch is refused.
 */
function checkNotAnImage(file: string, format: BackingFormat): void {
  if (format !== "raw" || isUrlName(file)) return;
  const head = Buffer.alloc(4);
  try {
    const fd = fs.openSync(file, "r");
    try {
      fs.readSync(fd, head, 0, 4, 0);
    } finally {
      fs.closeSync(fd);
    }
  } catch {
    return; // Opening it says what is wrong.
  }
  for (const [name, magic] of MAGICS) {
    if (head.equals(magic)) {
      throw new AddCowError(
        `${file} is ${name === "add-cow" ? "an" : "a"} ${name} image, not raw: use -F ${name} (a raw backing would show its header as disk data)`,
        { file, reason: "invalid" },
      );
    }
  }
}

export function checkFormat(req: RebaseRequest): BackingFormat | null {
  if (req.backing === "") {
    if (req.format !== undefined) {
      throw new AddCowError(`-F ${req.format} given with -b '': there is no backing file`);
    }
    return null;
  }
  if (req.format === undefined) {
    throw new AddCowError(
      `backing file ${req.backing} needs its format: add -F ${BACKING_FORMATS.join(" or -F ")} (formats are never guessed)`,
    );
  }
  if (!(BACKING_FORMATS as readonly string[]).includes(req.format)) {
    throw new AddCowError(
      `unsupported backing format ${JSON.stringify(req.format)}: use -F ${BACKING_FORMATS.join(" or -F ")}`,
    );
  }
  return req.format as BackingFormat;
}

/**
 * Opens the new backing chain as the disk's header will name it (judged for
 * the disk's owner, confined like the disk) and refuses a chain that leads
 * back to the disk.
 */
export async function openTarget(
  dev: AddCowLayer,
  given: string,
  format: BackingFormat,
  open: OpenOptions,
): Promise<RebaseTarget> {
  const file = isUrlName(given) ? given : path.resolve(given);
  checkNotAnImage(file, format);
  const how = {
    confine: open.confine,
    ...(open.urls ? { urls: open.urls } : {}),
    namedBy: namerOf(dev),
    ...(open.opener ? { opener: open.opener } : {}),
  };
  // First without locks: a chain leading back to this disk would meet its own lock.
  const probe = await openBacking(file, format, { ...how, lock: false });
  try {
    checkNoLoop(dev, probe, file);
  } finally {
    await probe.close();
  }
  const device = await openBacking(file, format, how);
  const name = storedName(dev.path, given);
  try {
    const sameName = file === dev.backingPath;
    return {
      name,
      format,
      device,
      path: file,
      sameAsCurrent: format === dev.backingFormat && sameFile(file, dev.backingPath),
      identity: await identityToPin(device, file, manifestForRebase(dev, sameName)),
    };
  } catch (err) {
    await device.close();
    throw err;
  }
}

/**
 * Whose words the disk's header speaks: as the chain found when it opened
 * the disk (its owner, and who controls the way to it).
 */
function namerOf(dev: AddCowLayer): Namer {
  if (dev.owner) return dev.owner;
  const st = fs.statSync(dev.path);
  return { file: dev.path, uid: st.uid, gid: st.gid };
}

/** Refuses a new backing chain that uses a file of the disk itself. */
function checkNoLoop(dev: AddCowLayer, chain: BlockDevice, file: string): void {
  const same = sharedFile(chain, dev.describe().files);
  if (same) {
    throw new AddCowError(
      `the backing chain would loop: ${same.used} (in the chain of ${file}) is ${same.own}, a file of ${dev.path} itself`,
      { file: same.used, code: "ELOOP", reason: "chain" },
    );
  }
}

function sameFile(a: string, b: string | null): boolean {
  if (b === null || isUrlName(a) || isUrlName(b)) return a === b;
  try {
    const x = fs.statSync(a);
    const y = fs.statSync(b);
    return x.dev === y.dev && x.ino === y.ino;
  } catch {
    return false;
  }
}

/** The current backing's size, when it can still be opened (-u compares it). */
export async function oldBacking(dev: AddCowLayer, open: OpenOptions): Promise<OldBacking> {
  if (dev.backingPath === null || dev.backingFormat === null) return null;
  try {
    const old = await openBacking(dev.backingPath, dev.backingFormat, {
      confine: open.confine,
      ...(open.urls ? { urls: open.urls } : {}),
      namedBy: namerOf(dev),
    });
    const size = old.size;
    await old.close();
    return { size };
  } catch (err) {
    const code = err instanceof AddCowError ? err.code : undefined;
    return {
      unreadable: code === "ENOENT" ? "does not exist" : `cannot be opened (${describeError(err)})`,
    };
  }
}
