/**
 * One small client surface for the CLI over either transport: gRPC (unix socket or host:port)
 * through the typed promise clients, or REST (http://host:port) through the generated REST
 * clients. Deadlines come from --timeout. TCP endpoints are TLS, pinned to the daemon's own
 * certificate, with a bearer token (resolveApiOptions() says where each comes from).
 */
import { readFile } from "node:fs/promises";
import { AuthServiceService } from "../../../gen/piccolo/auth/v1/auth.js";
import type {
  ListOperationsRequest,
  ListOperationsResponse,
  Operation,
  OperationEvent,
} from "../../../gen/piccolo/operations/v1/operations.js";
import type {
  BuildImageRequest,
  Container,
  ContainerEvent,
  ContainerStats,
  CreateContainerRequest,
  EnsureRunningRequest,
  EnsureRunningResponse,
  GetContainerRequest,
  GetStatsRequest,
  ImportImageRequest,
  ListContainersRequest,
  ListContainersResponse,
  ListImagesRequest,
  ListImagesResponse,
  LogEntry,
  PullImageRequest,
  RemoveContainerRequest,
  RemoveContainerResponse,
  RemoveImageRequest,
  RemoveImageResponse,
  RestartContainerRequest,
  StartContainerRequest,
  StopContainerRequest,
  StreamLogsRequest,
  WatchEventsRequest,
} from "../../../gen/piccolo/containers/v1/containers.js";
import type { GetHealthResponse, GetVersionResponse, RunDiagnosticsRequest } from "../../../gen/piccolo/system/v1/system.js";
import { BackupServiceService } from "../../../gen/piccolo/backup/v1/backup.js";
import { InstallerServiceService } from "../../../gen/piccolo/installer/v1/installer.js";
import { NetworkServiceService } from "../../../gen/piccolo/network/v1/network.js";
import { StorageServiceService } from "../../../gen/piccolo/storage/v1/storage.js";
import { TaskServiceService } from "../../../gen/piccolo/tasks/v1/tasks.js";
import { TrustServiceService } from "../../../gen/piccolo/trust/v1/trust.js";
import { UpdateServiceService } from "../../../gen/piccolo/update/v1/update.js";
import { createGrpcClients, grpcTarget, type PiccoloGrpcClients } from "../grpc-client.js";
import { createRestClients, type PiccoloRestClients } from "../rest-clients.js";
import { createPinnedFetch, resolveTrust } from "../tls.js";
import type { OpenWatch } from "../watch.js";
import { UsageError } from "./errors.js";

/** Default deadline of unary calls in ms. */
export const DEFAULT_UNARY_TIMEOUT_MS = 30_000;

/** How to reach the daemon. */
export interface ApiOptions {
  /** unix:///path.sock, host:port (gRPC) or http(s)://host:port (REST gateway). */
  readonly endpoint: string;
  /** Bearer token. */
  readonly token?: string;
  /** Deadline of each call in ms; unary calls default to 30 s, streams to none. 0 for none. */
  readonly timeoutMs?: number;
  /** TCP with TLS: the daemon's certificate (PEM) to pin. */
  readonly ca?: string;
  /** Its SHA-256 fingerprint (defaults to that of `ca`). */
  readonly fingerprint?: string;
  /** gRPC over TCP without TLS (a daemon with the development switch insecurePlaintext). */
  readonly plaintext?: boolean;
}

/** Where the daemon keeps its TLS certificate on its own host (readable by root). */
export const DEFAULT_CERT_FILE = "/var/lib/piccolod/tls/cert.pem";

/** What the command line and environment say about reaching the daemon. */
export interface ConnectionFlags {
  readonly endpoint: string;
  /** --token / $PICCOLO_TOKEN. */
  readonly token?: string;
  /** --token-file / $PICCOLO_TOKEN_FILE: a file holding the token. */
  readonly tokenFile?: string;
  /** --tls-fingerprint / $PICCOLO_TLS_FINGERPRINT. */
  readonly tlsFingerprint?: string;
  /** --tls-ca / $PICCOLO_TLS_CA: the daemon's certificate (PEM file). */
  readonly tlsCa?: string;
  /** --plaintext / $PICCOLO_PLAINTEXT=1. */
  readonly plaintext?: boolean;
  readonly timeout?: number;
}

