// Bundles src/multicall.ts into one CommonJS file for Node's single-executable support.
// Usage: node flatcar/bundle.mjs OUTFILE BUILD_INFO_JSON
//
// A single executable can only require Node's built-in modules. dockerode's SSH transport
// (ssh2) tries optional native helpers (cpu-features, *.node) inside try/catch; they are
// replaced here by modules that throw, so ssh2 falls back to pure JavaScript silently. dbus-next's
// optional x11 (session bus from $DISPLAY) and usocket (abstract sockets) are left out the same
// way: piccolod only connects to unix:path= addresses.
import { build } from "esbuild";

const [outfile, buildInfo] = process.argv.slice(2);
if (!outfile || !buildInfo) {
  console.error("usage: node flatcar/bundle.mjs OUTFILE BUILD_INFO_JSON");
  process.exit(2);
}

const leaveOutNative = {
  name: "leave-out-native",
  setup(b) {
    b.onResolve({ filter: /(^cpu-features$)|(^x11$)|(^usocket$)|(\.node$)/ }, (args) => ({ path: args.path, namespace: "native-left-out" }));
    b.onLoad({ filter: /.*/, namespace: "native-left-out" }, (args) => ({
      contents: `throw new Error(${JSON.stringify(`${args.path} is left out of the single executable`)});`,
      loader: "js",
    }));
  },
};

await build({
  entryPoints: ["src/multicall.ts"],
  bundle: true,
  platform: "node",
  target: "node20",
  format: "cjs",
  outfile,
  legalComments: "none",
  minifyWhitespace: true,
  minifySyntax: true,
  sourcemap: false,
  logLevel: "warning",
  define: { PICCOLOD_BUILD_INFO: buildInfo },
  plugins: [leaveOutNative],
});
