/**
 * A process that opens a disk and keeps it open, for the cross-process lock
 * tests: `node dist/test/helpers/lock-child.js FILE read|write`. Prints one
 * JSON line ({"ok":true} or {"ok":false,"message":...}) and, when open, stays
 * alive until killed or until its stdin closes.
 */
import { openDisk } from "../../src/chain/open-chain";
import { describeError } from "../../src/util/errors";

async function main(): Promise<void> {
  const [file, mode] = process.argv.slice(2);
  try {
    const dev = await openDisk(file!, { writable: mode === "write" });
    process.stdout.write(JSON.stringify({ ok: true, pid: process.pid }) + "\n");
    process.stdin.resume();
    process.stdin.on("end", () => {
      void dev.close().then(() => process.exit(0));
    });
  } catch (err) {
    process.stdout.write(JSON.stringify({ ok: false, message: describeError(err) }) + "\n");
    process.exit(3);
  }
}

void main();
