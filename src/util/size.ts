import { AddCowError } from "./errors";

const UNITS: Record<string, number> = {
  "": 1,
  B: 1,
  K: 2 ** 10,
  M: 2 ** 20,
  G: 2 ** 30,
  T: 2 ** 40,
  P: 2 ** 50,
};

/** Parses qemu-img style sizes: 1048576, 512K, 64M, 8G, 1T (binary units; "KiB"/"KB" also accepted). */
export function parseSize(text: string, what = "size"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?\s*$/i.exec(text);
  if (!m) {
    throw new AddCowError(
      `invalid ${what} ${JSON.stringify(text)}: use a number of bytes or a number with K, M, G, T (e.g. 512M, 8G)`,
    );
  }
  const value = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(value)) {
    throw new AddCowError(
      `invalid ${what} ${JSON.stringify(text)}: not a whole number of bytes, or too large`,
    );
  }
  return value;
}

/** 1.5 GiB, 64 KiB, 512 B: for people. */
export function formatSize(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const text = i === 0 ? String(v) : Number.isInteger(v) ? String(v) : v.toFixed(2);
  return `${text} ${units[i]}`;
}
