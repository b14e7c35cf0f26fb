/**
 * Container benchmarks of piccolod against a real dockerd, in one run (`npm run build`, then
 * `node dist/bench/containers.js`; root, with Debian's docker.io and busybox-static installed):
 *
 *  1. ListContainers with 100 containers (gRPC over the unix socket, one call at a time) against
 *     `docker ps -a --format json` on the same engine; target piccolod/CLI ≤ 0.5 (median time).
 *  2. create+start of 50 containers, one after another: EnsureRunning (one call per container)
 *     against `docker run -d` (one CLI run per container); target ≤ 0.7 (total time). The same
 *     with 5 in flight on both sides is printed as a detail.
 *  3. import of a 200 MiB image archive (`docker save` output): ImportImage against
 *     `docker load -i`; target ≥ 0.9 (throughput, median of the runs).
 *
 * The engine is a private dockerd in a temporary folder (test/helpers/dockerd.ts), piccolod a
 * child process on a temporary state folder; both sides of every comparison talk to the same
 * engine, and the runs are interleaved so other load on the machine hits both alike. A MISS is
 * printed, never an exit status: the process exits 0 unless the benchmark itself could not run.
 * Everything started is stopped and every temporary folder removed, also on SIGINT/SIGTERM.
 *
 * Options (flags or env): --list-runs (BENCH_LIST_RUNS, 30), --containers (BENCH_CONTAINERS, 50),
 * --import-mib (BENCH_IMPORT_MIB, 200), --import-runs (BENCH_IMPORT_RUNS, 5).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { createReadStream, existsSync, mkdtempSync, rmSync } from "node:fs";
import { mkdir, open, readFile, stat, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import Docker from "dockerode";
import { ContainerServiceService, ContainerSpec, ContainerState, ImportFormat, RestartPolicy } from "../gen/piccolo/containers/v1/containers.js";
import { OperationState } from "../gen/piccolo/operations/v1/operations.js";
import { createGrpcClients, createPromiseClient } from "../src/clients/grpc-client.js";
import { startDockerd, type TestDockerd } from "../test/helpers/dockerd.js";

const HERE = dirname(fileURLToPath(import.meta.url));
/** dist/bench → repository root. */
const ROOT = resolve(HERE, "../..");
const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
const IMAGE = "bench/tiny:1";
const MiB = 1024 * 1024;

interface Options {
  readonly listRuns: number;
  readonly containers: number;
  readonly importMib: number;
  readonly importRuns: number;
}

/** A mistake on the command line: printed without a stack. */
class UsageError extends Error {}

function parseOptions(argv: readonly string[]): Options {
  const flags = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--help" || a === "-h") {
      process.stdout.write(
        "usage: node dist/bench/containers.js [--list-runs N] [--containers N] [--import-mib N] [--import-runs N]\n" +
          "  --list-runs N    ListContainers and docker ps runs each (BENCH_LIST_RUNS, 30)\n" +
          "  --containers N   containers created and started by each side (BENCH_CONTAINERS, 50)\n" +
          "  --import-mib N   size of the image archive imported (BENCH_IMPORT_MIB, 200)\n" +
          "  --import-runs N  imports by each side (BENCH_IMPORT_RUNS, 5)\n",
      );
      process.exit(0);
    }
    const m = /^--([a-z-]+)(?:=(.*))?$/.exec(a);
    if (!m) throw new UsageError(`unexpected argument ${JSON.stringify(a)}`);
    const value = m[2] ?? argv[++i];
    if (value === undefined) throw new UsageError(`--${m[1]} needs a value`);
    flags.set(m[1]!, value);
  }
  const num = (flag: string, env: string, dflt: number, min: number, max: number): number => {
    const raw = flags.get(flag) ?? process.env[env];
    flags.delete(flag);
    if (raw === undefined || raw === "") return dflt;
    const n = Number(raw);
    if (!Number.isInteger(n) || n < min || n > max) throw new UsageError(`--${flag}/${env}: expected an integer in [${min}, ${max}], got ${raw}`);
    return n;
  };
  const o = {
    listRuns: num("list-runs", "BENCH_LIST_RUNS", 30, 3, 1000),
    containers: num("containers", "BENCH_CONTAINERS", 50, 5, 500),
    importMib: num("import-mib", "BENCH_IMPORT_MIB", 200, 8, 4096),
    importRuns: num("import-runs", "BENCH_IMPORT_RUNS", 5, 1, 20),
  };
  if (flags.size > 0) throw new UsageError(`unknown flag(s): ${[...flags.keys()].map((k) => `--${k}`).join(", ")}`);
  return o;
}

