import * as fs from "node:fs";
import { AddCowError } from "../util/errors";
import { type MadeFile, createDisk, defaultImageName } from "../ops/create";
import type { Confinement } from "../chain/access-policy";
import type { LayerIdentity } from "../block/layer-identity";
import type { UrlRules } from "../chain/url-policy";

export interface SnapshotOptions {
  /** Image file of the new overlay (default NEW with .add-cow replaced by .raw). */
  image?: string;
  clusterSize?: number;
  /** Size of the current disk when it is open in this process (live snapshot). */
  backingSize?: number;
  /** Its identity then (live snapshot), pinned in the new overlay. */
  backingIdentity?: LayerIdentity | null;
  /** Confinement for the names in FILE's chain (docs/security.md). */
  confine?: Confinement | null;
  /** The operator's URL rules (chain/url-policy.ts). */
  urls?: UrlRules;
  /** Which names the user gave relative (live: the paths arrive absolute); stored relative. */
  relative?: { backing: boolean; image: boolean };
  /** Filled with the files made, for a caller that may have to take them away again. */
  made?: MadeFile[];
}

/**
 * Snapshot: a new overlay NEW whose backing is FILE (format add-cow), with its
 * own new image file. From then on FILE and its chain are only read. Never
 * reuses an existing .add-cow or image file.
 */
export async function snapshotDisk(
  file: string,
  newFile: string,
  opts: SnapshotOptions = {},
): Promise<string> {
  const image = opts.image ?? defaultImageName(newFile);
  for (const [what, p] of [
    ["", newFile],
    ["image file ", image],
  ] as const) {
    if (exists(p)) {
      throw new AddCowError(
        `${what}${p} already exists; a snapshot never reuses a file: remove it or choose another name`,
        { file: p, code: "EEXIST" },
      );
    }
  }
  const result = await createDisk({
    file: newFile,
    freshImage: true,
    backing: file,
    backingFormat: "add-cow",
    image,
    ...(opts.clusterSize === undefined ? {} : { clusterSize: opts.clusterSize }),
    ...(opts.backingSize === undefined ? {} : { backingSize: opts.backingSize }),
    ...(opts.backingIdentity === undefined ? {} : { backingIdentity: opts.backingIdentity }),
    confine: opts.confine,
    ...(opts.urls ? { urls: opts.urls } : {}),
    ...(opts.relative ? { relative: opts.relative } : {}),
  });
  opts.made?.push(...result.made);
  return `created ${newFile} (image file ${image}) over ${file}; from now on use ${newFile}: ${file} and its chain are only read`;
}

/** Anything under the name, a dangling link included. */
function exists(p: string): boolean {
  try {
    fs.lstatSync(p);
    return true;
  } catch {
    return false;
  }
}
