/** Reads os-release(5) style files (KEY=value lines, optionally quoted). */
import { readFile } from "node:fs/promises";
import type { OsRelease } from "../../../gen/piccolo/system/v1/system.js";

/** Parses os-release text into its keys. */
export function parseOsRelease(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const m = /^\s*([A-Z0-9_]+)\s*=\s*(.*?)\s*$/.exec(line);
    if (!m) continue;
    let v = m[2]!;
    if ((v.startsWith('"') && v.endsWith('"')) || (v.startsWith("'") && v.endsWith("'"))) {
      v = v.slice(1, -1).replace(/\\(["'$`\\])/g, "$1");
    }
    out[m[1]!] = v;
  }
  return out;
}

/** Reads the first readable file of `files`; an empty record with source "" when none is. */
export async function readOsRelease(files: readonly string[]): Promise<OsRelease> {
  for (const file of files) {
    let text: string;
    try {
      text = await readFile(file, "utf8");
    } catch {
      continue;
    }
    const kv = parseOsRelease(text);
    // Flatcar's /usr/share/flatcar/release uses FLATCAR_RELEASE_VERSION and friends.
    return {
      id: kv["ID"] ?? (kv["FLATCAR_RELEASE_VERSION"] ? "flatcar" : ""),
      name: kv["NAME"] ?? (kv["FLATCAR_RELEASE_VERSION"] ? "Flatcar Container Linux" : ""),
      versionId: kv["VERSION_ID"] ?? kv["FLATCAR_RELEASE_VERSION"] ?? "",
      prettyName: kv["PRETTY_NAME"] ?? "",
      buildId: kv["BUILD_ID"] ?? "",
      source: file,
    };
  }
  return { id: "", name: "", versionId: "", prettyName: "", buildId: "", source: "" };
}
