/**
 * piccoloctl end to end: the built CLI (dist/src/clients/cli/main.js) run as a child process
 * against the real daemon over the unix socket, TCP and the REST gateway, checking what a user
 * sees: stdout, stderr and the exit code.
 */
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { join } from "node:path";
import { CLI_JS, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

let d: TestDaemon;
beforeAll(async () => {
  d = await startTestDaemon();
});
afterAll(async () => {
  await d.cleanup();
});

interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * Environment of the CLI: none of the caller's PICCOLO_* or NODE_OPTIONS, and what a user of the
 * TCP endpoints sets (PICCOLO_TOKEN, PICCOLO_TLS_FINGERPRINT from the test daemon).
 */
function cliEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith("PICCOLO_") || k === "NODE_OPTIONS") delete env[k];
  return { ...env, ...d.cliEnv(), ...extra };
}

/** Runs piccoloctl; `onStdout` sees stdout as it grows (to act while a stream is live). */
function cli(args: readonly string[], o: { env?: Record<string, string>; onStdout?: (soFar: string) => void } = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI_JS, ...args], { env: cliEnv(o.env), stdio: ["ignore", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (b: Buffer) => {
      stdout += b.toString();
      o.onStdout?.(stdout);
    });
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

const unix = (): string => `unix://${d.endpoints.socket}`;
const ndjson = (text: string): Record<string, any>[] =>
  text
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Record<string, any>);

test("version -o json over the unix socket, TCP and REST matches GetVersion from the gRPC client", async () => {
  const want = await d.grpcUnix().system.getVersion({});
  for (const endpoint of [unix(), d.endpoints.grpc, d.endpoints.rest]) {
    const r = await cli(["--endpoint", endpoint, "version", "-o", "json"]);
    expect({ endpoint, code: r.code, stderr: r.stderr }).toEqual({ endpoint, code: 0, stderr: "" });
    const got = JSON.parse(r.stdout) as Record<string, any>;
    expect(got["version"]).toBe(want.version);
    expect(got["commit"]).toBe(want.commit);
    expect(got["nodeVersion"]).toBe(want.nodeVersion);
    expect(got["kernel"]).toBe(want.kernel);
    expect(got["os"]["id"]).toBe(want.os?.id);
    expect(got["os"]["versionId"] ?? "").toBe(want.os?.versionId);
    expect(got["os"]["prettyName"] ?? "").toBe(want.os?.prettyName);
    expect(got["buildTime"] === undefined ? undefined : new Date(got["buildTime"] as string).getTime()).toBe(want.buildTime?.getTime());
  }
});

test("version as text names the daemon version, and PICCOLO_ENDPOINT picks the endpoint", async () => {
  const want = await d.grpcUnix().system.getVersion({});
  const r = await cli(["version"], { env: { PICCOLO_ENDPOINT: d.endpoints.grpc } });
  expect(r.code).toBe(0);
  expect(r.stdout).toMatch(new RegExp(`^piccolod\\s+${want.version.replace(/\./g, "\\.")} \\(commit ${want.commit}`, "m"));
  expect(r.stdout).toMatch(new RegExp(`^node\\s+${want.nodeVersion}$`, "m"));
});

test("health prints the overall state, then one PASS/WARN/FAIL line per check", async () => {
  const want = await d.grpcUnix().system.getHealth({});
  const r = await cli(["--endpoint", unix(), "health"]);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0); // healthy or degraded
  const lines = r.stdout.trimEnd().split("\n");
  expect(lines[0]).toMatch(/^(HEALTHY|DEGRADED) /);
  expect(lines.slice(1)).toHaveLength(want.checks.length);
  want.checks.forEach((c, i) => {
    const status = ["UNSPECIFIED", "PASS", "WARN", "FAIL"][c.status];
    expect(lines[i + 1]).toMatch(new RegExp(`^${status}\\s+${c.name}\\b.*\\s${c.detail.slice(0, 20).replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}`));
  });
  expect(r.stdout).toContain(`state_dir_writable (required)`);
});

let diagnosticsId = "";

/** A finished diagnostics operation: the one the CLI ran, or one run through the gRPC client when run alone. */
async function finishedOperation(): Promise<string> {
  if (diagnosticsId) return diagnosticsId;
  for await (const ev of d.grpcUnix().system.runDiagnostics({ writeProbeMib: 1 })) {
    if (ev.attached) diagnosticsId = ev.operationId;
  }
  return diagnosticsId;
}

