/**
 * The layers of src/, top to bottom. A module may import from its own folder
 * and from layers below it, never from a layer above or beside it, and no
 * import cycle is allowed (ARCHITECTURE.md draws the same picture).
 */
const LAYERS = [
  ["cli"],
  ["control", "daemon"],
  ["jobs"],
  ["ops"],
  ["chain"],
  ["addcow", "qcow2", "remote"],
  ["block"],
  ["os"],
  ["util"],
];

const folder = (name) => `^src/${name}/`;
const rules = [];
LAYERS.forEach((row, i) => {
  const above = LAYERS.slice(0, i).flat();
  for (const name of row) {
    // Up a layer, or sideways to a sibling in the same layer.
    const forbidden = [...above, ...row.filter((other) => other !== name)];
    if (forbidden.length === 0) continue;
    rules.push({
      name: `layer-${name}`,
      comment: `src/${name} may import only from itself and the layers below it`,
      severity: "error",
      from: { path: folder(name) },
      to: { path: `^src/(${forbidden.join("|")})/` },
    });
  }
});

module.exports = {
  forbidden: [
    {
      name: "no-cycles",
      comment: "imports go one way; a cycle hides which module owns what",
      severity: "error",
      from: {},
      to: { circular: true },
    },
    {
      name: "no-test-code-in-src",
      comment: "shipped code never imports test helpers",
      severity: "error",
      from: { path: "^src/" },
      to: { path: "^test/" },
    },
    {
      name: "known-layers-only",
      comment: "every folder of src/ is a layer listed in .dependency-cruiser.cjs",
      severity: "error",
      from: { path: "^src/", pathNot: `^src/(${LAYERS.flat().join("|")})/` },
      to: {},
    },
    ...rules,
  ],
  options: {
    doNotFollow: { path: "node_modules" },
    tsPreCompilationDeps: true,
    tsConfig: { fileName: "tsconfig.json" },
    exclude: { path: "^(dist|node_modules)/" },
  },
};
