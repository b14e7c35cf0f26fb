/**
 * Assembles the daemon: state, operation manager, areas, interceptors, the gRPC server (unix
 * socket and TCP) and the REST gateway; starts them, runs the start-up checks, and stops them.
 */
import { chmod, mkdir, rm, writeFile, rename } from "node:fs/promises";
import { dirname, join } from "node:path";
import pino, { type Logger } from "pino";
import { BackupServiceService } from "../../gen/piccolo/backup/v1/backup.js";
import { ContainerServiceService } from "../../gen/piccolo/containers/v1/containers.js";
import { NetworkServiceService } from "../../gen/piccolo/network/v1/network.js";
import { OperationsServiceService } from "../../gen/piccolo/operations/v1/operations.js";
import { StorageServiceService } from "../../gen/piccolo/storage/v1/storage.js";
import { CheckStatus, SystemServiceService } from "../../gen/piccolo/system/v1/system.js";
import { openAuditLog, type AuditLog } from "./audit.js";
import { createBackupManager } from "./backup/manager.js";
import { createBackupService } from "./backup/service.js";
import { parseListen, type Config } from "./config.js";
import { createDockerEngine } from "./containers/docker.js";
import { buildKind, importKind, pullKind } from "./containers/images.js";
import { createContainerManager } from "./containers/manager.js";
import { createContainerService } from "./containers/service.js";
import { createGateway, type Gateway } from "./gateway.js";
import { createGrpcServer, type GrpcServer } from "./grpc-server.js";
import { auditInterceptor, loggingInterceptor } from "./interceptors.js";
import { openJournalStore } from "./operations/journal.js";
import { createOperationManager, type OperationManager } from "./operations/manager.js";
import { createOperationsService } from "./operations/service.js";
import { createNetRunner } from "./network/interfaces.js";
import { createNetworkManager } from "./network/manager.js";
import { createNetworkService } from "./network/service.js";
import { createMethodRegistry } from "./rpc.js";
import { createStorageService, resealKind } from "./storage/service.js";
import { createVolumeManager } from "./storage/volumes.js";
import { diagnosticsKind } from "./system/diagnostics.js";
import { createHealthChecker, type HealthChecker } from "./system/health.js";
import { createSystemService } from "./system/service.js";
import { CredentialStore } from "./trust/credentials.js";

/** Where the daemon listens, as bound (ports resolved). */
export interface Endpoints {
  /** Unix socket path, or "" when disabled. */
  readonly socket: string;
  /** gRPC TCP "host:port", or "". */
  readonly grpc: string;
  /** REST base URL, or "". */
  readonly rest: string;
  readonly pid: number;
}

/** A running daemon. */
export interface Daemon {
  readonly endpoints: Endpoints;
  readonly ops: OperationManager;
  readonly health: HealthChecker;
  /** Graceful stop: refuse new calls, journal running operations' final events, close listeners. */
  stop(): Promise<void>;
}

/** Thrown when a required start-up check fails; the daemon does not become ready. */
export class StartupCheckError extends Error {
  override readonly name = "StartupCheckError";
}

/** Creates the root logger. */
export function createLogger(config: Pick<Config, "logLevel">): Logger {
  return pino({ level: config.logLevel, base: { svc: "piccolod" }, timestamp: pino.stdTimeFunctions.isoTime });
}

async function writeAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, text, { mode: 0o644 });
  await rename(tmp, path);
}