/**
 * Resolves how to connect: the token (flag, then file); for TCP, the certificate to pin from
 * --tls-ca, or fetched from the daemon and checked against --tls-fingerprint, or the daemon's
 * own certificate file when it runs on this host. The unix socket needs neither.
 */
export async function resolveApiOptions(f: ConnectionFlags, defaultCertFile = DEFAULT_CERT_FILE): Promise<ApiOptions> {
  validateEndpoint(f.endpoint);
  let token = f.token || undefined;
  if (!token && f.tokenFile) {
    try {
      token = (await readFile(f.tokenFile, "utf8")).trim();
    } catch (e) {
      throw new UsageError(`--token-file ${f.tokenFile}: ${(e as Error).message}`);
    }
  }
  const base = { endpoint: f.endpoint, token, timeoutMs: f.timeout };
  const rest = isRestEndpoint(f.endpoint);
  if (!rest && grpcTarget(f.endpoint).startsWith("unix:")) return base;
  if (rest ? /^http:/i.test(f.endpoint) : f.plaintext) return { ...base, plaintext: true };
  let ca: string | undefined;
  if (f.tlsCa) {
    try {
      ca = await readFile(f.tlsCa, "utf8");
    } catch (e) {
      throw new UsageError(`--tls-ca ${f.tlsCa}: ${(e as Error).message}`);
    }
  } else if (!f.tlsFingerprint) {
    ca = await readFile(defaultCertFile, "utf8").catch(() => undefined);
    if (ca === undefined) {
      throw new UsageError(
        `cannot trust the TLS certificate of ${f.endpoint}: pass --tls-fingerprint (or $PICCOLO_TLS_FINGERPRINT) with the fingerprint ` +
          "`piccoloctl auth fingerprint` shows on the daemon's host, or --tls-ca with its certificate file",
      );
    }
  }
  let trust;
  try {
    trust = await resolveTrust(f.endpoint, { ca, fingerprint: f.tlsFingerprint });
  } catch (e) {
    if ((e as { code?: unknown }).code === "ERR_TLS_CERT_PINNING" || /fingerprint/.test((e as Error).message)) {
      throw new UsageError(`${(e as Error).message}: this is not the daemon you pinned (or its keys were renewed); check the fingerprint on its host`);
    }
    if (/^TLS fingerprint/.test((e as Error).message)) throw new UsageError(`--tls-fingerprint: ${(e as Error).message}`);
    // A daemon that is not there: reported like any failed connection (errors.ts).
    if (typeof (e as { code?: unknown }).code === "string") throw new TypeError("fetch failed", { cause: e });
    throw e;
  }
  return { ...base, ca: trust.ca, fingerprint: trust.fingerprint };
}

