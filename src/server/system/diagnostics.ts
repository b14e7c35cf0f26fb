/**
 * The `system.diagnostics` operation: the health checks and deeper ones, with progress. Its write
 * probe is a real sequential write to the state folder (fsync'd), which makes it the daemon's
 * first long-running operation and the one that proves the Operation model end to end.
 */
import { mkdir, open, readdir, rm, statfs } from "node:fs/promises";
import { freemem, totalmem } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import { Any } from "../../../gen/google/protobuf/any.js";
import {
  CheckStatus,
  RunDiagnosticsRequest,
  RunDiagnosticsResult,
  type HealthCheck,
} from "../../../gen/piccolo/system/v1/system.js";
import type { OperationKind, WorkerContext } from "../operations/manager.js";
import { overallState, runHealthChecks, type HealthDeps } from "./health.js";

const MiB = 1024 * 1024;
const PHASES = ["health", "fsync_latency", "write_throughput", "free_space", "clock", "memory", "journals"] as const;
// Share of the whole operation each phase stands for, in percent; the write probe dominates.
const WEIGHT: Record<(typeof PHASES)[number], number> = {
  health: 5,
  fsync_latency: 5,
  write_throughput: 80,
  free_space: 2,
  clock: 2,
  memory: 2,
  journals: 4,
};

const check = (name: string, status: CheckStatus, detail: string): HealthCheck => ({ name, status, detail, required: false });

/** What the diagnostics need besides the health checks' host parts. */
export interface DiagnosticsDeps extends HealthDeps {
  /** The operation journal folder, checked for unreadable journals. */
  readonly journalDir: string;
}

const probeDir = (stateDir: string): string => join(stateDir, "tmp");

/** Creates the `system.diagnostics` operation kind. */
export function diagnosticsKind(deps: DiagnosticsDeps): OperationKind<RunDiagnosticsRequest> {
  return {
    kind: "system.diagnostics",
    requestType: "piccolo.system.v1.RunDiagnosticsRequest",
    encodeRequest: (r) => RunDiagnosticsRequest.encode(r).finish(),
    exclusive: false,
    single: true,
    cancellable: true,
    async run(req, ctx) {
      return Any.fromPartial({
        typeUrl: "type.googleapis.com/piccolo.system.v1.RunDiagnosticsResult",
        value: RunDiagnosticsResult.encode(await runDiagnostics(deps, req.writeProbeMib || 64, ctx)).finish(),
      });
    },
    async recover(_op, log) {
      return removeProbes(deps.stateDir, log);
    },
  };
}

async function removeProbes(stateDir: string, log: Logger): Promise<string> {
  let names: string[] = [];
  try {
    names = (await readdir(probeDir(stateDir))).filter((n) => n.startsWith("diag-") && n.endsWith(".probe"));
  } catch {
    return "nothing was left behind";
  }
  for (const n of names) {
    await rm(join(probeDir(stateDir), n), { force: true });
    log.info({ file: n }, "removed a left-over diagnostics probe file");
  }
  return names.length > 0
    ? `removed the left-over write probe ${names.map((n) => join(probeDir(stateDir), n)).join(", ")}`
    : "nothing was left behind";
}

