import * as fs from "node:fs";
import { describe, expect, it } from "vitest";
import { PosixFile } from "../../src/block/file-io";
import { describeError } from "../../src/util/errors";
import { errorLine } from "../../src/cli/run-cli";

describe("error lines name the file", () => {
  it("a write that hits ENOSPC says which file and what happened", async () => {
    // /dev/full fails every write with ENOSPC, like a full file system.
    const io = new PosixFile("/dev/full", fs.openSync("/dev/full", "r+"), true);
    let caught: unknown;
    try {
      await io.write(Buffer.alloc(4096, 1), 0);
    } catch (err) {
      caught = err;
    } finally {
      await io.close();
    }
    // Node's own text was "ENOSPC: no space left on device, write": no file.
    expect(describeError(caught)).toBe(
      "writing /dev/full failed: no space left on device (ENOSPC)",
    );
    expect(errorLine(caught)).toBe("writing /dev/full failed: no space left on device (ENOSPC)");
  });

  it("leaves messages that already name their file, and other errors, as they are", () => {
    const named = Object.assign(new Error("ENOENT: no such file or directory, open '/x/y'"), {
      code: "ENOENT",
      path: "/x/y",
    });
    expect(describeError(named)).toBe("ENOENT: no such file or directory, open '/x/y'");
    const eio = Object.assign(new Error("EIO: i/o error, read"), { code: "EIO", path: "/v/a.raw" });
    expect(describeError(eio)).toBe("reading /v/a.raw failed: i/o error (EIO)");
    expect(describeError(new Error("plain\nsecond line"))).toBe("plain");
  });
});