/** The ContainerService calls piccoloctl makes; streams end when `signal` aborts. */
export interface ContainersApi {
  listContainers(request: ListContainersRequest): Promise<ListContainersResponse>;
  getContainer(request: GetContainerRequest): Promise<Container>;
  createContainer(request: CreateContainerRequest): Promise<Container>;
  startContainer(request: StartContainerRequest): Promise<Container>;
  stopContainer(request: StopContainerRequest): Promise<Container>;
  restartContainer(request: RestartContainerRequest): Promise<Container>;
  removeContainer(request: RemoveContainerRequest): Promise<RemoveContainerResponse>;
  ensureRunning(request: EnsureRunningRequest): Promise<EnsureRunningResponse>;
  streamLogs(request: StreamLogsRequest, signal: AbortSignal): AsyncIterable<LogEntry>;
  getStats(request: GetStatsRequest, signal: AbortSignal): AsyncIterable<ContainerStats>;
  watchEvents(request: WatchEventsRequest, signal: AbortSignal): AsyncIterable<ContainerEvent>;
  listImages(request: ListImagesRequest): Promise<ListImagesResponse>;
  /** Starts a containers.image_pull operation and streams its events. */
  pullImage(request: PullImageRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  /** Starts a containers.image_import operation and streams its events. */
  importImage(request: ImportImageRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  /** Starts a containers.image_build operation and streams its events. */
  buildImage(request: BuildImageRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  removeImage(request: RemoveImageRequest): Promise<RemoveImageResponse>;
}

/** A service client reduced to what the CLI calls: unary methods, and streams taking the command's signal. */
export type CliService<D> = {
  [K in keyof D]: D[K] extends { responseStream: true; requestSerialize: (v: infer Req) => Buffer; responseDeserialize: (b: Buffer) => infer Res }
    ? (request: Req, signal: AbortSignal) => AsyncIterable<Res>
    : D[K] extends { requestSerialize: (v: infer Req) => Buffer; responseDeserialize: (b: Buffer) => infer Res }
      ? (request: Req) => Promise<Res>
      : never;
};

/** Binds every method of a generated client (gRPC promise client or REST client) for the CLI. */
function bindService<D extends Record<string, { responseStream: boolean }>>(
  definition: D,
  call: (method: string, request: unknown, stream: boolean, signal: AbortSignal | undefined) => unknown,
): CliService<D> {
  const out: Record<string, unknown> = {};
  for (const [key, def] of Object.entries(definition)) {
    out[key] = def.responseStream ? (r: unknown, signal: AbortSignal) => call(key, r, true, signal) : (r: unknown) => call(key, r, false, undefined);
  }
  return out as CliService<D>;
}

/** The calls piccoloctl makes. */
export interface PiccoloApi {
  /** "grpc" or "rest". */
  readonly transport: "grpc" | "rest";
  getVersion(): Promise<GetVersionResponse>;
  getHealth(): Promise<GetHealthResponse>;
  /** Starts a system.diagnostics operation and streams its events. */
  runDiagnostics(request: RunDiagnosticsRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  getOperation(id: string): Promise<Operation>;
  listOperations(request: ListOperationsRequest): Promise<ListOperationsResponse>;
  /** Opens one WatchOperation stream (for watchOperation()). */
  readonly watchOperation: OpenWatch;
  cancelOperation(id: string): Promise<Operation>;
  /** ContainerService. */
  readonly containers: ContainersApi;
  /** TaskService. */
  readonly tasks: CliService<typeof TaskServiceService>;
  /** UpdateService. */
  readonly update: CliService<typeof UpdateServiceService>;
  /** AuthService. */
  readonly auth: CliService<typeof AuthServiceService>;
  /** StorageService. */
  readonly storage: CliService<typeof StorageServiceService>;
  /** NetworkService. */
  readonly network: CliService<typeof NetworkServiceService>;
  /** BackupService. */
  readonly backup: CliService<typeof BackupServiceService>;
  /** InstallerService. */
  readonly installer: CliService<typeof InstallerServiceService>;
  /** TrustService. */
  readonly trust: CliService<typeof TrustServiceService>;
  /** Releases the connection. */
  close(): void;
}

/** Whether the endpoint names the REST gateway. */
export function isRestEndpoint(endpoint: string): boolean {
  return /^https?:\/\//i.test(endpoint);
}

/** Checks an endpoint's form; throws UsageError when it is neither gRPC nor REST. */
export function validateEndpoint(endpoint: string): void {
  if (isRestEndpoint(endpoint)) {
    try {
      new URL(endpoint);
    } catch {
      throw new UsageError(`--endpoint ${JSON.stringify(endpoint)}: not a valid URL`);
    }
    return;
  }
  try {
    grpcTarget(endpoint);
  } catch (e) {
    throw new UsageError(`--endpoint: ${(e as Error).message}, or http://host:port for the REST gateway`);
  }
}

/** Combines an optional caller signal with an optional deadline. */
function withDeadline(signal: AbortSignal | undefined, timeoutMs: number | undefined): AbortSignal | undefined {
  const t = timeoutMs && timeoutMs > 0 ? AbortSignal.timeout(timeoutMs) : undefined;
  if (signal && t) return AbortSignal.any([signal, t]);
  return signal ?? t;
}

/**
 * The deadline of a stop or restart: the grace period (default 10 s) plus 30 s, at least the
 * unary deadline; 0 (none) stays 0.
 */
function stopDeadline(unaryMs: number, graceSeconds: number | undefined): number {
  return unaryMs > 0 ? Math.max(unaryMs, ((graceSeconds ?? 10) + 30) * 1000) : 0;
}

/** Connects to the daemon at `options.endpoint`. Nothing is sent until the first call. */
export function connectApi(options: ApiOptions): PiccoloApi {
  validateEndpoint(options.endpoint);
  const unaryMs = options.timeoutMs ?? DEFAULT_UNARY_TIMEOUT_MS;
  const streamMs = options.timeoutMs ?? 0;
  if (isRestEndpoint(options.endpoint)) {
    const c = createRestClients({
      baseUrl: options.endpoint,
      token: options.token,
      ...(options.ca ? { fetch: createPinnedFetch({ ca: options.ca, fingerprint: options.fingerprint }) } : {}),
    });
    const unary = () => ({ signal: withDeadline(undefined, unaryMs) });
    return {
      transport: "rest",
      getVersion: () => c.system.getVersion({}, unary()),
      getHealth: () => c.system.getHealth({}, unary()),
      runDiagnostics: (request, signal) => c.system.runDiagnostics(request, { signal: withDeadline(signal, streamMs) }),
      getOperation: (id) => c.operations.getOperation({ id }, unary()),
      listOperations: (request) => c.operations.listOperations(request, unary()),
      watchOperation: (id, afterSequence, signal) =>
        c.operations.watchOperation({ id, afterSequence }, { signal: withDeadline(signal, streamMs) }),
      cancelOperation: (id) => c.operations.cancelOperation({ id }, unary()),
      containers: {
        listContainers: (r) => c.containers.listContainers(r, unary()),
        getContainer: (r) => c.containers.getContainer(r, unary()),
        createContainer: (r) => c.containers.createContainer(r, unary()),
        startContainer: (r) => c.containers.startContainer(r, unary()),
        stopContainer: (r) =>
          c.containers.stopContainer(r, { signal: withDeadline(undefined, stopDeadline(unaryMs, r.gracePeriodSeconds)) }),
        restartContainer: (r) =>
          c.containers.restartContainer(r, { signal: withDeadline(undefined, stopDeadline(unaryMs, r.gracePeriodSeconds)) }),
        removeContainer: (r) => c.containers.removeContainer(r, unary()),
        ensureRunning: (r) => c.containers.ensureRunning(r, unary()),
        streamLogs: (r, signal) => c.containers.streamLogs(r, { signal: withDeadline(signal, streamMs) }),
        getStats: (r, signal) => c.containers.getStats(r, { signal: withDeadline(signal, streamMs) }),
        watchEvents: (r, signal) => c.containers.watchEvents(r, { signal: withDeadline(signal, streamMs) }),
        listImages: (r) => c.containers.listImages(r, unary()),
        pullImage: (r, signal) => c.containers.pullImage(r, { signal: withDeadline(signal, streamMs) }),
        importImage: (r, signal) => c.containers.importImage(r, { signal: withDeadline(signal, streamMs) }),
        buildImage: (r, signal) => c.containers.buildImage(r, { signal: withDeadline(signal, streamMs) }),
        removeImage: (r) => c.containers.removeImage(r, unary()),
      },
      ...restAreas(c, unaryMs, streamMs),
      close: () => undefined,
    };
  }
  const c = createGrpcClients({
    endpoint: options.endpoint,
    token: options.token,
    timeoutMs: unaryMs,
    ca: options.ca,
    fingerprint: options.fingerprint,
    plaintext: options.plaintext,
  });
  return {
    transport: "grpc",
    getVersion: () => c.system.getVersion({}),
    getHealth: () => c.system.getHealth({}),
    runDiagnostics: (request, signal) => c.system.runDiagnostics(request, { signal, timeoutMs: streamMs }),
    getOperation: (id) => c.operations.getOperation({ id }),
    listOperations: (request) => c.operations.listOperations(request),
    watchOperation: (id, afterSequence, signal) => c.operations.watchOperation({ id, afterSequence }, { signal, timeoutMs: streamMs }),
    cancelOperation: (id) => c.operations.cancelOperation({ id }),
    containers: {
      listContainers: (r) => c.containers.listContainers(r),
      getContainer: (r) => c.containers.getContainer(r),
      createContainer: (r) => c.containers.createContainer(r),
      startContainer: (r) => c.containers.startContainer(r),
      stopContainer: (r) => c.containers.stopContainer(r, { timeoutMs: stopDeadline(unaryMs, r.gracePeriodSeconds) }),
      restartContainer: (r) => c.containers.restartContainer(r, { timeoutMs: stopDeadline(unaryMs, r.gracePeriodSeconds) }),
      removeContainer: (r) => c.containers.removeContainer(r),
      ensureRunning: (r) => c.containers.ensureRunning(r),
      streamLogs: (r, signal) => c.containers.streamLogs(r, { signal, timeoutMs: streamMs }),
      getStats: (r, signal) => c.containers.getStats(r, { signal, timeoutMs: streamMs }),
      watchEvents: (r, signal) => c.containers.watchEvents(r, { signal, timeoutMs: streamMs }),
      listImages: (r) => c.containers.listImages(r),
      pullImage: (r, signal) => c.containers.pullImage(r, { signal, timeoutMs: streamMs }),
      importImage: (r, signal) => c.containers.importImage(r, { signal, timeoutMs: streamMs }),
      buildImage: (r, signal) => c.containers.buildImage(r, { signal, timeoutMs: streamMs }),
      removeImage: (r) => c.containers.removeImage(r),
    },
    ...grpcAreas(c, streamMs),
    close: () => c.close(),
  };
}

/** Services the CLI reaches through the generic binding (every method, either transport). */
const AREAS = {
  tasks: TaskServiceService,
  update: UpdateServiceService,
  auth: AuthServiceService,
  storage: StorageServiceService,
  network: NetworkServiceService,
  backup: BackupServiceService,
  installer: InstallerServiceService,
  trust: TrustServiceService,
} as const;
type AreaKey = keyof typeof AREAS;
type Method = (request: unknown, options: unknown) => unknown;

/** Every area of AREAS bound with `bind`. */
function bindAll(bind: <K extends AreaKey>(k: K) => PiccoloApi[K]): Pick<PiccoloApi, AreaKey> {
  return Object.fromEntries((Object.keys(AREAS) as AreaKey[]).map((k) => [k, bind(k)])) as Pick<PiccoloApi, AreaKey>;
}

/** The generically bound services over REST. */
function restAreas(c: PiccoloRestClients, unaryMs: number, streamMs: number): Pick<PiccoloApi, AreaKey> {
  const bind = <K extends AreaKey>(k: K): PiccoloApi[K] =>
    bindService(AREAS[k], (m, r, stream, signal) =>
      ((c[k] as unknown as Record<string, Method>)[m]!).call(c[k], r, { signal: withDeadline(signal, stream ? streamMs : unaryMs) }),
    ) as unknown as PiccoloApi[K];
  return bindAll(bind);
}

/** The generically bound services over gRPC. */
function grpcAreas(c: PiccoloGrpcClients, streamMs: number): Pick<PiccoloApi, AreaKey> {
  const bind = <K extends AreaKey>(k: K): PiccoloApi[K] =>
    bindService(AREAS[k], (m, r, stream, signal) =>
      ((c[k] as unknown as Record<string, Method>)[m]!)(r, stream ? { signal, timeoutMs: streamMs } : {}),
    ) as unknown as PiccoloApi[K];
  return bindAll(bind);
}
