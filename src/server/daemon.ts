/**
 * Assembles the daemon: state, operation manager, areas, interceptors, the gRPC server (unix
 * socket and TCP) and the REST gateway; starts them, runs the start-up checks, and stops them.
 */
import { chmod, mkdir, rm, writeFile, rename } from "node:fs/promises";
import { dirname, join } from "node:path";
import pino, { type Logger } from "pino";
import { AuthServiceService } from "../../gen/piccolo/auth/v1/auth.js";
import { BackupServiceService } from "../../gen/piccolo/backup/v1/backup.js";
import { ContainerServiceService } from "../../gen/piccolo/containers/v1/containers.js";
import { NetworkServiceService } from "../../gen/piccolo/network/v1/network.js";
import { OperationsServiceService } from "../../gen/piccolo/operations/v1/operations.js";
import { Role } from "../../gen/piccolo/common/v1/access.js";
import { StorageServiceService } from "../../gen/piccolo/storage/v1/storage.js";
import { CheckStatus, SystemServiceService } from "../../gen/piccolo/system/v1/system.js";
import { TaskServiceService } from "../../gen/piccolo/tasks/v1/tasks.js";
import { UpdateServiceService } from "../../gen/piccolo/update/v1/update.js";
import { openAuditLog, type AuditLog } from "./audit.js";
import { createAuth, loadAuthState } from "./auth/index.js";
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
import { dbusSystemd } from "./tasks/agent-service.js";
import { createTaskRunner } from "./tasks/runner.js";
import { createTaskService } from "./tasks/service.js";
import { openTaskRunStore } from "./tasks/store.js";
import { CredentialStore } from "./trust/credentials.js";
import { createTrustManager, type TrustManager } from "./trust/manager.js";
import { createTrustService } from "./trust/service.js";
import { createTpm } from "./trust/tpm.js";
import { TrustServiceService } from "../../gen/piccolo/trust/v1/trust.js";
import { createUpdateManager } from "./update/manager.js";
import { createUpdateService } from "./update/service.js";
import { InstallerServiceService } from "../../gen/piccolo/installer/v1/installer.js";
import { createDiskInventory } from "./disks/inventory.js";
import { createInstaller } from "./installer/manager.js";
import { createInstallerService } from "./installer/service.js";
import { isoTime } from "./iso-time.js";

/** Where the daemon listens, as bound (ports resolved). */
export interface Endpoints {
  /** Unix socket path, or "" when disabled. */
  readonly socket: string;
  /** gRPC TCP "host:port", or "". */
  readonly grpc: string;
  /** REST base URL (https:// unless insecurePlaintext), or "". */
  readonly rest: string;
  /** SHA-256 fingerprint of the TCP listeners' TLS certificate; "" without TLS. */
  readonly tlsFingerprint: string;
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
  return pino({ level: config.logLevel, base: { svc: "piccolod" }, timestamp: () => `,"time":"${isoTime()}"` });
}

async function writeAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, text, { mode: 0o644 });
  await rename(tmp, path);
}