test("diagnostics --write-probe-mib 8 -o json streams NDJSON events ending with the SUCCEEDED outcome", async () => {
  const r = await cli(["--endpoint", d.endpoints.rest, "diagnostics", "--write-probe-mib", "8", "-o", "json"]);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  const events = ndjson(r.stdout);
  const first = events[0]!;
  expect(first["attached"]["kind"]).toBe("system.diagnostics");
  expect(first["attached"]["request"]).toMatchObject({ writeProbeMib: 8 });
  diagnosticsId = first["operationId"] as string;
  const rest = events.slice(1);
  expect(rest.map((e) => Number(e["sequence"]))).toEqual(rest.map((_e, i) => i + 1));
  expect(rest.every((e) => e["operationId"] === diagnosticsId)).toBe(true);
  const probe = rest.filter((e) => e["progress"]?.["phase"] === "write_throughput" && e["progress"]["bytesTotal"]);
  expect(probe.at(-1)!["progress"]).toMatchObject({ bytesDone: String(8 * 1024 * 1024), bytesTotal: String(8 * 1024 * 1024) });
  const last = events.at(-1)!;
  expect(last["outcome"]["state"]).toBe("OPERATION_STATE_SUCCEEDED");
  expect(last["outcome"]["result"]["@type"]).toBe("type.googleapis.com/piccolo.system.v1.RunDiagnosticsResult");
  expect((last["outcome"]["result"]["checks"] as { name: string }[]).map((c) => c.name)).toContain("write_throughput");
});

test("diagnostics without a terminal prints plain `[seq] phase pct% message` lines, the outcome and the checks", async () => {
  const r = await cli(["--endpoint", unix(), "diagnostics", "--write-probe-mib", "8"]);
  expect(r.stderr).toBe("");
  expect(r.code).toBe(0);
  expect(r.stdout).not.toContain("\r");
  expect(r.stdout).not.toContain("\x1b[");
  const lines = r.stdout.split("\n");
  const id = /^\[0\] attached (op-\S+) system\.diagnostics /.exec(lines[0]!)?.[1];
  expect(id).toBeDefined();
  expect(lines).toContain("[1] start 0% system.diagnostics started");
  expect(lines.some((l) => /^\[\d+\] write_throughput \d{1,3}% writing the probe: 8 of 8 MiB$/.test(l))).toBe(true);
  expect(lines.some((l) => /^\[\d+\] journals 100% diagnostics complete$/.test(l))).toBe(true);
  expect(lines).toContain(`${id} SUCCEEDED`);
  expect(r.stdout).toMatch(/^PASS\s+write_throughput\s+[\d.]+ MiB\/s sequential write/m);
  expect(r.stdout).toMatch(/^write throughput: [\d.]+ MiB\/s, fsync latency: [\d.]+ ms$/m);
});

test("ops list -o json contains the diagnostics operation; --state filters", async () => {
  const diagnosticsId = await finishedOperation();
  const r = await cli(["--endpoint", unix(), "ops", "list", "-o", "json"]);
  expect(r.code).toBe(0);
  const ops = (JSON.parse(r.stdout) as { operations: Record<string, any>[] }).operations;
  expect(ops.find((o) => o["id"] === diagnosticsId)).toMatchObject({ kind: "system.diagnostics", state: "OPERATION_STATE_SUCCEEDED" });

  const succeeded = await cli(["--endpoint", d.endpoints.rest, "ops", "list", "--state", "succeeded", "--kind", "system.diagnostics", "-o", "json"]);
  expect(succeeded.code).toBe(0);
  expect((JSON.parse(succeeded.stdout) as { operations: { id: string }[] }).operations.map((o) => o.id)).toContain(diagnosticsId);
  const running = await cli(["--endpoint", unix(), "ops", "list", "--state", "OPERATION_STATE_RUNNING", "-o", "json"]);
  expect(running.code).toBe(0);
  expect(JSON.stringify(JSON.parse(running.stdout))).not.toContain(diagnosticsId);

  const text = await cli(["--endpoint", unix(), "ops", "list", "--limit", "1"]);
  expect(text.code).toBe(0);
  const rows = text.stdout.trimEnd().split("\n");
  expect(rows[0]).toMatch(/^ID\s+KIND\s+STATE\s+PROGRESS\s+CREATED/);
  expect(rows).toHaveLength(2);
});

