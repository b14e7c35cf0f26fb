/**
 * piccoloctl update status|check|apply|rollback against the real daemon, the update_engine
 * simulator and the reference update server: the status table shows the A/B flags flip, apply
 * prints live progress through every phase, and the local-payload form and usage errors work.
 */
import { spawn } from "node:child_process";
import { CLI_JS } from "./helpers/daemon.js";
import { startUpdateWorld, type UpdateWorld } from "./update-world.js";

let w: UpdateWorld;

beforeAll(async () => {
  w = await startUpdateWorld({ rig: { sim: { rate: 4 * 1024 * 1024 } } });
}, 120_000);

afterAll(async () => {
  await w?.cleanup();
});

function cli(args: readonly string[], endpoint = `unix://${w.d.endpoints.socket}`): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of ["PICCOLO_ENDPOINT", "PICCOLO_TOKEN", "NODE_OPTIONS"]) delete env[k];
  // Over TCP the CLI needs the daemon's token and certificate pin.
  if (!endpoint.startsWith("unix:")) Object.assign(env, w.d.cliEnv());
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI_JS, "--endpoint", endpoint, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.once("error", reject);
    p.once("close", (code) => resolve({ code, stdout, stderr }));
  });
}

const row = (out: string, label: string): string[] => (out.split("\n").find((l) => l.startsWith(label)) ?? "").split(/\s{2,}/);

test("update status shows USR-A booted and next, USR-B empty", async () => {
  const r = await cli(["update", "status"]);
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(/booted:\s+1\.0\.0 from USR-A/);
  expect(r.stdout).toMatch(/update_engine:\s+UPDATE_STATUS_IDLE/);
  expect(row(r.stdout, "USR-A")).toEqual(["USR-A", "3", "1", "0", "1", "1.0.0", "booted, next boot"]);
  expect(row(r.stdout, "USR-B")).toEqual(["USR-B", "4", "0", "0", "0", "-", "-"]);
});

test("update check says what is available", async () => {
  const r = await cli(["update", "check"]);
  expect(r.code).toBe(0);
  expect(r.stdout).toContain("update available on stable: 1.1.0");
});

test("update apply follows every phase to SUCCEEDED (over REST too), and status shows the flags flipped", async () => {
  const r = await cli(["--output", "json", "update", "apply", "1.1.0"], w.d.endpoints.rest);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  const phases = [...new Set(r.stdout.trim().split("\n").map((l) => (JSON.parse(l) as { progress?: { phase?: string } }).progress?.phase).filter(Boolean))];
  expect(phases).toEqual(["start", "resolve", "download", "verify_checksum", "verify_signature", "handoff", "checking", "downloading", "verifying", "finalizing", "reboot_required"]);
  const s = await cli(["update", "status"]);
  expect(s.stdout).toMatch(/reboot:\s+pending/);
  expect(row(s.stdout, "USR-A")).toEqual(["USR-A", "3", "1", "0", "1", "1.0.0", "booted"]);
  expect(row(s.stdout, "USR-B")).toEqual(["USR-B", "4", "2", "1", "0", "1.1.0", "next boot"]);
});

test("update rollback flips them back; a rollback to a never-good slot is refused without --force", async () => {
  const r = await cli(["update", "rollback"]);
  expect(r.code).toBe(0);
  expect(r.stdout).toContain("SUCCEEDED");
  const s = await cli(["update", "status"]);
  expect(row(s.stdout, "USR-A")).toEqual(["USR-A", "3", "2", "0", "1", "1.0.0", "booted, next boot"]);
  const again = await cli(["update", "rollback"]);
  expect(again.code).toBe(1);
  expect(again.stderr).toContain("USR-B has never booted successfully");
});

test("update apply of a local payload with text progress; usage errors exit 2", async () => {
  // The rollback above reset update_engine to idle, so another apply is accepted.
  const r = await cli(["update", "apply", "--payload", w.release.payload, "--signature", w.release.signature, "--sha256", w.release.sha256, "1.1.0"]);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  expect(r.stdout).toContain("SUCCEEDED");
  expect(r.stdout).toContain("1.1.0");
  const u = await cli(["update", "apply", "--payload", w.release.payload, "1.1.0"]);
  expect(u.code).toBe(2);
  expect(u.stderr).toContain("needs both --payload and --signature");
});
