// Bundles src/multicall.ts into one CommonJS file for Node's single-executable support.
// Usage: node flatcar/bundle.mjs OUTFILE BUILD_INFO_JSON
//
// A single executable can only require Node's built-in modules. dockerode's SSH transport
// (ssh2) tries optional native helpers (cpu-features, *.node) inside try/catch; they are
// replaced here by modules that throw, so ssh2 falls back to pure JavaScript silently. dbus-next's
// optional x11 (session bus from $DISPLAY) and usocket (abstract sockets) are left out the same
// way: piccolod only connects to unix:path= addresses.
//
// Every byte of the bundle costs about two of resident memory in the running daemon: the binary's
// pages holding it, and the source string V8 keeps on its heap for lazy compilation. So code that
// can never run is left out too:
//   - ssh2 (with its crypto helpers, ~430 KB): docker-modem loads it for ssh:// Docker hosts, and
//     piccolod only talks to the engine on its unix socket (dockerSocket). Its Client throws.
//   - zod's translated error messages (~300 KB, 60 locales): zod registers English itself and
//     piccolod never selects another locale, so z.locales keeps only `en`.
import { createRequire } from "node:module";
import { dirname } from "node:path";
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

const leaveOutUnused = {
  name: "leave-out-unused",
  setup(b) {
    b.onResolve({ filter: /^ssh2$/ }, () => ({ path: "ssh2", namespace: "unused-left-out" }));
    b.onLoad({ filter: /^ssh2$/, namespace: "unused-left-out" }, () => ({
      contents: `module.exports = { Client: class Client { constructor() { throw new Error("Docker over SSH is left out of the single executable (ssh2): piccolod reaches the engine on its unix socket"); } } };`,
      loader: "js",
    }));
    // zod/v4/classic and zod/v4/core re-export every locale as `locales`.
    const zodLocales = dirname(createRequire(import.meta.url).resolve("zod/v4/locales/en.js"));
    b.onResolve({ filter: /^\.\.\/locales\/index\.js$/ }, (args) =>
      /[\\/]zod[\\/]v4[\\/](classic|core)[\\/]/.test(args.importer) ? { path: "zod-locales", namespace: "unused-left-out" } : undefined,
    );
    b.onLoad({ filter: /^zod-locales$/, namespace: "unused-left-out" }, () => ({
      contents: `export { default as en } from "./en.js";`,
      loader: "js",
      resolveDir: zodLocales,
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
  plugins: [leaveOutNative, leaveOutUnused],
});
