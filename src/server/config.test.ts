import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ConfigError, loadConfig, parseListen } from "./config.js";

const dir = mkdtempSync(join(tmpdir(), "piccolod-config-"));

test("defaults fill everything in, with derived paths", () => {
  const c = loadConfig({ argv: [], env: {} });
  expect(c.stateDir).toBe("/var/lib/piccolod");
  expect(c.socketPath).toBe("/run/piccolod/piccolod.sock");
  expect(c.grpcListen).toBe("127.0.0.1:50051");
  expect(c.restListen).toBe("127.0.0.1:8080");
  expect(c.auditLog).toBe("/var/lib/piccolod/audit.log");
});

test("flags beat environment beat file", () => {
  const file = join(dir, "c.json");
  writeFileSync(file, JSON.stringify({ stateDir: "/from/file", logLevel: "warn", restListen: "127.0.0.1:1" }));
  const c = loadConfig({
    argv: ["--config", file, "--state-dir=/from/flag"],
    env: { PICCOLOD_STATE_DIR: "/from/env", PICCOLOD_REST_LISTEN: "127.0.0.1:2", PICCOLOD_PROGRESS_INTERVAL_MS: "50" },
  });
  expect(c.stateDir).toBe("/from/flag");
  expect(c.restListen).toBe("127.0.0.1:2");
  expect(c.logLevel).toBe("warn");
  expect(c.progressIntervalMs).toBe(50);
  expect(c.auditLog).toBe("/from/flag/audit.log");
});

test("each bad key is named with where it came from", () => {
  const file = join(dir, "bad.json");
  writeFileSync(file, JSON.stringify({ logLevel: "loud", colour: "red" }));
  let err: Error | undefined;
  try {
    loadConfig({ argv: ["--config", file, "--grpc-listen", "nope", "--frobnicate", "1"], env: { PICCOLOD_STATE_DIR: "relative/dir" } });
  } catch (e) {
    err = e as Error;
  }
  expect(err).toBeInstanceOf(ConfigError);
  expect(err!.message).toContain(`logLevel (from file ${file})`);
  expect(err!.message).toContain(`unknown key colour (from file ${file})`);
  expect(err!.message).toContain("grpcListen (from flag --grpc-listen)");
  expect(err!.message).toContain("stateDir (from env PICCOLOD_STATE_DIR): expected an absolute path");
  expect(err!.message).toContain("unknown flag --frobnicate");
});

test("an explicit config file that is missing or not JSON is an error", () => {
  expect(() => loadConfig({ argv: ["--config", join(dir, "missing.json")], env: {} })).toThrow(/missing\.json/);
  const bad = join(dir, "notjson.json");
  writeFileSync(bad, "{nope");
  expect(() => loadConfig({ argv: [], env: { PICCOLOD_CONFIG: bad } })).toThrow(/not valid JSON/);
  // The default file is optional.
  expect(() => loadConfig({ argv: [], env: {}, defaultFile: join(dir, "absent.json") })).not.toThrow();
});

test("parseListen", () => {
  expect(parseListen("127.0.0.1:8080")).toEqual({ host: "127.0.0.1", port: 8080 });
  expect(parseListen("[::1]:0")).toEqual({ host: "::1", port: 0 });
  expect(parseListen(":9")).toEqual({ host: "0.0.0.0", port: 9 });
  expect(parseListen("host")).toBeUndefined();
  expect(parseListen("h:70000")).toBeUndefined();
});

test("the old signing key lists are read as signingKeyFiles, with a deprecation note; signingKeyFiles wins", () => {
  expect(loadConfig({ argv: [], env: {} })).toMatchObject({ signingKeyFiles: ["/usr/share/piccolod/signing-keys.asc"], deprecatedKeys: [] });
  const old = loadConfig({ argv: ["--installer-keyrings", "/k/a.gpg", "--update-signing-key-files", "/k/b.asc,/k/a.gpg"], env: {} });
  expect(old.signingKeyFiles).toEqual(["/k/b.asc", "/k/a.gpg"]);
  expect(old.deprecatedKeys).toEqual([
    expect.stringMatching(/^updateSigningKeyFiles \(from flag --update-signing-key-files\) is deprecated: use signingKeyFiles/),
    expect.stringMatching(/^installerKeyrings \(from flag --installer-keyrings\) is deprecated: use signingKeyFiles/),
  ]);
  expect("installerKeyrings" in old).toBe(false);
  const both = loadConfig({ argv: ["--signing-key-files", "/k/new.asc"], env: { PICCOLOD_INSTALLER_KEYRINGS: "/k/a.gpg" } });
  expect(both.signingKeyFiles).toEqual(["/k/new.asc"]);
  expect(both.deprecatedKeys).toEqual([expect.stringMatching(/installerKeyrings \(from env PICCOLOD_INSTALLER_KEYRINGS\).*also set and wins/)]);
});