test("ops get shows an operation; an unknown id exits 1 with NOT_FOUND on stderr", async () => {
  const diagnosticsId = await finishedOperation();
  const ok = await cli(["--endpoint", unix(), "ops", "get", diagnosticsId]);
  expect(ok.code).toBe(0);
  expect(ok.stdout).toMatch(new RegExp(`^id:\\s+${diagnosticsId}$`, "m"));
  expect(ok.stdout).toMatch(/^state:\s+SUCCEEDED$/m);
  expect(ok.stdout).toMatch(/^\s+PASS\s+write_throughput/m);

  for (const endpoint of [unix(), d.endpoints.rest]) {
    const r = await cli(["--endpoint", endpoint, "ops", "get", "nope"]);
    expect({ endpoint, code: r.code, stdout: r.stdout }).toEqual({ endpoint, code: 1, stdout: "" });
    expect(r.stderr).toMatch(/^piccoloctl: NOT_FOUND: .*nope/);
  }
});

test("ops watch replays a finished operation to its outcome; -o json gives one event per line", async () => {
  const diagnosticsId = await finishedOperation();
  const text = await cli(["--endpoint", unix(), "ops", "watch", diagnosticsId]);
  expect(text.code).toBe(0);
  expect(text.stdout).toMatch(/^\[0\] attached \S+ system\.diagnostics SUCCEEDED$/m);
  expect(text.stdout).toContain(`${diagnosticsId} SUCCEEDED\n`);

  const json = await cli(["--endpoint", d.endpoints.grpc, "ops", "watch", diagnosticsId, "--after", "5", "-o", "json"]);
  expect(json.code).toBe(0);
  const events = ndjson(json.stdout);
  expect(events[0]!["attached"]["id"]).toBe(diagnosticsId);
  expect(Number(events[1]!["sequence"])).toBe(6);
  expect(events.at(-1)!["outcome"]["state"]).toBe("OPERATION_STATE_SUCCEEDED");
});

test("ops cancel on a finished operation exits 1 with FAILED_PRECONDITION", async () => {
  const diagnosticsId = await finishedOperation();
  const r = await cli(["--endpoint", unix(), "ops", "cancel", diagnosticsId]);
  expect(r.code).toBe(1);
  expect(r.stdout).toBe("");
  expect(r.stderr).toMatch(/^piccoloctl: FAILED_PRECONDITION: .*already ended/);
});

test("an unreachable endpoint exits 1 naming it and saying how to start the daemon", async () => {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
  const port = (srv.address() as { port: number }).port;
  await new Promise((r) => srv.close(r));
  for (const endpoint of [`unix://${join(d.dir, "no-such.sock")}`, `127.0.0.1:${port}`, `http://127.0.0.1:${port}`]) {
    const r = await cli(["--endpoint", endpoint, "version"]);
    expect({ endpoint, code: r.code, stdout: r.stdout }).toEqual({ endpoint, code: 1, stdout: "" });
    expect(r.stderr).toContain(`cannot reach piccolod at ${endpoint}`);
    expect(r.stderr).toContain("npm run demo");
    expect(r.stderr).not.toMatch(/\n\s+at /); // no stack trace
  }
  const watch = await cli(["--endpoint", `127.0.0.1:${port}`, "ops", "watch", "op-x"]);
  expect(watch.code).toBe(1);
  expect(watch.stderr).toContain(`cannot reach piccolod at 127.0.0.1:${port}`);
});

test("usage errors exit 2", async () => {
  for (const args of [
    ["diagnostics", "--write-probe-mib", "0"],
    ["ops", "list", "--state", "sleeping"],
    ["-o", "yaml", "version"],
    ["--endpoint", "not an endpoint", "version"],
    ["ops", "get"],
    ["frobnicate"],
  ]) {
    const r = await cli(args);
    expect({ args, code: r.code }).toEqual({ args, code: 2 });
    expect(r.stderr).toMatch(/^piccoloctl: /);
  }
});

test("diagnostics re-attaches after the daemon restarts and reports the operation INTERRUPTED", async () => {
  let killed: Promise<void> | undefined;
  const run = cli(["--endpoint", unix(), "diagnostics", "--write-probe-mib", "2048"], {
    onStdout: (soFar) => {
      // Kill the daemon once the write probe is under way, then start it again on the same socket.
      if (!killed && /\] write_throughput /.test(soFar)) killed = d.kill9().then(() => d.restart());
    },
  });
  const r = await run;
  expect(killed).toBeDefined();
  await killed;
  expect(r.stderr).toMatch(/lost the stream of op-\S+ .*re-attaching/);
  expect(r.stderr).toMatch(/re-attached to op-/);
  expect(r.stdout).toMatch(/^op-\S+ INTERRUPTED$/m);
  expect(r.stderr).toMatch(/piccoloctl: ABORTED: interrupted/);
  expect(r.code).toBe(1);
});
