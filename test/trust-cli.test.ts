/**
 * piccoloctl trust … and secrets … end to end: the built CLI against the real daemon (unix socket)
 * on a real swtpm and the reference central, checking what a user sees and what the files it
 * writes verify to.
 */
import { spawn, spawnSync } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CLI_JS, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";
import { startCentralSim, type CentralSim } from "./sim/central.js";

let swtpm: Swtpm;
let central: CentralSim;
let d: TestDaemon;
let work: string;

beforeAll(async () => {
  swtpm = await startSwtpm({ manufacture: true });
  central = await startCentralSim();
  work = await mkdtemp(join(tmpdir(), "trust-cli-"));
  d = await startTestDaemon({ extraArgs: ["--tpm2-device", swtpm.tcti, "--central-url", central.url] });
});
afterAll(async () => {
  await d?.cleanup();
  await central?.close();
  await swtpm?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

function cli(args: readonly string[], input?: string): Promise<Run> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of ["PICCOLO_ENDPOINT", "PICCOLO_TOKEN", "NODE_OPTIONS"]) delete env[k];
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI_JS, "--endpoint", `unix://${d.endpoints.socket}`, ...args], {
      env,
      stdio: [input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    p.stdout!.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr!.on("data", (b: Buffer) => (stderr += b.toString()));
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, stdout, stderr }));
    if (input !== undefined) p.stdin!.end(input);
  });
}

test("trust status and identity", async () => {
  const s = await cli(["trust", "status"]);
  expect(s).toMatchObject({ code: 0, stderr: "" });
  expect(s.stdout).toMatch(/manufacturer:\s+IBM/);
  expect(s.stdout).toMatch(/PCR banks:\s+.*sha256 \(24\)/);
  const id = await cli(["trust", "identity", "-o", "json"]);
  expect(id.code).toBe(0);
  const j = JSON.parse(id.stdout) as { deviceId: string; registration: { state: string } };
  expect(j.deviceId).toMatch(/^[0-9a-f]{64}$/);
  expect(j.registration.state).toBe("REGISTRATION_STATE_UNREGISTERED");
});

test("trust attest writes files that tpm2_checkquote verifies, and prints the command", async () => {
  const nonce = "0123456789abcdef";
  const r = await cli(["trust", "attest", "--nonce", nonce, "--pcrs", "sha256:0,7", "--out-dir", work]);
  expect(r).toMatchObject({ code: 0, stderr: "" });
  expect(r.stdout).toContain("over sha256:0,7");
  const cmd = /tpm2_checkquote (.*)/.exec(r.stdout)![1]!.split(" ");
  const env = { ...process.env };
  delete env["TPM2TOOLS_TCTI"];
  const check = spawnSync("tpm2_checkquote", cmd, { env, encoding: "utf8" });
  expect(check.status).toBe(0);
  const bad = await cli(["trust", "attest", "--nonce", "xyz"]);
  expect(bad.code).toBe(2);
  expect(bad.stderr).toMatch(/--nonce "xyz": expected 1-32 bytes in hex/);
});

test("trust register follows the operation; identity then shows the registration", async () => {
  const r = await cli(["trust", "register"]);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(/succeeded/i);
  const id = await cli(["trust", "identity"]);
  expect(id.stdout).toMatch(/registration:\s+active/);
  expect(id.stdout).toMatch(/subscription:\s+basic/);
  for (const t of central.issued) expect(id.stdout + r.stdout).not.toContain(t.jwt);
  const ref = await cli(["trust", "refresh"]);
  expect(ref.code).toBe(0);
  expect(ref.stdout).toMatch(/registration:\s+active/);
});

test("secrets seal from stdin and from a file, ls, rm; the value is never printed", async () => {
  const value = "hunter2-" + "x".repeat(20);
  const s = await cli(["secrets", "seal", "api-key"], value);
  expect(s).toMatchObject({ code: 0, stderr: "" });
  expect(s.stdout).toContain("sealed api-key with tpm2");
  expect(s.stdout).toContain("LoadCredentialEncrypted=piccolod_api-key:");
  await writeFile(join(work, "v.txt"), value);
  expect((await cli(["secrets", "seal", "api-key-2", "--from-file", join(work, "v.txt")])).code).toBe(0);
  const ls = await cli(["secrets", "ls"]);
  expect(ls.code).toBe(0);
  expect(ls.stdout).toMatch(/api-key\s+tpm2/);
  expect(ls.stdout).toMatch(/piccolod\.device-token \(daemon\)/);
  expect(ls.stdout + s.stdout).not.toContain(value);
  expect((await cli(["secrets", "rm", "api-key-2"])).stdout).toBe("deleted api-key-2\n");
  const again = await cli(["secrets", "rm", "api-key-2"]);
  expect(again.code).not.toBe(0);
  expect(again.stderr).toMatch(/not found/);
  const reserved = await cli(["secrets", "rm", "piccolod.device-token"]);
  expect(reserved.code).not.toBe(0);
  expect(reserved.stderr).toMatch(/daemon's own/);
});

test("trust and secrets over TCP: TLS pinned by --tls-fingerprint and a token, on gRPC and on REST", async () => {
  const token = await d.token("admin");
  for (const endpoint of [d.endpoints.grpc, d.endpoints.rest]) {
    const tls = ["--endpoint", endpoint, "--token", token, "--tls-fingerprint", d.endpoints.tlsFingerprint];
    const s = await cli([...tls, "trust", "status"]);
    expect({ endpoint, code: s.code, stderr: s.stderr }).toEqual({ endpoint, code: 0, stderr: "" });
    expect(s.stdout).toMatch(/manufacturer:\s+IBM/);
    const name = `tcp_${endpoint.startsWith("http") ? "rest" : "grpc"}`;
    const seal = await cli([...tls, "secrets", "seal", name], "over tcp\n");
    expect({ endpoint, code: seal.code, stderr: seal.stderr }).toEqual({ endpoint, code: 0, stderr: "" });
    expect((await cli([...tls, "secrets", "ls"])).stdout).toContain(name);
    // Pinned to another certificate: refused before anything is sent.
    const wrong = await cli(["--endpoint", endpoint, "--token", token, "--tls-fingerprint", "AA".repeat(32), "trust", "status"]);
    expect(wrong.code).not.toBe(0);
    expect(wrong.stderr).toMatch(/not the daemon you pinned/);
  }
}, 120_000);
