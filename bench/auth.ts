/**
 * What authentication costs, in one run (node dist/bench/auth.js): unary GetVersion over gRPC TCP
 * with 64 calls in flight against two piccolod processes built from this checkout —
 *
 *   - secured: the defaults, TLS with the daemon's own certificate (pinned by the client) and a
 *     bearer JWT (ES256) checked on every call;
 *   - baseline: the development switches insecurePlaintext and authDisabled (plaintext, no token).
 *
 * Target: secured/baseline ≥ 0.85 (throughput). A third daemon with TLS but auth off is measured
 * alongside, so the cost splits into TLS and token checking. The load generator is the same lean
 * gRPC-over-node:http2 caller for both (one HTTP/2 session; over TLS for the secured daemon), so
 * the figure compares the daemons and not two clients; each daemon's CPU per call (from
 * /proc/<pid>/stat) is printed too. The two are measured in interleaved 1 s slices (5 rounds by
 * default) after a warm-up, so noise from other processes falls on both alike. Everything binds to
 * 127.0.0.1, every loop stops on the clock, and both children are killed at the end. A MISS is
 * printed, never an exit status.
 *
 * Options (flags or env): --duration-ms (BENCH_DURATION_MS, 5000: measured time per daemon),
 * --warmup-ms (BENCH_WARMUP_MS, 1000), --rounds (BENCH_ROUNDS, 5), --concurrency
 * (BENCH_CONCURRENCY, 64).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import http2 from "node:http2";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { Role } from "../gen/piccolo/common/v1/access.js";
import { createGrpcClients } from "../src/clients/grpc-client.js";
import { pinnedIdentity } from "../src/clients/tls.js";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "../..");
const DAEMON_JS = join(ROOT, "dist/src/server/main.js");

const num = (flag: string, env: string, dflt: number): number => {
  const i = process.argv.indexOf(`--${flag}`);
  const raw = i >= 0 ? process.argv[i + 1] : process.env[env];
  if (raw === undefined || raw === "") return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n <= 0) {
    process.stderr.write(`--${flag} (${env}): expected a positive integer, got ${raw}\n`);
    process.exit(2);
  }
  return n;
};
if (process.argv.includes("--help")) {
  process.stdout.write("usage: node dist/bench/auth.js [--duration-ms 5000] [--warmup-ms 1000] [--rounds 5] [--concurrency 64]\n");
  process.exit(0);
}
const DURATION_MS = num("duration-ms", "BENCH_DURATION_MS", 5000);
const WARMUP_MS = num("warmup-ms", "BENCH_WARMUP_MS", 1000);
const ROUNDS = num("rounds", "BENCH_ROUNDS", 5);
const CONCURRENCY = num("concurrency", "BENCH_CONCURRENCY", 64);
const TARGET = 0.85;

interface Daemon {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly grpc: string;
  readonly socket: string;
  readonly fingerprint: string;
}

const children: ChildProcess[] = [];
const killAll = (): void => {
  for (const c of children) if (c.exitCode === null) c.kill("SIGKILL");
};
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.once(sig, () => {
    killAll();
    process.exit(130);
  });
}

async function startDaemon(base: string, name: string, extra: readonly string[]): Promise<Daemon> {
  const dir = join(base, name);
  const runtime = join(dir, "run");
  let out = "";
  const proc = spawn(
    process.execPath,
    [DAEMON_JS, "--state-dir", join(dir, "state"), "--runtime-dir", runtime, "--grpc-listen", "127.0.0.1:0", "--rest-listen", "", "--log-level", "warn", ...extra],
    { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NOTIFY_SOCKET: "" } },
  );
  children.push(proc);
  proc.stdout!.on("data", (b: Buffer) => (out += b.toString()));
  proc.stderr!.on("data", (b: Buffer) => (out += b.toString()));
  const file = join(runtime, "endpoints.json");
  const deadline = Date.now() + 30_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`${name} exited ${proc.exitCode}: ${out}`);
    if (existsSync(file)) {
      const ep = JSON.parse(readFileSync(file, "utf8")) as { grpc: string; socket: string; pid: number; tlsFingerprint: string };
      if (ep.pid === proc.pid) return { name, proc, grpc: ep.grpc, socket: ep.socket, fingerprint: ep.tlsFingerprint };
    }
    if (Date.now() > deadline) throw new Error(`${name} not ready in 30 s: ${out}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** CPU (user+system) of a process in ms. */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8");
  const rest = f.slice(f.lastIndexOf(")") + 2).split(" ");
  return ((Number(rest[11]) + Number(rest[12])) * 1000) / 100;
}