/** Starts the daemon with a validated configuration. */
export async function startDaemon(config: Config, log: Logger): Promise<Daemon> {
  const health = createHealthChecker({
    stateDir: config.stateDir,
    dockerSocket: config.dockerSocket,
    systemBusAddress: config.systemBusAddress,
    tpmDevices: config.tpmDevices,
    mountInfoFile: config.mountInfoFile,
  });
  // Start-up gate: required checks must pass before anything listens.
  const first = await health.runNow();
  const failed = first.checks.filter((c) => c.required && c.status !== CheckStatus.CHECK_STATUS_PASS);
  if (failed.length > 0) {
    throw new StartupCheckError(`start-up checks failed: ${failed.map((c) => `${c.name}: ${c.detail}`).join("; ")}`);
  }
  for (const c of first.checks.filter((x) => x.status !== CheckStatus.CHECK_STATUS_PASS)) {
    log.warn({ check: c.name, detail: c.detail }, "health check warning");
  }
  try {
    await mkdir(config.runtimeDir, { recursive: true, mode: 0o755 });
  } catch (e) {
    throw new StartupCheckError(`runtime folder ${config.runtimeDir} cannot be created: ${(e as Error).message}`);
  }

  const journalDir = join(config.stateDir, "operations");
  const store = await openJournalStore(journalDir);
  const ops = createOperationManager({
    store,
    log: log.child({ area: "operations" }),
    retention: config.operationRetention,
    progressIntervalMs: config.progressIntervalMs,
  });
  ops.register(
    diagnosticsKind({
      stateDir: config.stateDir,
      dockerSocket: config.dockerSocket,
      systemBusAddress: config.systemBusAddress,
      tpmDevices: config.tpmDevices,
      mountInfoFile: config.mountInfoFile,
      journalDir,
    }),
  );
  // Sealed secrets (systemd-creds, TPM-bound), shared by every area that keeps one.
  const credentials = new CredentialStore({
    dir: join(config.stateDir, "credstore"),
    tpm2Device: config.tpm2Device,
    tpmDevices: config.tpmDevices,
  });

  const engine = createDockerEngine(config.dockerSocket);
  const containers = createContainerManager({
    engine,
    dataRoots: config.containerDataRoots,
    stateDir: config.stateDir,
    log: log.child({ area: "containers" }),
  });
  const imageDeps = { engine, policy: containers.policy };
  ops.register(pullKind(imageDeps));
  ops.register(importKind(imageDeps));
  ops.register(buildKind(imageDeps));
  const volumes = createVolumeManager(engine);
  ops.register(resealKind(config.tpm2Device));
  const backup = createBackupManager({
    stateDir: config.stateDir,
    credentials,
    engine,
    volumes,
    log: log.child({ area: "backup" }),
    resticBin: config.resticBin,
    repositoryRoots: config.backupRepositoryRoots,
  });
  for (const k of Object.values(backup.kinds)) ops.register(k as never);
  await ops.init();
  const network = createNetworkManager({
    runner: createNetRunner(config.networkNamespace),
    stateDir: config.stateDir,
    configDir: config.networkConfigDir,
    reloadCommand: config.networkReloadCommand,
    reconfigureCommand: config.networkReconfigureCommand,
    hostnameFile: config.hostnameFile,
    hostnameCommand: config.hostnameCommand,
    log: log.child({ area: "network" }),
  });
  // A network change left unconfirmed by the last run reverts now (or at its deadline).
  await network.init();

  const audit: AuditLog = await openAuditLog(config.auditLog);
  const registry = createMethodRegistry();
  registry.add(SystemServiceService, createSystemService({ health, ops, osReleaseFiles: config.osReleaseFiles }), "system");
  registry.add(OperationsServiceService, createOperationsService(ops), "operations");
  registry.add(ContainerServiceService, createContainerService({ containers, ops }), "containers");
  registry.add(
    StorageServiceService,
    createStorageService({
      volumes,
      ops,
      credentials,
      mountInfoFile: config.mountInfoFile,
      tpm2Device: config.tpm2Device,
      alertThresholdPercent: config.storageAlertThresholdPercent,
      alertIntervalMs: config.storageAlertIntervalMs,
    }),
    "storage",
  );
  registry.add(BackupServiceService, createBackupService({ backup, ops }), "backup");
  registry.add(NetworkServiceService, createNetworkService({ network, runner: createNetRunner(config.networkNamespace) }), "network");
  const interceptors = [loggingInterceptor, auditInterceptor(audit)];

  const grpcServer: GrpcServer = createGrpcServer(registry, interceptors, log);
  const gateway: Gateway = createGateway(registry, interceptors, log.child({ area: "gateway" }));
  let socket = "";
  let grpcAddr = "";
  let rest = "";
  try {
    if (config.socketPath) {
      await mkdir(dirname(config.socketPath), { recursive: true, mode: 0o755 });
      await rm(config.socketPath, { force: true });
      await grpcServer.bind(`unix:${config.socketPath}`);
      await chmod(config.socketPath, 0o600);
      socket = config.socketPath;
    }
    if (config.grpcListen) {
      const l = parseListen(config.grpcListen)!;
      const port = await grpcServer.bind(`${l.host.includes(":") ? `[${l.host}]` : l.host}:${l.port}`);
      grpcAddr = `${l.host.includes(":") ? `[${l.host}]` : l.host}:${port}`;
    }
    if (config.restListen) {
      const l = parseListen(config.restListen)!;
      const port = await gateway.listen(l.host, l.port);
      rest = `http://${l.host.includes(":") ? `[${l.host}]` : l.host}:${port}`;
    }
  } catch (e) {
    grpcServer.server.forceShutdown();
    await gateway.close();
    await audit.close();
    throw new StartupCheckError(`cannot listen: ${(e as Error).message}`);
  }
  for (const l of [config.grpcListen, config.restListen]) {
    const p = l ? parseListen(l) : undefined;
    if (p && !["127.0.0.1", "::1", "localhost"].includes(p.host)) {
      log.warn({ listen: l }, "listening beyond loopback without authentication; anyone who can reach this address controls the host");
    }
  }
  const endpoints: Endpoints = { socket, grpc: grpcAddr, rest, pid: process.pid };
  await writeAtomic(join(config.runtimeDir, "endpoints.json"), JSON.stringify(endpoints) + "\n");

  let stopped: Promise<void> | undefined;
  return {
    endpoints,
    ops,
    health,
    stop() {
      stopped ??= (async () => {
        log.info("stopping: journaling running operations");
        await ops.shutdown(config.shutdownGraceMs);
        network.close();
        await grpcServer.shutdown(1000);
        await gateway.close();
        await audit.close();
        if (socket) await rm(socket, { force: true });
        await rm(join(config.runtimeDir, "endpoints.json"), { force: true });
      })();
      return stopped;
    },
  };
}
