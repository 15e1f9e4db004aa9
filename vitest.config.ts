import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    // Integration tests mount real FUSE filesystems; run files one at a time so
    // they do not compete for the two cores and loop devices.
    fileParallelism: false,
  },
});