async function runDiagnostics(deps: DiagnosticsDeps, probeMib: number, ctx: WorkerContext): Promise<RunDiagnosticsResult> {
  const checks: HealthCheck[] = [];
  let done = 0;
  const phase = (name: (typeof PHASES)[number], message: string): void => {
    ctx.progress({ phase: name, phaseIndex: PHASES.indexOf(name) + 1, phaseCount: PHASES.length, percent: done, message });
  };
  const finish = (name: (typeof PHASES)[number]): void => {
    done += WEIGHT[name];
  };
  const throwIfAborted = (): void => ctx.signal.throwIfAborted();

  phase("health", "running the health checks");
  checks.push(...(await runHealthChecks(deps)));
  finish("health");
  throwIfAborted();

  phase("fsync_latency", "measuring fsync latency in the state folder");
  await mkdir(probeDir(deps.stateDir), { recursive: true, mode: 0o700 });
  const latencies: number[] = [];
  {
    const file = join(probeDir(deps.stateDir), `diag-${ctx.id}-fsync.probe`);
    const fh = await open(file, "w", 0o600);
    try {
      for (let i = 0; i < 20; i++) {
        throwIfAborted();
        const t0 = performance.now();
        await fh.write(Buffer.alloc(4096, i), 0, 4096, 0);
        await fh.datasync();
        latencies.push(performance.now() - t0);
      }
    } finally {
      await fh.close();
      await rm(file, { force: true });
    }
  }
  latencies.sort((a, b) => a - b);
  const medianMs = latencies[Math.floor(latencies.length / 2)] ?? 0;
  checks.push(
    check(
      "fsync_latency",
      medianMs > 100 ? CheckStatus.CHECK_STATUS_WARN : CheckStatus.CHECK_STATUS_PASS,
      `median fsync of a 4 KiB write: ${medianMs.toFixed(2)} ms`,
    ),
  );
  finish("fsync_latency");

  phase("write_throughput", `writing a ${probeMib} MiB probe to the state folder`);
  const total = probeMib * MiB;
  const file = join(probeDir(deps.stateDir), `diag-${ctx.id}.probe`);
  const chunk = Buffer.alloc(4 * MiB, 0xa5);
  const t0 = performance.now();
  const fh = await open(file, "w", 0o600);
  let written = 0;
  try {
    while (written < total) {
      throwIfAborted();
      const n = Math.min(chunk.length, total - written);
      await fh.write(chunk, 0, n);
      written += n;
      if (written % (64 * MiB) === 0 || written === total) await fh.datasync();
      ctx.progress({
        phase: "write_throughput",
        percent: done + (WEIGHT.write_throughput * written) / total,
        bytesDone: written,
        bytesTotal: total,
        message: `writing the probe: ${(written / MiB).toFixed(0)} of ${probeMib} MiB`,
      });
    }
  } finally {
    await fh.close();
    await rm(file, { force: true });
  }
  const seconds = (performance.now() - t0) / 1000;
  const bps = total / Math.max(seconds, 1e-6);
  checks.push(
    check(
      "write_throughput",
      bps < 5 * MiB ? CheckStatus.CHECK_STATUS_WARN : CheckStatus.CHECK_STATUS_PASS,
      `${(bps / MiB).toFixed(1)} MiB/s sequential write with fsync (${probeMib} MiB in ${seconds.toFixed(2)} s)`,
    ),
  );
  finish("write_throughput");

  phase("free_space", "checking free space in the state folder");
  const fs = await statfs(deps.stateDir);
  const free = fs.bavail * fs.bsize;
  checks.push(
    check(
      "free_space",
      free < 100 * MiB ? CheckStatus.CHECK_STATUS_FAIL : free < 1024 * MiB ? CheckStatus.CHECK_STATUS_WARN : CheckStatus.CHECK_STATUS_PASS,
      `${(free / 1024 / MiB).toFixed(1)} GiB free of ${((fs.blocks * fs.bsize) / 1024 / MiB).toFixed(1)} GiB in ${deps.stateDir}`,
    ),
  );
  finish("free_space");

  phase("clock", "checking the clock");
  const year = new Date().getUTCFullYear();
  checks.push(
    check(
      "clock",
      year < 2025 ? CheckStatus.CHECK_STATUS_WARN : CheckStatus.CHECK_STATUS_PASS,
      year < 2025 ? `the clock says ${new Date().toISOString()}: not synchronised? TLS and token expiry will fail` : `clock at ${new Date().toISOString()}`,
    ),
  );
  finish("clock");

  phase("memory", "checking memory");
  const freeMem = freemem();
  checks.push(
    check(
      "memory",
      freeMem < 128 * MiB ? CheckStatus.CHECK_STATUS_WARN : CheckStatus.CHECK_STATUS_PASS,
      `${(freeMem / MiB).toFixed(0)} MiB free of ${(totalmem() / MiB).toFixed(0)} MiB; daemon RSS ${(process.memoryUsage.rss() / MiB).toFixed(1)} MiB`,
    ),
  );
  finish("memory");

  phase("journals", "checking the operation journals");
  const journals = (await readdir(deps.journalDir)).filter((n) => n.endsWith(".journal"));
  checks.push(check("operation_journals", CheckStatus.CHECK_STATUS_PASS, `${journals.length} operation journals in ${deps.journalDir}`));
  finish("journals");
  ctx.progress({ phase: "journals", percent: 100, message: "diagnostics complete" });

  return {
    state: overallState(checks),
    checks,
    writeBytesPerSecond: bps,
    fsyncLatency: { seconds: Math.floor(medianMs / 1000), nanos: Math.round((medianMs % 1000) * 1e6) },
  };
}