/** A lean gRPC caller on one HTTP/2 session: GetVersion with an empty request; resolves to its latency in ms. */
function caller(target: string, tls: { ca: string; fingerprint: string } | undefined, token: string | undefined): { call: () => Promise<number>; close: () => void } {
  const session = tls
    ? http2.connect(`https://${target}`, { ca: tls.ca, checkServerIdentity: pinnedIdentity(tls.fingerprint), servername: "localhost" })
    : http2.connect(`http://${target}`);
  session.on("error", () => undefined);
  const frame = Buffer.alloc(5); // uncompressed, zero-length GetVersionRequest
  const headers: http2.OutgoingHttpHeaders = {
    ":method": "POST",
    ":path": "/piccolo.system.v1.SystemService/GetVersion",
    "content-type": "application/grpc",
    te: "trailers",
    ...(token ? { authorization: `Bearer ${token}` } : {}),
  };
  return {
    call: () =>
      new Promise((resolveCall, reject) => {
        const t0 = performance.now();
        const stream = session.request(headers);
        let status: string | undefined;
        let bytes = 0;
        stream.on("response", (h) => {
          if (h["grpc-status"] !== undefined) status = String(h["grpc-status"]);
        });
        stream.on("trailers", (h) => (status = String(h["grpc-status"])));
        stream.on("data", (d: Buffer) => (bytes += d.length));
        stream.on("end", () => (status === "0" && bytes > 5 ? resolveCall(performance.now() - t0) : reject(new Error(`grpc-status ${status}`))));
        stream.on("error", reject);
        stream.end(frame);
      }),
    close: () => session.close(),
  };
}

/** Runs the load for `ms`; counts calls completed after `settleMs`. */
async function load(c: { call: () => Promise<number> }, ms: number, settleMs: number): Promise<{ calls: number; latencies: number[] }> {
  const start = performance.now();
  const countFrom = start + settleMs;
  const end = start + ms;
  const latencies: number[] = [];
  let calls = 0;
  await Promise.all(
    Array.from({ length: CONCURRENCY }, async () => {
      while (performance.now() < end) {
        const l = await c.call();
        const now = performance.now();
        if (now >= countFrom && now <= end) {
          calls++;
          latencies.push(l);
        }
      }
    }),
  );
  return { calls, latencies };
}

const pct = (xs: number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? NaN;
};

