/**
 * The addcow CLI as it was before the backing pin (the commit before it on
 * this project's history), built once into a temp dir: what "older readers"
 * are in the format's compatibility tests. ADDCOW_OLDER_DIST may name a built
 * dist/ of another older version instead.
 */
import { execFileSync } from "node:child_process";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";

/**
 * The last commit of main before feature bit 1 (the backing pin) existed, and
 * after the runtime moved to Node.js 24 (so it runs on the node_modules of
 * this checkout: koffi, not fs-ext).
 */
export const BEFORE_PIN = "4c5aa4a8bccd6ef6124cd8ab0975d74494563900";

const REPO = path.resolve(__dirname, "../..");

export function olderAddcow(): string {
  const given = process.env.ADDCOW_OLDER_DIST;
  if (given) return path.join(given, "src/cli/addcow.js");
  // Its node_modules is a link to this checkout's: one build per checkout.
  const repoId = crypto.createHash("sha256").update(REPO).digest("hex").slice(0, 8);
  const dir = path.join(os.tmpdir(), `addcow-older-${BEFORE_PIN.slice(0, 12)}-${repoId}`);
  const cli = path.join(dir, "dist/src/cli/addcow.js");
  if (fs.existsSync(cli)) return cli;
  const work = fs.mkdtempSync(`${dir}.build-`);
  const tar = execFileSync("git", [
    "-C",
    REPO,
    "archive",
    BEFORE_PIN,
    "src",
    "tsconfig.json",
    "package.json",
  ]);
  execFileSync("tar", ["-x", "-C", work], { input: tar });
  fs.symlinkSync(path.join(REPO, "node_modules"), path.join(work, "node_modules"));
  // Only src/: the old tests are not needed to run the old CLI.
  const tsconfig = JSON.parse(fs.readFileSync(path.join(work, "tsconfig.json"), "utf8"));
  tsconfig.include = ["src/**/*.ts"];
  fs.writeFileSync(path.join(work, "tsconfig.json"), JSON.stringify(tsconfig));
  execFileSync(process.execPath, [path.join(REPO, "node_modules/typescript/bin/tsc"), "-p", work]);
  try {
    fs.renameSync(work, dir);
  } catch {
    // Another test built it meanwhile: use that one.
    fs.rmSync(work, { recursive: true, force: true });
  }
  return cli;
}
