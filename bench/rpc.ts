/**
 * RPC benchmarks of piccolod, in one run (npm run bench, or node dist/bench/rpc.js):
 *
 *  1. unary GetVersion over gRPC TCP with 64 calls in flight: piccolod against a bare grpc-js
 *     server (bench/bare-server.ts) serving the same definition and the same response;
 *     target piccolod/bare ≥ 0.8 (throughput).
 *  2. the same load on the REST gateway, GET /api/v1/version; target REST/gRPC(piccolod) ≥ 0.6.
 *  3. start to ready: spawn → endpoints.json naming the child's pid, N times; target median
 *     and max < 500 ms (baseline: the bare server started the same way).
 *  4. idle RSS (VmRSS) after start and 2 s idle; target < 80 MB (baseline: the bare server).
 *
 * Both servers run in child processes so the load generator never shares their event loop, and
 * the load generator uses the same gRPC client for both: by default a lean gRPC-over-node:http2
 * caller (one HTTP/2 connection, like a grpc-js channel), because the grpc-js client costs about
 * three times the CPU per call of either server and would make every server look alike;
 * --grpc-client grpc-js uses the project's promise client instead. REST uses node:http with a
 * keep-alive agent of 64 sockets, about as light per call as the HTTP/2 caller.
 * Everything binds to 127.0.0.1, every loop is bounded in time, and every child is killed at the
 * end, on error and on SIGINT/SIGTERM/SIGHUP. A MISS is printed, never an exit status: the
 * process exits 0 unless the benchmark itself could not run.
 *
 * The three load targets are measured in interleaved slices (5 rounds of 1 s each by default),
 * so CPU taken by other processes on the machine during the run hits each of them alike; the
 * detail table shows that CPU ("other CPU") so a noisy run can be recognised.
 *
 * Options (flags or env): --duration-ms (BENCH_DURATION_MS, 5000: measured time per target),
 * --warmup-ms (BENCH_WARMUP_MS, 1000), --rounds (BENCH_ROUNDS, 5), --concurrency
 * (BENCH_CONCURRENCY, 64), --starts (BENCH_STARTS, 10), --idle-ms (BENCH_IDLE_MS, 2000),
 * --grpc-client h2|grpc-js (BENCH_GRPC_CLIENT, h2), --cpu-prof-dir DIR (BENCH_CPU_PROF_DIR: CPU
 * profiles of the two load servers, for finding per-call costs), --daemon PATH (BENCH_DAEMON: the
 * main.js of another piccolod build to measure instead of this checkout's dist/src/server/main.js).
 */
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, watch, type FSWatcher } from "node:fs";
import http from "node:http";
import http2 from "node:http2";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { GetVersionRequest, GetVersionResponse, SystemServiceService } from "../gen/piccolo/system/v1/system.js";
import { createGrpcClients, type PiccoloGrpcClients } from "../src/clients/grpc-client.js";

// ---------------------------------------------------------------------------------------------
// Options and paths

const HERE = dirname(fileURLToPath(import.meta.url));
/** dist/bench → repository root. */
const ROOT = resolve(HERE, "../..");
const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
const BARE_JS = join(HERE, "bare-server.js");

interface Options {
  readonly durationMs: number;
  readonly warmupMs: number;
  readonly concurrency: number;
  readonly starts: number;
  readonly idleMs: number;
  readonly rounds: number;
  /** The gRPC load client: "h2" (bare node:http2) or "grpc-js" (the project's promise client). */
  readonly grpcClient: "h2" | "grpc-js";
  /** When set, the two load servers run with --cpu-prof into this folder (figures then include the profiler's cost). */
  readonly cpuProfDir: string | undefined;
  /** The daemon's entry point: dist/src/server/main.js of this checkout, or another build to compare. */
  readonly daemonJs: string;
}

/** A mistake in the command line or the set-up: printed without a stack. */
class UsageError extends Error {
  override readonly name = "UsageError";
}

const USAGE = `usage: node dist/bench/rpc.js [options]   (or: npm run bench -- [options])
  --duration-ms N    measured time per load target (BENCH_DURATION_MS, 5000)
  --warmup-ms N      warm-up per load target (BENCH_WARMUP_MS, 1000)
  --rounds N         interleaved slices the measured time is cut into (BENCH_ROUNDS, 5)
  --concurrency N    calls in flight (BENCH_CONCURRENCY, 64)
  --starts N         start-to-ready runs (BENCH_STARTS, 10)
  --idle-ms N        idle time before reading RSS (BENCH_IDLE_MS, 2000)
  --grpc-client C    h2 (bare node:http2) or grpc-js (the project's client) (BENCH_GRPC_CLIENT, h2)
  --daemon PATH      main.js of another piccolod build to measure (BENCH_DAEMON)
  --cpu-prof-dir DIR write CPU profiles of the two load servers there (BENCH_CPU_PROF_DIR)`;