async function main(): Promise<void> {
  if (!existsSync(DAEMON_JS)) throw new Error(`${DAEMON_JS} is missing: build first (npm run build or scripts/lib.sh build_dist)`);
  const base = mkdtempSync(join(tmpdir(), "piccolo-auth-bench-"));
  try {
    process.stderr.write("starting the two daemons …\n");
    const secured = await startDaemon(base, "secured", []);
    const baseline = await startDaemon(base, "baseline", ["--insecure-plaintext", "true", "--auth-disabled", "true"]);
    const tlsOnly = await startDaemon(base, "tls-only", ["--auth-disabled", "true"]);
    const unix = createGrpcClients({ endpoint: `unix://${secured.socket}` });
    const info = await unix.auth.getAuthInfo({});
    const token = (await unix.auth.createToken({ role: Role.ROLE_READER, ttl: { seconds: 3600, nanos: 0 }, subject: "bench" })).token;
    unix.close();
    const targets = [
      { d: secured, c: caller(secured.grpc, { ca: info.tlsCertificatePem, fingerprint: secured.fingerprint }, token), calls: 0, ms: 0, cpu: 0, lat: [] as number[] },
      { d: baseline, c: caller(baseline.grpc, undefined, undefined), calls: 0, ms: 0, cpu: 0, lat: [] as number[] },
      { d: tlsOnly, c: caller(tlsOnly.grpc, { ca: readFileSync(join(base, "tls-only", "state", "tls", "cert.pem"), "utf8"), fingerprint: tlsOnly.fingerprint }, undefined), calls: 0, ms: 0, cpu: 0, lat: [] as number[] },
    ];
    // Without a token the secured daemon refuses; with it, it answers: the load measures the checked path.
    const refused = await caller(secured.grpc, { ca: info.tlsCertificatePem, fingerprint: secured.fingerprint }, undefined).call().then(() => "answered", (e: Error) => e.message);
    if (refused !== "grpc-status 16") throw new Error(`the secured daemon did not refuse a call without a token (${refused})`);

    for (const t of targets) {
      process.stderr.write(`warm-up ${t.d.name} (${WARMUP_MS} ms)\n`);
      await load(t.c, WARMUP_MS, 0);
    }
    const slice = Math.max(200, Math.round(DURATION_MS / ROUNDS));
    for (let r = 0; r < ROUNDS; r++) {
      const order = [...targets.slice(r % targets.length), ...targets.slice(0, r % targets.length)];
      for (const t of order) {
        const cpu0 = cpuMs(t.d.proc.pid!);
        const res = await load(t.c, slice + 100, 100);
        t.cpu += cpuMs(t.d.proc.pid!) - cpu0;
        t.calls += res.calls;
        t.ms += slice;
        t.lat.push(...res.latencies);
      }
      process.stderr.write(`round ${r + 1}/${ROUNDS} done\n`);
    }
    for (const t of targets) t.c.close();

    const [s, b, t] = targets as [(typeof targets)[0], (typeof targets)[0], (typeof targets)[0]];
    const rate = (t: typeof s): number => (t.calls / t.ms) * 1000;
    const ratio = rate(s) / rate(b);
    const row = (name: string, t: typeof s): string =>
      `${name.padEnd(44)} ${rate(t).toFixed(0).padStart(8)} calls/s  p50 ${pct(t.lat, 50).toFixed(2)} ms  p99 ${pct(t.lat, 99).toFixed(2)} ms  server ${((t.cpu * 1000) / Math.max(1, t.calls)).toFixed(0)} µs CPU/call`;
    console.log(`GetVersion over gRPC TCP, ${CONCURRENCY} in flight, ${ROUNDS} interleaved rounds of ${slice} ms, node ${process.version}`);
    console.log(row("TLS + JWT (ES256) checked on every call", s));
    console.log(row("baseline: plaintext, auth off", b));
    console.log(row("(for the split) TLS, auth off", t));
    console.log(`ratio TLS+JWT / baseline: ${ratio.toFixed(2)} (target ≥ ${TARGET})  ${ratio >= TARGET ? "PASS" : "MISS"}`);
    // The same transport with and without authentication: what checking the token costs by itself.
    const authOnly = rate(s) / rate(t);
    console.log(`ratio TLS+JWT / TLS with auth off: ${authOnly.toFixed(2)} (target ≥ ${TARGET})  ${authOnly >= TARGET ? "PASS" : "MISS"}`);
    console.log(
      JSON.stringify({
        bench: "piccolod-auth",
        securedCallsPerSec: rate(s),
        baselineCallsPerSec: rate(b),
        ratio,
        target: TARGET,
        pass: ratio >= TARGET,
        securedP99Ms: pct(s.lat, 99),
        baselineP99Ms: pct(b.lat, 99),
        securedCpuUsPerCall: (s.cpu * 1000) / Math.max(1, s.calls),
        baselineCpuUsPerCall: (b.cpu * 1000) / Math.max(1, b.calls),
        tlsOnlyCallsPerSec: rate(t),
        tlsOnlyCpuUsPerCall: (t.cpu * 1000) / Math.max(1, t.calls),
        authOnlyRatio: authOnly,
      }),
    );
  } finally {
    killAll();
    rmSync(base, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (e: unknown) => {
    killAll();
    process.stderr.write(`bench/auth: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  },
);
