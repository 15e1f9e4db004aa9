import { errnoCode } from "../util/errors";
import { lseek } from "./libc";

const SEEK_DATA = 3;
const SEEK_HOLE = 4;

/**
 * The holes (ranges without blocks on disk) of an open file inside
 * [start, end), found with lseek(SEEK_HOLE / SEEK_DATA). A file system without
 * that support reports the whole file as data: no holes. Only the file offset
 * of `fd` moves, which positional I/O does not use.
 */
export function findHoles(fd: number, start: number, end: number): Array<[number, number]> {
  const holes: Array<[number, number]> = [];
  let pos = start;
  while (pos < end) {
    let hole: number;
    try {
      hole = lseek(fd, pos, SEEK_HOLE);
    } catch (err) {
      // ENXIO: pos is at or past the end of the file; EINVAL: not supported.
      if (errnoCode(err) === "ENXIO" || errnoCode(err) === "EINVAL") break;
      throw err;
    }
    if (hole >= end) break;
    let data: number;
    try {
      data = lseek(fd, hole, SEEK_DATA);
    } catch (err) {
      // No data after the hole: it runs to the end of the file.
      if (errnoCode(err) !== "ENXIO") throw err;
      data = end;
    }
    holes.push([hole, Math.min(data, end)]);
    pos = Math.min(data, end);
  }
  return holes;
}