function parseOptions(argv: readonly string[]): Options {
  const flags = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--help" || a === "-h") {
      process.stdout.write(USAGE + "\n");
      process.exit(0);
    }
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(a);
    if (!m) throw new UsageError(`unexpected argument ${JSON.stringify(a)}\n${USAGE}`);
    const value = m[2] ?? argv[++i];
    if (value === undefined) throw new UsageError(`--${m[1]} needs a value`);
    flags.set(m[1]!, value);
  }
  const take = (flag: string, env: string): string | undefined => {
    const v = flags.get(flag) ?? process.env[env];
    flags.delete(flag);
    return v === "" ? undefined : v;
  };
  const num = (flag: string, env: string, dflt: number, min: number, max: number): number => {
    const raw = take(flag, env);
    if (raw === undefined) return dflt;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(`--${flag} (${env}): expected an integer in [${min}, ${max}], got ${raw}`);
    return n;
  };
  const durationMs = num("duration-ms", "BENCH_DURATION_MS", 5000, 200, 120_000);
  const warmupMs = num("warmup-ms", "BENCH_WARMUP_MS", 1000, 0, 60_000);
  const rounds = num("rounds", "BENCH_ROUNDS", 5, 1, 100);
  const concurrency = num("concurrency", "BENCH_CONCURRENCY", 64, 1, 4096);
  const starts = num("starts", "BENCH_STARTS", 10, 1, 100);
  const idleMs = num("idle-ms", "BENCH_IDLE_MS", 2000, 0, 60_000);
  const grpcClient = take("grpc-client", "BENCH_GRPC_CLIENT") ?? "h2";
  if (grpcClient !== "h2" && grpcClient !== "grpc-js") throw new UsageError(`--grpc-client: expected h2 or grpc-js, got ${grpcClient}`);
  const daemonJs = resolve(take("daemon", "BENCH_DAEMON") ?? DAEMON_JS);
  const cpuProf = take("cpu-prof-dir", "BENCH_CPU_PROF_DIR");
  if (flags.size > 0) throw new UsageError(`unknown option(s): ${[...flags.keys()].map((k) => `--${k}`).join(", ")}\n${USAGE}`);
  return { durationMs, warmupMs, rounds, concurrency, starts, idleMs, grpcClient, daemonJs, cpuProfDir: cpuProf ? resolve(cpuProf) : undefined };
}

// ---------------------------------------------------------------------------------------------
// Child processes: tracked, always killed

const children = new Set<ChildProcess>();
const tempDirs = new Set<string>();

function killAll(): void {
  for (const p of children) {
    if (p.exitCode === null && p.signalCode === null) {
      try {
        p.kill("SIGKILL");
      } catch {
        // already gone
      }
    }
  }
  children.clear();
}

function removeTempDirs(): void {
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  tempDirs.clear();
}

process.on("exit", () => {
  killAll();
  removeTempDirs();
});
for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.once(sig, () => {
    process.stderr.write(`bench: ${sig}, killing children\n`);
    killAll();
    removeTempDirs();
    process.exit(130);
  });
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Environment for children: no systemd notification, no PICCOLOD_* overrides from the caller. */
function childEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("PICCOLOD_")) env[k] = v;
  env["NOTIFY_SOCKET"] = "";
  return env;
}

/** A started server child and where it announced itself. */
interface Server {
  readonly name: string;
  readonly proc: ChildProcess;
  readonly pid: number;
  readonly endpointsFile: string;
  /** Milliseconds from spawn() to its endpoints file naming its pid. */
  readonly readyMs: number;
  /** CPU (user+system) the child had used when it was seen ready, in ms: unlike readyMs, not inflated by other processes. */
  readonly readyCpuMs: number;
  readonly endpoints: { grpc: string; rest?: string; socket?: string; pid: number };
  /** The last few KB of what it printed. */
  output(): string;
}

/**
 * Spawns `args` and waits for `endpointsFile` to name the child's pid. Watches the folder (rename
 * events) and polls every 2 ms as a fallback, so the figure is accurate to about a millisecond.
 */
