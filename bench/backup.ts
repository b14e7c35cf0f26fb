/**
 * Backup benchmark, in one run (`npm run build`, then `node dist/bench/backup.js`; root, with
 * Debian's restic, docker.io, busybox-static and swtpm installed):
 *
 *   1 GiB of app volume data (random, so incompressible, in 64 MiB files) backed up through
 *   piccolod (CreateBackup of the volume, its app paused around it, the repository password
 *   unsealed from the TPM) against `restic backup` run directly on the same folder; each run
 *   into a fresh repository, the runs interleaved. Target: piccolod's throughput ≥ 0.95× restic's
 *   (median of the runs).
 *
 * Everything runs on private parts: a dockerd and an swtpm in temporary folders, piccolod on a
 * temporary state folder. A MISS is printed, never an exit status. Everything started is stopped
 * and every temporary folder removed, also on SIGINT/SIGTERM.
 *
 * Options (flags or env): --mib (BENCH_BACKUP_MIB, 1024), --runs (BENCH_BACKUP_RUNS, 3).
 */
import { spawn, type ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { cpus, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { CreateBackupResult, QuiesceMode } from "../gen/piccolo/backup/v1/backup.js";
import { OperationState } from "../gen/piccolo/operations/v1/operations.js";
import { createGrpcClients, type PiccoloGrpcClients } from "../src/clients/grpc-client.js";
import { run, startDockerd, type TestDockerd } from "../test/helpers/dockerd.js";
import { startSwtpm, type Swtpm } from "../test/helpers/swtpm.js";

const HERE = dirname(fileURLToPath(import.meta.url));
/** dist/bench → repository root. */
const ROOT = resolve(HERE, "../..");
const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
const MiB = 1024 * 1024;

/** A mistake on the command line: printed without a stack. */
class UsageError extends Error {}

function parseOptions(argv: readonly string[]): { mib: number; runs: number } {
  const o = { mib: Number(process.env["BENCH_BACKUP_MIB"] ?? 1024), runs: Number(process.env["BENCH_BACKUP_RUNS"] ?? 3) };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === "--help" || a === "-h") {
      process.stdout.write(
        "usage: node dist/bench/backup.js [--mib N] [--runs N]\n" +
          "  --mib N    volume data backed up, in MiB (BENCH_BACKUP_MIB, 1024)\n" +
          "  --runs N   runs of each side (BENCH_BACKUP_RUNS, 3)\n",
      );
      process.exit(0);
    }
    const v = argv[++i];
    if (a === "--mib") o.mib = Number(v);
    else if (a === "--runs") o.runs = Number(v);
    else throw new UsageError(`unknown flag ${a}`);
  }
  if (!Number.isInteger(o.mib) || o.mib < 64 || o.mib > 65536) throw new UsageError("--mib must be a whole number from 64 to 65536");
  if (!Number.isInteger(o.runs) || o.runs < 1 || o.runs > 20) throw new UsageError("--runs must be from 1 to 20");
  return o;
}

let engine: TestDockerd | undefined;
let tpm: Swtpm | undefined;
let daemon: ChildProcess | undefined;
let clients: PiccoloGrpcClients | undefined;
const tempDirs = new Set<string>();