/** Starts the daemon with a validated configuration. */
export async function startDaemon(config: Config, log: Logger): Promise<Daemon> {
  for (const d of config.deprecatedKeys) log.warn({ deprecated: d }, "deprecated configuration key");
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
    dir: join(config.stateDir, "secrets"),
    tpm2Device: config.tpm2Device,
    tpmDevices: config.tpmDevices,
  });
  // The API keys are unsealed by a child process: let that run while the rest starts.
  const authState = loadAuthState({ config, credentials, log: log.child({ area: "auth" }) });
  authState.catch(() => undefined); // awaited (and reported) below

  // Trust: TPM identity, registration with Piccolo central, the device token (trust.deviceToken()).
  const trust: TrustManager = createTrustManager({
    tpm: createTpm({ tpm2Device: config.tpm2Device, tpmDevices: config.tpmDevices, stateDir: join(config.stateDir, "trust") }),
    credentials,
    dir: join(config.stateDir, "trust"),
    centralUrl: config.centralUrl,
    offlineGraceMs: config.trustOfflineGraceMs,
    retryMinMs: config.trustRetryMinMs,
    retryMaxMs: Math.max(config.trustRetryMinMs, config.trustRetryMaxMs),
    osReleaseFiles: config.osReleaseFiles,
    log: log.child({ area: "trust" }),
  });
  ops.register(trust.registerKind);

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
  const taskRunnerDeps = {
    containers,
    credentials,
    store: await openTaskRunStore(join(config.stateDir, "tasks")),
    secretsDir: config.tasksSecretsDir,
    log: log.child({ area: "tasks" }),
  };
  const taskRunner = createTaskRunner(taskRunnerDeps);
  ops.register(taskRunner.kind);
  const update = createUpdateManager({
    stateDir: config.stateDir,
    systemBusAddress: config.systemBusAddress,
    disk: config.updateDisk,
    mountInfoFile: config.mountInfoFile,
    kernelCmdlineFile: config.kernelCmdlineFile,
    updateConfFile: config.updateConfFile,
    osReleaseFiles: config.osReleaseFiles,
    defaultServer: config.updateServer,
    defaultChannel: config.updateChannel,
    signingKeyFiles: config.signingKeyFiles,
    downloadRetries: config.updateDownloadRetries,
    engineStallMs: config.updateEngineStallMs,
    // The device JWT from Piccolo central, sent as the bearer token to the update server.
    deviceToken: () => trust.deviceToken(),
    log: log.child({ area: "update" }),
  });
  ops.register(update.applyKind);
  ops.register(update.rollbackKind);
  // One block device inventory for the installer (targets) and storage (ListDisks, encryption).
  const inventory = createDiskInventory();
  const installer = createInstaller({
    inventory,
    verifier: update.verifier,
    downloadDir: join(config.stateDir, "installer", "downloads"),
    releaseSource: () => update.releaseSource(),
    downloadRetries: config.updateDownloadRetries,
    log: log.child({ area: "installer" }),
    imageDirs: config.installerImageDirs,
    fileTargetDirs: config.installerFileTargetDirs,
    minDiskBytes: config.installerMinDiskBytes,
    kernelCmdlineFile: config.kernelCmdlineFile,
    mountInfoFile: config.mountInfoFile,
    tpm2Device: config.tpm2Device,
    tpmDevices: config.tpmDevices,
  });
  ops.register(installer.kind);
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
  await trust.start();
  await update.init();
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
  let auth;
  try {
    auth = createAuth({ config, state: await authState, audit, log: log.child({ area: "auth" }) });
  } catch (e) {
    await audit.close();
    throw new StartupCheckError(`authentication cannot start: ${(e as Error).message}`);
  }
  const registry = createMethodRegistry();
  registry.add(SystemServiceService, createSystemService({ health, ops, osReleaseFiles: config.osReleaseFiles }), "system");
  registry.add(OperationsServiceService, createOperationsService(ops), "operations");
  registry.add(ContainerServiceService, createContainerService({ containers, ops }), "containers");
  registry.add(
    TaskServiceService,
    createTaskService({
      ops,
      runner: taskRunner,
      runnerDeps: taskRunnerDeps,
      agentServices: {
        containers,
        credentials,
        unitDir: config.agentUnitDir,
        dockerCli: config.agentDockerCli,
        dockerSocket: config.dockerSocket,
        systemBusAddress: config.systemBusAddress,
      },
      systemd: dbusSystemd(config.systemBusAddress),
    }),
    "tasks",
  );
  registry.add(TrustServiceService, createTrustService({ trust, ops }), "trust");
  registry.add(UpdateServiceService, createUpdateService({ update, ops }), "update");
  registry.add(InstallerServiceService, createInstallerService({ installer, ops }), "installer");
  registry.add(
    StorageServiceService,
    createStorageService({
      inventory,
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
  registry.add(AuthServiceService, auth.service, "auth");
  const interceptors = [auth.gate.interceptor, loggingInterceptor, auditInterceptor(audit)];

  const gate = auth.gate;
  const grpcServer: GrpcServer = createGrpcServer(registry, interceptors, log, {
    authenticate: gate.authenticate,
    reflectionGuard: async (c) => {
      await gate.authorize({
        method: "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        need: Role.ROLE_READER,
        transport: c.transport,
        actor: c.actor,
        authorization: c.metadata["authorization"],
      });
    },
  });
  const gateway: Gateway = createGateway(registry, interceptors, log.child({ area: "gateway" }), { tls: auth.tls, authenticate: gate.authenticate });
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
      const port = await grpcServer.bind(`${l.host.includes(":") ? `[${l.host}]` : l.host}:${l.port}`, auth.tls);
      grpcAddr = `${l.host.includes(":") ? `[${l.host}]` : l.host}:${port}`;
    }
    if (config.restListen) {
      const l = parseListen(config.restListen)!;
      const port = await gateway.listen(l.host, l.port);
      rest = `${auth.tls ? "https" : "http"}://${l.host.includes(":") ? `[${l.host}]` : l.host}:${port}`;
    }
  } catch (e) {
    for (const s of grpcServer.servers) s.forceShutdown();
    await gateway.close();
    await audit.close();
    throw new StartupCheckError(`cannot listen: ${(e as Error).message}`);
  }
  const endpoints: Endpoints = { socket, grpc: grpcAddr, rest, tlsFingerprint: auth.tls ? auth.keys.fingerprint : "", pid: process.pid };
  await writeAtomic(join(config.runtimeDir, "endpoints.json"), JSON.stringify(endpoints) + "\n");

  let stopped: Promise<void> | undefined;
  return {
    endpoints,
    ops,
    health,
    stop() {
      stopped ??= (async () => {
        log.info("stopping: journaling running operations");
        trust.close();
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