async function startServer(name: string, args: readonly string[], endpointsFile: string, timeoutMs = 20_000): Promise<Server> {
  mkdirSync(dirname(endpointsFile), { recursive: true });
  let out = "";
  const keep = (d: Buffer): void => {
    out = (out + d.toString()).slice(-8192);
  };
  const t0 = performance.now();
  const proc = spawn(process.execPath, args, { cwd: ROOT, env: childEnv(), stdio: ["pipe", "pipe", "pipe"] });
  children.add(proc);
  proc.once("exit", () => children.delete(proc));
  proc.stdout!.on("data", keep);
  proc.stderr!.on("data", keep);
  proc.stdin!.on("error", () => undefined);
  const pid = proc.pid;
  if (pid === undefined) throw new Error(`${name}: spawn failed`);

  let watcher: FSWatcher | undefined;
  let timer: NodeJS.Timeout | undefined;
  try {
    const endpoints = await new Promise<Server["endpoints"]>((resolveReady, reject) => {
      const check = (): void => {
        if (proc.exitCode !== null || proc.signalCode !== null) {
          reject(new Error(`${name} exited (${proc.exitCode ?? proc.signalCode}) before it was ready:\n${out}`));
          return;
        }
        if (performance.now() - t0 > timeoutMs) {
          reject(new Error(`${name} not ready after ${timeoutMs} ms:\n${out}`));
          return;
        }
        if (!existsSync(endpointsFile)) return;
        try {
          const ep = JSON.parse(readFileSync(endpointsFile, "utf8")) as Server["endpoints"];
          if (ep.pid === pid) resolveReady(ep);
        } catch {
          // being replaced; next event or tick
        }
      };
      try {
        watcher = watch(dirname(endpointsFile), check);
      } catch {
        // polling alone then
      }
      timer = setInterval(check, 2);
      proc.once("exit", check);
      check();
    });
    const readyMs = performance.now() - t0;
    const readyCpuMs = procCpuMs(pid);
    return { name, proc, pid, endpointsFile, readyMs, readyCpuMs, endpoints, output: () => out };
  } catch (e) {
    proc.kill("SIGKILL");
    throw e;
  } finally {
    watcher?.close();
    if (timer) clearInterval(timer);
  }
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves when the child is gone. */
async function stopServer(s: Server, graceMs = 3000): Promise<void> {
  const p = s.proc;
  if (p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise<void>((r) => p.once("exit", () => r()));
  p.kill("SIGTERM");
  const t = setTimeout(() => p.kill("SIGKILL"), graceMs);
  await exited;
  clearTimeout(t);
}

function newDir(base: string, name: string): string {
  const d = join(base, name);
  mkdirSync(d, { recursive: true });
  return d;
}

function startPiccolod(daemonJs: string, base: string, name: string, logLevel: string, nodeArgs: readonly string[] = []): Promise<Server> {
  const dir = newDir(base, name);
  const runtimeDir = join(dir, "run");
  return startServer(
    "piccolod",
    [
      ...nodeArgs,
      daemonJs,
      "--state-dir", join(dir, "state"),
      "--runtime-dir", runtimeDir,
      "--grpc-listen", "127.0.0.1:0",
      "--rest-listen", "127.0.0.1:0",
      "--log-level", logLevel,
      // The RPC layer against a bare plaintext server: no TLS, no tokens (bench/auth.ts measures those).
      "--insecure-plaintext", "true",
      "--auth-disabled", "true",
    ],
    join(runtimeDir, "endpoints.json"),
  );
}

function startBare(base: string, name: string, responseBase64: string, nodeArgs: readonly string[] = []): Promise<Server> {
  const dir = newDir(base, name);
  return startServer("bare grpc-js", [...nodeArgs, BARE_JS, join(dir, "endpoints.json"), responseBase64], join(dir, "endpoints.json"));
}

// ---------------------------------------------------------------------------------------------
// /proc readings

const CLK_TCK = ((): number => {
  try {
    const n = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8", stdio: ["ignore", "pipe", "ignore"] }).trim());
    return Number.isFinite(n) && n > 0 ? n : 100;
  } catch {
    return 100;
  }
})();

/** User+system CPU of a process in ms, from /proc/<pid>/stat; NaN when unreadable. */
function procCpuMs(pid: number): number {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    // After "pid (comm) ": state is [0], utime [11], stime [12].
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / CLK_TCK;
  } catch {
    return NaN;
  }
}

/** A field of /proc/<pid>/status in MB ("VmRSS", "VmHWM"); NaN when unreadable. */
function procStatusMb(pid: number, field: string): number {
  try {
    const m = new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

// ---------------------------------------------------------------------------------------------
// Load generation

/** One load target: how to make a call, and whose CPU to read. */
interface Target {
  readonly label: string;
  readonly call: () => Promise<unknown>;
  readonly serverPid: number;
}

/** What the measuring slices of one target add up to. */
interface Acc {
  lat: Float64Array;
  n: number;
  errors: number;
  firstError: string | undefined;
  wallMs: number;
  serverCpuMs: number;
  clientCpuMs: number;
  /** CPU used by every other process on the machine during the slices. */
  otherCpuMs: number;
}

interface LoadResult {
  readonly label: string;
  readonly calls: number;
  readonly errors: number;
  readonly firstError: string | undefined;
  readonly windowMs: number;
  readonly callsPerSec: number;
  readonly p50Ms: number;
  readonly p99Ms: number;
  readonly maxMs: number;
  /** Server CPU in the window, in % of one core. */
  readonly serverCpuPct: number;
  /** Server CPU per call in µs. */
  readonly serverCpuUsPerCall: number;
  /** Load generator (this process) CPU in the window, in % of one core. */
  readonly clientCpuPct: number;
  /** Every other process on the machine, in % of one core: a noisy neighbour shows here. */
  readonly otherCpuPct: number;
}

function percentile(sorted: Float64Array, q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

/** Busy CPU of the whole machine in ms (all cores), from /proc/stat; NaN when unreadable. */
function machineBusyMs(): number {
  try {
    const first = readFileSync("/proc/stat", "utf8").split("\n", 1)[0]!;
    const f = first.trim().split(/\s+/).slice(1).map(Number);
    // user nice system idle iowait irq softirq steal (guest time is already in user)
    const busy = f[0]! + f[1]! + f[2]! + f[5]! + f[6]! + f[7]!;
    return (busy * 1000) / CLK_TCK;
  } catch {
    return NaN;
  }
}

interface CpuSample {
  readonly at: number;
  readonly server: number;
  readonly client: number;
  readonly machine: number;
}

const cpuSample = (serverPid: number): CpuSample => {
  const c = process.cpuUsage();
  return { at: performance.now(), server: procCpuMs(serverPid), client: (c.user + c.system) / 1000, machine: machineBusyMs() };
};

/**
 * Keeps `concurrency` calls of `target` in flight for settleMs + measureMs. Calls that complete
 * between the two CPU samples (taken after settleMs and after measureMs) are added to `acc`
 * when it is given (a warm-up passes none). Workers stop on the end sample, and in any case
 * 5 s after the planned end, so the loop ends even if timers starve or every call fails.
 */
async function runSlice(target: Target, concurrency: number, settleMs: number, measureMs: number, acc?: Acc): Promise<void> {
  const t0 = performance.now();
  const hardEnd = t0 + settleMs + measureMs + 5000;
  let recording = false;
  let stopped = false;
  let first: CpuSample | undefined;
  let last: CpuSample | undefined;
  const tStart = setTimeout(() => {
    first = cpuSample(target.serverPid);
    recording = true;
  }, settleMs);
  const tEnd = setTimeout(() => {
    last = cpuSample(target.serverPid);
    recording = false;
    stopped = true;
  }, settleMs + measureMs);

  const worker = async (): Promise<void> => {
    while (!stopped && performance.now() < hardEnd) {
      const started = performance.now();
      try {
        await target.call();
      } catch (e) {
        if (acc && recording) {
          acc.errors++;
          acc.firstError ??= (e as Error).message;
        }
        await sleep(1); // never spin on a dead server
        continue;
      }
      if (acc && recording) {
        if (acc.n === acc.lat.length) {
          const bigger = new Float64Array(acc.lat.length * 2);
          bigger.set(acc.lat);
          acc.lat = bigger;
        }
        acc.lat[acc.n++] = performance.now() - started;
      }
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  clearTimeout(tStart);
  clearTimeout(tEnd);
  if (!acc || !first || !last) return;
  const wall = last.at - first.at;
  const server = last.server - first.server;
  const client = last.client - first.client;
  acc.wallMs += wall;
  acc.serverCpuMs += server;
  acc.clientCpuMs += client;
  acc.otherCpuMs += last.machine - first.machine - server - client;
}

const newAcc = (): Acc => ({
  lat: new Float64Array(1 << 16),
  n: 0,
  errors: 0,
  firstError: undefined,
  wallMs: 0,
  serverCpuMs: 0,
  clientCpuMs: 0,
  otherCpuMs: 0,
});

function summarize(label: string, acc: Acc): LoadResult {
  const sorted = acc.lat.slice(0, acc.n).sort();
  const pct = (ms: number): number => (ms / acc.wallMs) * 100;
  return {
    label,
    calls: acc.n,
    errors: acc.errors,
    firstError: acc.firstError,
    windowMs: acc.wallMs,
    callsPerSec: (acc.n * 1000) / acc.wallMs,
    p50Ms: percentile(sorted, 0.5),
    p99Ms: percentile(sorted, 0.99),
    maxMs: sorted.length > 0 ? sorted[sorted.length - 1]! : NaN,
    serverCpuPct: pct(acc.serverCpuMs),
    serverCpuUsPerCall: acc.n > 0 ? (acc.serverCpuMs * 1000) / acc.n : NaN,
    clientCpuPct: pct(acc.clientCpuMs),
    otherCpuPct: pct(acc.otherCpuMs),
  };
}

/**
 * Warms each target up for warmupMs, then measures them in `rounds` interleaved slices of
 * durationMs/rounds each (the order rotating every round), so that a neighbour's burst of CPU
 * lands on every target alike instead of on whichever ran at that moment. Each slice re-settles
 * for 100 ms before it measures.
 */
async function runInterleaved(targets: readonly Target[], o: Options, log: (s: string) => void): Promise<LoadResult[]> {
  for (const t of targets) {
    log(`warm-up: ${t.label} (${o.warmupMs} ms)`);
    await runSlice(t, o.concurrency, 0, o.warmupMs);
  }
  const accs = targets.map(newAcc);
  const sliceMs = o.durationMs / o.rounds;
  log(`measuring: ${o.rounds} rounds of ${targets.length} × ${fmt(sliceMs, 0)} ms slices, interleaved`);
  for (let r = 0; r < o.rounds; r++) {
    for (let k = 0; k < targets.length; k++) {
      const i = (r + k) % targets.length;
      await runSlice(targets[i]!, o.concurrency, 100, sliceMs, accs[i]!);
    }
  }
  return targets.map((t, i) => summarize(t.label, accs[i]!));
}

/** A way to call GetVersion over gRPC, and to let go of the connection. */
interface GrpcCaller {
  readonly call: () => Promise<unknown>;
  close(): void;
}

/** GetVersion through the project's promise client (one grpc-js channel, one HTTP/2 connection). */
function grpcJsCaller(target: string): GrpcCaller {
  const clients: PiccoloGrpcClients = createGrpcClients({ endpoint: target, timeoutMs: 10_000, plaintext: true });
  return { call: () => clients.system.getVersion({}, { timeoutMs: 10_000 }), close: () => clients.close() };
}

/**
 * GetVersion as a bare gRPC exchange on one node:http2 session: one POST per call with the
 * length-prefixed request, the response message decoded, grpc-status read from the trailers.
 * The same protocol work as a grpc-js client minus its channel machinery (resolver, load
 * balancer, filters, per-call deadline timers), so the load generator spends its CPU on calls,
 * not on itself, and weighs about what the REST client (node:http) weighs.
 */
function h2Caller(target: string): GrpcCaller {
  const session = http2.connect(`http://${target}`);
  session.on("error", () => undefined); // surfaces as stream errors
  const def = SystemServiceService.getVersion;
  const message = GetVersionRequest.encode({}).finish();
  const frame = Buffer.alloc(5 + message.length);
  frame.writeUInt32BE(message.length, 1);
  frame.set(message, 5);
  const headers: http2.OutgoingHttpHeaders = {
    ":method": "POST",
    ":path": def.path,
    "content-type": "application/grpc",
    te: "trailers",
    "grpc-timeout": "10S",
  };
  const call = (): Promise<unknown> =>
    new Promise((resolveCall, reject) => {
      const stream = session.request(headers);
      const chunks: Buffer[] = [];
      let status: string | undefined;
      let grpcMessage: string | undefined;
      const takeStatus = (h: http2.IncomingHttpHeaders): void => {
        const st = h["grpc-status"];
        if (st !== undefined) {
          status = String(st);
          grpcMessage = h["grpc-message"] === undefined ? undefined : String(h["grpc-message"]);
        }
      };
      stream.on("response", takeStatus); // a trailers-only answer carries the status here
      stream.on("trailers", takeStatus);
      stream.on("data", (c: Buffer) => chunks.push(c));
      stream.on("error", reject);
      stream.setTimeout(10_000, () => stream.close(http2.constants.NGHTTP2_CANCEL));
      stream.on("end", () => {
        if (status !== "0") {
          reject(new Error(`grpc-status ${status ?? "missing"}${grpcMessage ? `: ${decodeURIComponent(grpcMessage)}` : ""}`));
          return;
        }
        const body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
        if (body.length < 5 || body[0] !== 0 || body.readUInt32BE(1) !== body.length - 5) {
          reject(new Error(`malformed gRPC response body (${body.length} bytes)`));
          return;
        }
        try {
          resolveCall(def.responseDeserialize(body.subarray(5)));
        } catch (e) {
          reject(e as Error);
        }
      });
      stream.end(frame);
    });
  return { call, close: () => session.close() };
}

/** GET <url> with a keep-alive agent of `sockets` connections; the JSON body is parsed. */
function restCaller(url: string, sockets: number): { call: () => Promise<unknown>; agent: http.Agent } {
  const u = new URL(url);
  const agent = new http.Agent({ keepAlive: true, maxSockets: sockets, maxFreeSockets: sockets, scheduling: "fifo" });
  const options: http.RequestOptions = {
    host: u.hostname,
    port: u.port,
    path: u.pathname + u.search,
    method: "GET",
    agent,
    headers: { accept: "application/json" },
    timeout: 10_000,
  };
  const call = (): Promise<unknown> =>
    new Promise((resolveCall, reject) => {
      const req = http.request(options, (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("error", reject);
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          if (res.statusCode !== 200) reject(new Error(`HTTP ${res.statusCode}: ${text.slice(0, 200)}`));
          else {
            try {
              resolveCall(JSON.parse(text));
            } catch (e) {
              reject(e as Error);
            }
          }
        });
      });
      req.on("timeout", () => req.destroy(new Error("timed out after 10 s")));
      req.on("error", reject);
      req.end();
    });
  return { call, agent };
}

// ---------------------------------------------------------------------------------------------
// Reporting

interface Row {
  readonly metric: string;
  readonly figure: string;
  readonly baseline: string;
  readonly ratio: number;
  readonly target: string;
  readonly pass: boolean;
}

const fmtInt = (x: number): string => (Number.isFinite(x) ? Math.round(x).toLocaleString("en-US") : "n/a");
const fmt = (x: number, digits = 2): string => (Number.isFinite(x) ? x.toFixed(digits) : "n/a");
const round = (x: number, digits = 2): number | null => (Number.isFinite(x) ? Number(x.toFixed(digits)) : null);

function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: readonly string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd();
  return [line(headers), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n");
}

const loadJson = (r: LoadResult): Record<string, unknown> => ({
  callsPerSec: round(r.callsPerSec, 0),
  p50Ms: round(r.p50Ms, 3),
  p99Ms: round(r.p99Ms, 3),
  maxMs: round(r.maxMs, 3),
  calls: r.calls,
  errors: r.errors,
  serverCpuPct: round(r.serverCpuPct, 0),
  serverCpuUsPerCall: round(r.serverCpuUsPerCall, 1),
  clientCpuPct: round(r.clientCpuPct, 0),
  otherCpuPct: round(r.otherCpuPct, 0),
});

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

// ---------------------------------------------------------------------------------------------
// The run

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  for (const f of [o.daemonJs, BARE_JS]) {
    if (!existsSync(f)) throw new UsageError(`${f} is missing: run "npm run build" first (npm run bench does)`);
  }
  const base = mkdtempSync(join(tmpdir(), "piccolod-bench-"));
  tempDirs.add(base);
  const log = (s: string): void => void process.stderr.write(`bench: ${s}\n`);
  const cpuModel = cpus()[0]?.model ?? "?";
  log(
    `node ${process.version}, ${availableParallelism()} CPU(s) (${cpuModel}); ${o.concurrency} in flight, ` +
      `${o.warmupMs} ms warm-up + ${o.durationMs} ms per target in ${o.rounds} slices; ${o.starts} starts; gRPC client ${o.grpcClient}`,
  );

  // --- idle RSS, and the servers for the load runs ------------------------------------------
  log("starting piccolod for the load runs (log level warn)");
  const profArgs = (name: string): string[] =>
    o.cpuProfDir ? ["--cpu-prof", `--cpu-prof-dir=${o.cpuProfDir}`, `--cpu-prof-name=${name}.cpuprofile`] : [];
  if (o.cpuProfDir) log(`CPU profiles of the load servers go to ${o.cpuProfDir} (the profiler slows them down)`);
  const daemon = await startPiccolod(o.daemonJs, base, "load-piccolod", "warn", profArgs("piccolod"));
  await sleep(o.idleMs);
  const daemonIdleRss = procStatusMb(daemon.pid, "VmRSS");

  // The response to serve, as piccolod serves it (through the project's client, once).
  const once = createGrpcClients({ endpoint: daemon.endpoints.grpc, timeoutMs: 10_000, plaintext: true });
  const version = await once.system.getVersion({}).finally(() => once.close());
  const responseBase64 = Buffer.from(GetVersionResponse.encode(version).finish()).toString("base64");

  log("starting the bare grpc-js server");
  const bare = await startBare(base, "load-bare", responseBase64, profArgs("bare-grpc-js"));
  await sleep(o.idleMs);
  const bareIdleRss = procStatusMb(bare.pid, "VmRSS");

  const newCaller = o.grpcClient === "h2" ? h2Caller : grpcJsCaller;
  const piccoloGrpc = newCaller(daemon.endpoints.grpc);
  const bareGrpc = newCaller(bare.endpoints.grpc);
  const rest = restCaller(`${daemon.endpoints.rest!}/api/v1/version`, o.concurrency);
  // Sanity: all three answer the same thing through the load clients.
  const encoded = (v: unknown): string => Buffer.from(GetVersionResponse.encode(v as GetVersionResponse).finish()).toString("base64");
  if (encoded(await piccoloGrpc.call()) !== responseBase64) throw new Error("piccolod answered differently through the load client");
  if (encoded(await bareGrpc.call()) !== responseBase64) throw new Error("the bare server's GetVersionResponse differs from piccolod's");
  const restVersion = (await rest.call()) as { version?: string; kernel?: string };
  if (restVersion.version !== version.version || restVersion.kernel !== version.kernel) {
    throw new Error(`REST /api/v1/version answered ${JSON.stringify(restVersion)}`);
  }

  // --- load runs: bare gRPC, piccolod gRPC, piccolod REST, interleaved -------------------------
  const [bareRun, grpcRun, restRun] = (await runInterleaved(
    [
      { label: "gRPC bare grpc-js", call: bareGrpc.call, serverPid: bare.pid },
      { label: "gRPC piccolod", call: piccoloGrpc.call, serverPid: daemon.pid },
      { label: "REST piccolod", call: rest.call, serverPid: daemon.pid },
    ],
    o,
    log,
  )) as [LoadResult, LoadResult, LoadResult];
  const daemonLoadedRss = procStatusMb(daemon.pid, "VmRSS");
  const daemonPeakRss = procStatusMb(daemon.pid, "VmHWM");

  piccoloGrpc.close();
  bareGrpc.close();
  rest.agent.destroy();
  await Promise.all([stopServer(daemon), stopServer(bare)]);

  // --- start to ready ---------------------------------------------------------------------------
  log(`start to ready: ${o.starts} × piccolod (log level info) and ${o.starts} × bare grpc-js, interleaved`);
  const daemonStarts: number[] = [];
  const daemonSelfReported: number[] = [];
  const bareStarts: number[] = [];
  const daemonStartCpu: number[] = [];
  const bareStartCpu: number[] = [];
  for (let i = 0; i < o.starts; i++) {
    const d = await startPiccolod(o.daemonJs, base, `start-${i}`, "info");
    daemonStarts.push(d.readyMs);
    daemonStartCpu.push(d.readyCpuMs);
    // The daemon's own figure (from main() to ready, without Node start-up and module loading),
    // logged just after endpoints.json is written.
    const until = performance.now() + 1000;
    let m: RegExpExecArray | null = null;
    while (!(m = /"startupMs":(\d+)[^\n]*"msg":"piccolod ready"/.exec(d.output())) && performance.now() < until) await sleep(5);
    if (m) daemonSelfReported.push(Number(m[1]));
    await stopServer(d);
    const b = await startBare(base, `start-bare-${i}`, responseBase64);
    bareStarts.push(b.readyMs);
    bareStartCpu.push(b.readyCpuMs);
    await stopServer(b);
  }

  // --- report -----------------------------------------------------------------------------------
  const grpcRatio = grpcRun.callsPerSec / bareRun.callsPerSec;
  const restRatio = restRun.callsPerSec / grpcRun.callsPerSec;
  const startMedian = median(daemonStarts);
  const startMax = Math.max(...daemonStarts);
  const bareStartMedian = median(bareStarts);
  const loadFigure = (r: LoadResult): string =>
    `${fmtInt(r.callsPerSec)} calls/s, p50 ${fmt(r.p50Ms)} ms, p99 ${fmt(r.p99Ms)} ms`;
  const rows: Row[] = [
    {
      metric: `1. gRPC GetVersion, ${o.concurrency} in flight`,
      figure: loadFigure(grpcRun),
      baseline: `bare grpc-js: ${loadFigure(bareRun)}`,
      ratio: grpcRatio,
      target: "piccolod/bare >= 0.80",
      pass: grpcRatio >= 0.8,
    },
    {
      metric: `2. REST GET /api/v1/version, ${o.concurrency} in flight`,
      figure: loadFigure(restRun),
      baseline: `gRPC piccolod: ${fmtInt(grpcRun.callsPerSec)} calls/s`,
      ratio: restRatio,
      target: "REST/gRPC >= 0.60",
      pass: restRatio >= 0.6,
    },
    {
      metric: `3. start to ready, N=${o.starts}`,
      figure: `median ${fmtInt(startMedian)} ms, max ${fmtInt(startMax)} ms`,
      baseline: `bare grpc-js: median ${fmtInt(bareStartMedian)} ms, max ${fmtInt(Math.max(...bareStarts))} ms`,
      ratio: startMedian / bareStartMedian,
      target: "median and max < 500 ms",
      pass: startMedian < 500 && startMax < 500,
    },
    {
      metric: `4. idle RSS after ${fmt(o.idleMs / 1000, 0)} s`,
      figure: `${fmt(daemonIdleRss, 1)} MB`,
      baseline: `bare grpc-js: ${fmt(bareIdleRss, 1)} MB`,
      ratio: daemonIdleRss / bareIdleRss,
      target: "< 80 MB",
      pass: daemonIdleRss < 80,
    },
  ];

  const out: string[] = [];
  out.push("");
  out.push(
    `piccolod RPC benchmark — node ${process.version}, ${availableParallelism()} CPU(s), ${o.concurrency} in flight, ` +
      `${o.durationMs / 1000} s per target (${o.rounds} interleaved slices) after ${o.warmupMs / 1000} s warm-up`,
  );
  out.push(
    `load clients: gRPC ${o.grpcClient === "h2" ? "bare node:http2 (one session)" : "the project's grpc-js promise client (one channel)"}, ` +
      `REST node:http keep-alive agent (${o.concurrency} sockets)`,
  );
  out.push("");
  out.push(
    table(
      ["metric", "figure", "baseline", "ratio", "target", "result"],
      rows.map((r) => [r.metric, r.figure, r.baseline, fmt(r.ratio), r.target, r.pass ? "PASS" : "MISS"]),
    ),
  );
  out.push("");
  out.push("load runs in detail (CPU in % of one core over the measuring window; µs CPU per call is the server's):");
  out.push(
    table(
      ["run", "calls/s", "p50 ms", "p99 ms", "max ms", "calls", "errors", "server CPU", "server µs/call", "client CPU", "other CPU"],
      [bareRun, grpcRun, restRun].map((r) => [
        r.label,
        fmtInt(r.callsPerSec),
        fmt(r.p50Ms),
        fmt(r.p99Ms),
        fmt(r.maxMs),
        fmtInt(r.calls),
        String(r.errors),
        `${fmt(r.serverCpuPct, 0)}%`,
        fmt(r.serverCpuUsPerCall, 1),
        `${fmt(r.clientCpuPct, 0)}%`,
        `${fmt(r.otherCpuPct, 0)}%`,
      ]),
    ),
  );
  for (const r of [bareRun, grpcRun, restRun]) if (r.errors > 0) out.push(`  ${r.label}: ${r.errors} errors, first: ${r.firstError}`);
  const clientBound = [bareRun, grpcRun, restRun].filter((r) => r.clientCpuPct >= 90).map((r) => r.label);
  if (clientBound.length > 0) {
    out.push(
      `  note: the load generator used >= 90% of a core in: ${clientBound.join(", ")}; there the throughput is ` +
        "partly client-bound and the server µs/call column is the fairer comparison.",
    );
  }
  const noisy = Math.max(bareRun.otherCpuPct, grpcRun.otherCpuPct, restRun.otherCpuPct);
  if (noisy >= 20) {
    out.push(
      `  note: other processes used up to ${fmt(noisy, 0)}% of a core during the load runs (this machine has ` +
        `${availableParallelism()} CPUs); absolute figures are low and noisy, ratios less so (the runs were interleaved).`,
    );
  }
  out.push(
    `  server-side cost ratio (µs/call): piccolod gRPC / bare = ${fmt(grpcRun.serverCpuUsPerCall / bareRun.serverCpuUsPerCall)}, ` +
      `piccolod REST / gRPC = ${fmt(restRun.serverCpuUsPerCall / grpcRun.serverCpuUsPerCall)}`,
  );
  out.push(
    `  start to ready, each run (ms): piccolod ${daemonStarts.map((x) => fmtInt(x)).join(" ")}; bare ${bareStarts.map((x) => fmtInt(x)).join(" ")}`,
  );
  out.push(
    `  CPU used until ready (median; not inflated by other processes): piccolod ${fmtInt(median(daemonStartCpu))} ms, ` +
      `bare ${fmtInt(median(bareStartCpu))} ms`,
  );
  if (daemonSelfReported.length > 0) {
    out.push(
      `  piccolod's own startupMs (main() to ready, without Node start-up and module loading): median ${fmtInt(median(daemonSelfReported))} ms`,
    );
  }
  out.push(`  piccolod RSS: idle ${fmt(daemonIdleRss, 1)} MB, after the load runs ${fmt(daemonLoadedRss, 1)} MB, peak ${fmt(daemonPeakRss, 1)} MB`);
  out.push("");
  process.stdout.write(out.join("\n") + "\n");

  const summary = {
    bench: "piccolod-rpc",
    node: process.version,
    cpus: availableParallelism(),
    concurrency: o.concurrency,
    warmupMs: o.warmupMs,
    durationMs: o.durationMs,
    rounds: o.rounds,
    grpcClient: o.grpcClient,
    grpc: { piccolod: loadJson(grpcRun), bare: loadJson(bareRun), ratio: round(grpcRatio, 3), target: 0.8, pass: grpcRatio >= 0.8 },
    rest: { piccolod: loadJson(restRun), ratio: round(restRatio, 3), target: 0.6, pass: restRatio >= 0.6 },
    startup: {
      runs: o.starts,
      medianMs: round(startMedian, 1),
      maxMs: round(startMax, 1),
      selfReportedMedianMs: daemonSelfReported.length > 0 ? median(daemonSelfReported) : null,
      bareMedianMs: round(bareStartMedian, 1),
      cpuMedianMs: round(median(daemonStartCpu), 0),
      bareCpuMedianMs: round(median(bareStartCpu), 0),
      ratio: round(startMedian / bareStartMedian, 3),
      targetMs: 500,
      pass: startMedian < 500 && startMax < 500,
    },
    idleRss: {
      mb: round(daemonIdleRss, 1),
      bareMb: round(bareIdleRss, 1),
      ratio: round(daemonIdleRss / bareIdleRss, 3),
      afterLoadMb: round(daemonLoadedRss, 1),
      peakMb: round(daemonPeakRss, 1),
      targetMb: 80,
      pass: daemonIdleRss < 80,
    },
    allPass: rows.every((r) => r.pass),
  };
  process.stdout.write(JSON.stringify(summary) + "\n");
}

main().then(
  () => {
    killAll();
    removeTempDirs();
    process.exit(0);
  },
  (err: unknown) => {
    const text = err instanceof UsageError ? err.message : ((err as Error).stack ?? String(err));
    process.stderr.write(`bench: failed: ${text}\n`);
    killAll();
    removeTempDirs();
    process.exit(1);
  },
);
