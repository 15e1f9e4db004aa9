import { AddCowError } from "../util/errors";

/** Rejects a request that does not lie inside the device. */
export function checkRange(dev: { size: number }, length: number, offset: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > dev.size) {
    throw new AddCowError(
      `request [${offset}, +${length}) lies outside the disk (size ${dev.size})`,
      { code: "EINVAL" },
    );
  }
}
