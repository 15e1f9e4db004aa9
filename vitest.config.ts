import { defineConfig } from "vitest/config";

/**
 * Two projects. unit: the engine, formats, CLI and jobs on disks at rest;
 * files run in parallel. mount: real FUSE mounts, loop devices, mount
 * namespaces and installed commands; one file at a time, so they do not
 * compete for the two cores, loop devices and mount points, while the unit
 * files run beside them. `npm run test:unit` runs only the first.
 */
export default defineConfig({
  test: {
    testTimeout: 60_000,
    hookTimeout: 60_000,
    projects: [
      {
        extends: true,
        test: { name: "unit", include: ["test/unit/**/*.test.ts"] },
      },
      {
        extends: true,
        test: { name: "mount", include: ["test/mount/**/*.test.ts"], fileParallelism: false },
      },
    ],
  },
});
