/**
 * The daemon's build: version, commit and build time. The build (scripts/build.sh) writes
 * build-info.json beside the compiled tree, and the single-executable bundle inlines it; when
 * running from source the version comes from package.json and the commit from git.
 */
import { execFileSync } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";

/** What GetVersion reports about the build. */
export interface BuildInfo {
  readonly version: string;
  readonly commit: string;
  readonly buildTime: Date | undefined;
}

/** Inlined by the single-executable build (esbuild --define); buildTime is an ISO string there. */
declare const PICCOLOD_BUILD_INFO: { version: string; commit: string; buildTime: string } | undefined;

let cached: BuildInfo | undefined;

/** Reads the build info once. */
export function buildInfo(): BuildInfo {
  if (cached) return cached;
  if (typeof PICCOLOD_BUILD_INFO !== "undefined" && PICCOLOD_BUILD_INFO) {
    const b = PICCOLOD_BUILD_INFO;
    return (cached = { version: b.version, commit: b.commit, buildTime: new Date(b.buildTime) });
  }
  for (const rel of ["../../../build-info.json", "../../../dist/build-info.json"]) {
    try {
      const j = JSON.parse(readFileSync(fileURLToPath(new URL(rel, import.meta.url)), "utf8")) as {
        version: string;
        commit: string;
        buildTime: string;
      };
      return (cached = { version: j.version, commit: j.commit, buildTime: new Date(j.buildTime) });
    } catch {
      // not built: fall through
    }
  }
  let version = "0.0.0-dev";
  // From src/server/system (tsx, jest) the repository is three levels up; from dist/src/server/system, four.
  for (const rel of ["../../../package.json", "../../../../package.json"]) {
    try {
      const pkg = JSON.parse(readFileSync(fileURLToPath(new URL(rel, import.meta.url)), "utf8")) as { name?: string; version: string };
      if (pkg.name !== "piccolod") continue;
      version = pkg.version + "-dev";
      break;
    } catch {
      // next
    }
  }
  let commit = "unknown";
  try {
    commit = execFileSync("git", ["rev-parse", "--short=12", "HEAD"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim();
  } catch {
    // not a checkout
  }
  return (cached = { version, commit, buildTime: undefined });
}