// ---------------------------------------------------------------------------------------------
// What was started, always stopped

let engine: TestDockerd | undefined;
let daemon: ChildProcess | undefined;
const tempDirs = new Set<string>();

async function cleanup(): Promise<void> {
  if (daemon && daemon.exitCode === null && daemon.signalCode === null) {
    daemon.kill("SIGKILL");
    await new Promise((r) => daemon!.once("exit", r));
  }
  daemon = undefined;
  const e = engine;
  engine = undefined;
  if (e) await e.cleanup().catch((err: unknown) => process.stderr.write(`bench: engine clean-up failed: ${String(err)}\n`));
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
  tempDirs.clear();
}

for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.once(sig, () => {
    process.stderr.write(`bench: ${sig}, stopping what was started\n`);
    void cleanup().then(() => process.exit(130));
  });
}

const log = (s: string): void => void process.stderr.write(`bench: ${s}\n`);

async function startPiccolod(base: string, socket: string, dataRoot: string): Promise<{ socket: string; pid: number }> {
  const state = join(base, "state");
  const run = join(base, "run");
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("PICCOLOD_")) env[k] = v;
  env["NOTIFY_SOCKET"] = "";
  const p = spawn(
    process.execPath,
    [DAEMON_JS, "--state-dir", state, "--runtime-dir", run, "--grpc-listen", "", "--rest-listen", "", "--log-level", "warn",
      "--docker-socket", socket, "--container-data-roots", dataRoot],
    { env, stdio: ["ignore", "ignore", "pipe"] },
  );
  daemon = p;
  let err = "";
  p.stderr!.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-4096)));
  const t0 = Date.now();
  for (;;) {
    if (p.exitCode !== null) throw new Error(`piccolod exited (${p.exitCode}): ${err}`);
    try {
      const ep = JSON.parse(await readFile(join(run, "endpoints.json"), "utf8")) as { socket: string; pid: number };
      if (ep.pid === p.pid) return ep;
    } catch {
      // not yet
    }
    if (Date.now() - t0 > 20_000) throw new Error("piccolod did not become ready within 20 s");
    await new Promise((r) => setTimeout(r, 20));
  }
}

const spec = (name: string): ContainerSpec => ({
  ...ContainerSpec.create(),
  name,
  image: IMAGE,
  command: ["sleep", "3600"],
  restartPolicy: RestartPolicy.RESTART_POLICY_NO,
  network: "none",
});

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};
const pct = (xs: readonly number[], q: number): number => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(q * xs.length))]!;
const fmt = (x: number, digits = 1): string => (Number.isFinite(x) ? x.toFixed(digits) : "n/a");

/** Runs `n` jobs with `inFlight` at a time; resolves to the wall time in ms. */
async function timed(n: number, inFlight: number, job: (i: number) => Promise<void>): Promise<number> {
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: Math.min(inFlight, n) }, async () => {
      while (next < n) await job(next++);
    }),
  );
  return performance.now() - t0;
}