async function cleanup(): Promise<void> {
  clients?.close();
  if (daemon && daemon.exitCode === null && daemon.signalCode === null) {
    daemon.kill("SIGKILL");
    await new Promise((r) => daemon!.once("exit", r));
  }
  daemon = undefined;
  const e = engine;
  engine = undefined;
  if (e) await e.cleanup().catch((err: unknown) => process.stderr.write(`bench: engine clean-up failed: ${String(err)}\n`));
  await tpm?.cleanup();
  tpm = undefined;
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

async function startPiccolod(base: string, socket: string, tcti: string): Promise<string> {
  const state = join(base, "state");
  const runDir = join(base, "run");
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith("PICCOLOD_")) env[k] = v;
  env["NOTIFY_SOCKET"] = "";
  const p = spawn(
    process.execPath,
    [DAEMON_JS, "--state-dir", state, "--runtime-dir", runDir, "--grpc-listen", "", "--rest-listen", "", "--log-level", "warn",
      "--docker-socket", socket, "--tpm2-device", tcti, "--backup-repository-roots", base,
      "--network-config-dir", join(base, "network"), "--network-reload-command", "", "--network-reconfigure-command", "", "--hostname-file", join(base, "hostname"), "--hostname-command", ""],
    { env, stdio: ["ignore", "ignore", "pipe"] },
  );
  daemon = p;
  let err = "";
  p.stderr!.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-4096)));
  const t0 = Date.now();
  for (;;) {
    if (p.exitCode !== null) throw new Error(`piccolod exited (${p.exitCode}): ${err}`);
    try {
      const ep = JSON.parse(await readFile(join(runDir, "endpoints.json"), "utf8")) as { socket: string; pid: number };
      if (ep.pid === p.pid) return ep.socket;
    } catch {
      // not yet
    }
    if (Date.now() - t0 > 20_000) throw new Error("piccolod did not become ready within 20 s");
    await new Promise((r) => setTimeout(r, 20));
  }
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const o = parseOptions(process.argv.slice(2));
  if (!existsSync(DAEMON_JS)) throw new UsageError(`${DAEMON_JS} is missing: run "npm run build" first`);
  const base = mkdtempSync(join(tmpdir(), "piccolod-bench-backup-"));
  tempDirs.add(base);
  log(`starting dockerd and swtpm`);
  [engine, tpm] = await Promise.all([startDockerd(), startSwtpm()]);
  const socket = await startPiccolod(base, engine.socket, tpm.tcti);
  clients = createGrpcClients({ endpoint: `unix://${socket}`, timeoutMs: 120_000 });
  const vol = await clients.storage.createVolume({ name: "bench-data", labels: {} });
  await engine.makeImage("bench/app:1");
  await engine.dockerOk(["run", "-d", "--name", "bench-app", "--network", "none", "-v", "bench-data:/data", "bench/app:1", "sleep", "3600"]);
  log(`writing ${o.mib} MiB of random data into volume ${vol.name} (${vol.mountPoint})`);
  await mkdir(join(vol.mountPoint, "files"), { recursive: true });
  for (let i = 0; i * 64 < o.mib; i++) await writeFile(join(vol.mountPoint, "files", `f${i}`), randomBytes(Math.min(64, o.mib - i * 64) * MiB));
  const bytes = o.mib * MiB;

  const direct: number[] = [];
  const viaPiccolod: number[] = [];
  let n = 0;
  const directRun = async (): Promise<void> => {
    const repo = join(base, `direct-${n++}`);
    const env = { ...process.env, RESTIC_PASSWORD: "bench-password" };
    const cache = join(base, "direct-cache");
    let r = await run("restic", ["-r", repo, "--cache-dir", cache, "init"], { env });
    if (r.code !== 0) throw new Error(`restic init: ${r.stderr}`);
    const t0 = performance.now();
    r = await run("restic", ["-r", repo, "--cache-dir", cache, "backup", "--json", vol.mountPoint], { env, timeoutMs: 3_600_000 });
    const s = (performance.now() - t0) / 1000;
    if (r.code !== 0) throw new Error(`restic backup: ${r.stderr}`);
    direct.push(bytes / s);
    log(`restic directly: ${s.toFixed(2)} s, ${(bytes / s / MiB).toFixed(1)} MiB/s`);
  };
  const piccolodRun = async (): Promise<void> => {
    const repo = join(base, `piccolod-${n++}`);
    await clients!.backup.initRepository({ location: repo, existing: false, password: "" });
    const t0 = performance.now();
    let result: CreateBackupResult | undefined;
    for await (const e of clients!.backup.createBackup({
      scope: { state: false, credentials: false, volumes: [vol.name], allVolumes: false },
      quiesce: QuiesceMode.QUIESCE_MODE_PAUSE,
      tags: [],
    })) {
      if (e.outcome) {
        if (e.outcome.state !== OperationState.OPERATION_STATE_SUCCEEDED) throw new Error(`CreateBackup failed: ${e.outcome.error?.message}`);
        result = CreateBackupResult.decode(e.outcome.result!.value);
      }
    }
    const s = (performance.now() - t0) / 1000;
    if (!result || result.bytesProcessed < bytes) throw new Error(`CreateBackup read ${result?.bytesProcessed} bytes, expected ${bytes}`);
    viaPiccolod.push(bytes / s);
    log(`through piccolod: ${s.toFixed(2)} s, ${(bytes / s / MiB).toFixed(1)} MiB/s (app paused: ${result.quiescedContainers.join(", ")})`);
  };
  for (let i = 0; i < o.runs; i++) {
    // Alternate who goes first, so a slow phase of the machine hits both alike.
    if (i % 2 === 0) {
      await directRun();
      await piccolodRun();
    } else {
      await piccolodRun();
      await directRun();
    }
  }
  const ratio = median(viaPiccolod) / median(direct);
  const lines = [
    `backup of ${o.mib} MiB of volume data, ${o.runs} run(s) each, ${cpus().length} CPU(s), restic ${(await run("restic", ["version"])).stdout.split(" ")[1] ?? "?"}`,
    `  restic backup directly : ${(median(direct) / MiB).toFixed(1)} MiB/s (median)`,
    `  piccolod CreateBackup  : ${(median(viaPiccolod) / MiB).toFixed(1)} MiB/s (median)`,
    `  ratio piccolod/restic  : ${ratio.toFixed(3)}  target >= 0.95  ${ratio >= 0.95 ? "OK" : "MISS"}`,
  ];
  process.stdout.write(lines.join("\n") + "\n");
}

main()
  .catch((e: unknown) => {
    process.stderr.write(`bench: ${e instanceof UsageError ? e.message : ((e as Error).stack ?? String(e))}\n`);
    process.exitCode = e instanceof UsageError ? 2 : 1;
  })
  .finally(() => cleanup());