function table(headers: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: readonly string[]): string => cells.map((c, i) => c.padEnd(widths[i]!)).join("  ").trimEnd();
  return [line(headers), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n");
}

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  if (!existsSync(DAEMON_JS)) throw new UsageError(`${DAEMON_JS} is missing: run "npm run build" first`);
  const base = mkdtempSync(join(tmpdir(), "piccolod-bench-ctr-"));
  tempDirs.add(base);
  const dataRoot = join(base, "data");
  await mkdir(dataRoot, { recursive: true });
  log(`node ${process.version}, ${availableParallelism()} CPU(s) (${cpus()[0]?.model ?? "?"})`);

  log("starting a private dockerd");
  engine = await startDockerd();
  const e = engine;
  const dockerVersion = (await e.dockerOk(["version", "--format", "{{.Server.Version}} (CLI {{.Client.Version}})"])).trim();
  await e.makeImage(IMAGE);
  const ep = await startPiccolod(base, e.socket, dataRoot);
  const clients = createGrpcClients({ endpoint: `unix://${ep.socket}`, timeoutMs: 120_000 });
  const api = createPromiseClient(clients.channel, ContainerServiceService);

  // --- 1. ListContainers with 100 containers ----------------------------------------------------
  log("creating 100 containers");
  await timed(100, 4, async (i) => {
    await api.createContainer({ spec: spec(`bench-list-${i}`) });
  });
  // The engine's own API, straight (no piccolod, no CLI process): the floor of both sides.
  const raw = new Docker({ socketPath: e.socket });
  const listed = (await api.listContainers({ includeUnmanaged: false })).containers.length;
  const psCount = (await e.dockerOk(["ps", "-a", "--format", "json"])).trim().split("\n").length;
  if (listed !== 100 || psCount !== 100) throw new Error(`expected 100 containers, ListContainers saw ${listed}, docker ps ${psCount}`);
  log(`ListContainers vs docker ps -a --format json: ${o.listRuns} runs each, interleaved`);
  const apiList: number[] = [];
  const cliList: number[] = [];
  const rawList: number[] = [];
  for (let i = 0; i < 3; i++) {
    await api.listContainers({ includeUnmanaged: false });
    await e.dockerOk(["ps", "-a", "--format", "json"]);
  }
  for (let i = 0; i < o.listRuns; i++) {
    let t = performance.now();
    await api.listContainers({ includeUnmanaged: false });
    apiList.push(performance.now() - t);
    t = performance.now();
    await e.dockerOk(["ps", "-a", "--format", "json"]);
    cliList.push(performance.now() - t);
    t = performance.now();
    await raw.listContainers({ all: true, filters: { label: ["space.piccolo.managed=true"] } });
    rawList.push(performance.now() - t);
  }
  log("removing the 100 containers");
  await e.dockerOk(["rm", "-f", ...(await e.dockerOk(["ps", "-aq"])).trim().split("\n")], { timeoutMs: 120_000 });

  // --- 2. create+start 50 -------------------------------------------------------------------
  const n = o.containers;
  const runApi = (prefix: string) => async (i: number) => {
    const r = await api.ensureRunning({ spec: spec(`${prefix}-${i}`) });
    if (r.container?.state !== ContainerState.CONTAINER_STATE_RUNNING) throw new Error(`${prefix}-${i} is not running`);
  };
  const runCli = (prefix: string) => async (i: number) => {
    await e.dockerOk(["run", "-d", "--network", "none", "--name", `${prefix}-${i}`, IMAGE, "sleep", "3600"]);
  };
  const removeAll = async (): Promise<void> => {
    const ids = (await e.dockerOk(["ps", "-aq"])).trim();
    if (ids) await e.dockerOk(["rm", "-f", ...ids.split("\n")], { timeoutMs: 300_000 });
  };
  const runRaw = (prefix: string) => async (i: number) => {
    const c = await raw.createContainer({ name: `${prefix}-${i}`, Image: IMAGE, Cmd: ["sleep", "3600"], HostConfig: { NetworkMode: "none" } });
    await c.start();
  };
  log(`create+start of ${n} containers, one at a time: EnsureRunning vs docker run -d vs the engine API, in blocks of 5`);
  // Blocks of five per side, the order rotating, so the growing number of running containers
  // and any drift in the machine's load hit all three alike.
  let apiSeq = 0;
  let cliSeq = 0;
  let rawSeq = 0;
  for (let b = 0; b * 5 < n; b++) {
    const k = Math.min(5, n - b * 5);
    const block = [
      async () => (apiSeq += await timed(k, 1, (i) => runApi(`bench-api-${b}`)(i))),
      async () => (cliSeq += await timed(k, 1, (i) => runCli(`bench-cli-${b}`)(i))),
      async () => (rawSeq += await timed(k, 1, (i) => runRaw(`bench-raw-${b}`)(i))),
    ];
    for (let j = 0; j < 3; j++) await block[(b + j) % 3]!();
  }
  const rawPer = rawSeq / n;
  const running = (await e.dockerOk(["ps", "--format", "{{.Names}}"])).trim().split("\n").length;
  if (running !== 3 * n) throw new Error(`expected ${3 * n} running containers, docker ps shows ${running}`);
  await removeAll();
  log(`create+start of ${n} containers, 5 in flight on both sides`);
  const cliPar = await timed(n, 5, runCli("bench-clip"));
  const apiPar = await timed(n, 5, runApi("bench-apip"));
  await removeAll();

  // --- 3. import a 200 MiB archive ------------------------------------------------------------
  log(`making a ${o.importMib} MiB image archive`);
  const ctx = join(base, "ctx");
  await mkdir(ctx);
  {
    const fh = await open(join(ctx, "blob"), "w");
    const chunk = Buffer.alloc(4 * MiB);
    for (let done = 0; done < o.importMib * MiB; done += chunk.length) {
      for (let k = 0; k < chunk.length; k += 4) chunk.writeUInt32LE((Math.random() * 0xffffffff) >>> 0, k);
      await fh.write(chunk, 0, Math.min(chunk.length, o.importMib * MiB - done));
    }
    await fh.close();
  }
  await writeFile(join(ctx, "Dockerfile"), "FROM scratch\nCOPY blob /blob\n");
  await e.dockerOk(["build", "-q", "-t", "bench/big:1", ctx], { timeoutMs: 600_000 });
  const archive = join(dataRoot, "big.tar");
  await e.dockerOk(["save", "-o", archive, "bench/big:1"], { timeoutMs: 600_000 });
  rmSync(ctx, { recursive: true, force: true });
  const size = (await stat(archive)).size;
  const dropImage = async (): Promise<void> => {
    await e.dockerOk(["rmi", "bench/big:1"]);
  };
  await dropImage();
  log(`import: ${o.importRuns} × ImportImage and ${o.importRuns} × docker load -i, interleaved (${fmt(size / MiB)} MiB archive)`);
  const apiImport: number[] = [];
  const cliImport: number[] = [];
  const rawImport: number[] = [];
  for (let i = 0; i < o.importRuns; i++) {
    let t = performance.now();
    let state = OperationState.OPERATION_STATE_UNSPECIFIED;
    for await (const ev of api.importImage({ path: archive, format: ImportFormat.IMPORT_FORMAT_ARCHIVE, reference: "" }, { timeoutMs: 600_000 })) {
      if (ev.outcome) state = ev.outcome.state;
    }
    if (state !== OperationState.OPERATION_STATE_SUCCEEDED) throw new Error(`ImportImage ended ${OperationState[state]}`);
    apiImport.push(performance.now() - t);
    await dropImage();
    t = performance.now();
    await e.dockerOk(["load", "-q", "-i", archive], { timeoutMs: 600_000 });
    cliImport.push(performance.now() - t);
    await dropImage();
    t = performance.now();
    const source = createReadStream(archive, { highWaterMark: 4 * MiB });
    for await (const _ of (await raw.loadImage(source, { quiet: true } as never)) as unknown as AsyncIterable<Buffer>) {
      // drain the engine's answer
    }
    rawImport.push(performance.now() - t);
    await dropImage();
  }
  clients.close();

  // --- report -------------------------------------------------------------------------------
  const listRatio = median(apiList) / median(cliList);
  const seqRatio = apiSeq / cliSeq;
  const parRatio = apiPar / cliPar;
  const apiMBps = size / MiB / (median(apiImport) / 1000);
  const cliMBps = size / MiB / (median(cliImport) / 1000);
  const importRatio = apiMBps / cliMBps;
  const verdict = (ok: boolean): string => (ok ? "PASS" : "MISS");
  const rows = [
    [
      "1. ListContainers, 100 containers",
      `median ${fmt(median(apiList), 2)} ms, p90 ${fmt(pct(apiList, 0.9), 2)} ms`,
      `docker ps -a --format json: median ${fmt(median(cliList), 2)} ms, p90 ${fmt(pct(cliList, 0.9), 2)} ms`,
      fmt(listRatio, 2),
      "piccolod/CLI <= 0.5",
      verdict(listRatio <= 0.5),
    ],
    [
      `2. create+start ${n}, one at a time`,
      `${fmt(apiSeq / 1000, 2)} s (${fmt(apiSeq / n, 0)} ms each)`,
      `docker run -d: ${fmt(cliSeq / 1000, 2)} s (${fmt(cliSeq / n, 0)} ms each)`,
      fmt(seqRatio, 2),
      "piccolod/CLI <= 0.7",
      verdict(seqRatio <= 0.7),
    ],
    [
      `3. import ${fmt(size / MiB, 0)} MiB archive`,
      `${fmt(apiMBps)} MiB/s (median ${fmt(median(apiImport) / 1000, 2)} s)`,
      `docker load -i: ${fmt(cliMBps)} MiB/s (median ${fmt(median(cliImport) / 1000, 2)} s)`,
      fmt(importRatio, 2),
      "piccolod/CLI >= 0.9",
      verdict(importRatio >= 0.9),
    ],
  ];
  process.stdout.write(
    `\npiccolod container benchmark — node ${process.version}, ${availableParallelism()} CPU(s), Docker engine ${dockerVersion}\n\n` +
      table(["metric", "figure", "baseline", "ratio", "target", "result"], rows) +
      "\n\ndetails:\n" +
      `  the engine's API straight (dockerode, no piccolod, no CLI process): ListContainers' call median ${fmt(median(rawList), 2)} ms; ` +
      `create+start ${fmt(rawPer, 0)} ms each; load ${fmt(size / MiB / (median(rawImport) / 1000))} MiB/s — ` +
      `the floor under both sides: piccolod adds ${fmt(apiSeq / n - rawPer, 0)} ms per create+start over it, the CLI ${fmt(cliSeq / n - rawPer, 0)} ms, ` +
      `so no client of this engine gets below ${fmt(rawSeq / cliSeq, 2)} of the CLI's create+start time\n` +
      `  create+start ${n} with 5 in flight: EnsureRunning ${fmt(apiPar / 1000, 2)} s, docker run -d ${fmt(cliPar / 1000, 2)} s, ratio ${fmt(parRatio, 2)}\n` +
      `  import runs (s): ImportImage ${apiImport.map((x) => fmt(x / 1000, 2)).join(" ")}; docker load ${cliImport.map((x) => fmt(x / 1000, 2)).join(" ")}; ` +
      `engine API ${rawImport.map((x) => fmt(x / 1000, 2)).join(" ")}\n` +
      `  ListContainers runs (ms): min ${fmt(Math.min(...apiList), 2)}, max ${fmt(Math.max(...apiList), 2)}; docker ps min ${fmt(Math.min(...cliList), 2)}, max ${fmt(Math.max(...cliList), 2)}\n` +
      "  (both sides of each comparison talk to the same private dockerd; the docker CLI's figures include its process start, as a user's command line does)\n\n",
  );
  process.stdout.write(
    JSON.stringify({
      bench: "piccolod-containers",
      node: process.version,
      cpus: availableParallelism(),
      docker: dockerVersion,
      engineFloor: { listMedianMs: median(rawList), createStartMs: rawPer, createStartRatioToCli: rawSeq / cliSeq, loadMiBps: size / MiB / (median(rawImport) / 1000) },
      list: { apiMedianMs: median(apiList), cliMedianMs: median(cliList), ratio: listRatio, target: 0.5, pass: listRatio <= 0.5 },
      createStart: { containers: n, apiMs: apiSeq, cliMs: cliSeq, ratio: seqRatio, target: 0.7, pass: seqRatio <= 0.7, parallel5: { apiMs: apiPar, cliMs: cliPar, ratio: parRatio } },
      import: { bytes: size, apiMiBps: apiMBps, cliMiBps: cliMBps, ratio: importRatio, target: 0.9, pass: importRatio >= 0.9 },
    }) + "\n",
  );
}

main()
  .catch((err: unknown) => {
    process.stderr.write(err instanceof UsageError ? `bench: ${err.message}\n` : `bench: failed: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  })
  .finally(() => cleanup());
