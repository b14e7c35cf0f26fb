/**
 * One small client surface for the CLI over either transport: gRPC (unix socket or host:port)
 * through the typed promise clients, or REST (http://host:port) through the generated REST
 * clients. Deadlines come from --timeout.
 */
import type {
  ListOperationsRequest,
  ListOperationsResponse,
  Operation,
  OperationEvent,
} from "../../../gen/piccolo/operations/v1/operations.js";
import type { GetHealthResponse, GetVersionResponse, RunDiagnosticsRequest } from "../../../gen/piccolo/system/v1/system.js";
import { createGrpcClients, grpcTarget } from "../grpc-client.js";
import { createRestClients } from "../rest-clients.js";
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

/** Connects to the daemon at `options.endpoint`. Nothing is sent until the first call. */
export function connectApi(options: ApiOptions): PiccoloApi {
  validateEndpoint(options.endpoint);
  const unaryMs = options.timeoutMs ?? DEFAULT_UNARY_TIMEOUT_MS;
  const streamMs = options.timeoutMs ?? 0;
  if (isRestEndpoint(options.endpoint)) {
    const c = createRestClients({ baseUrl: options.endpoint, token: options.token });
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
      close: () => undefined,
    };
  }
  const c = createGrpcClients({ endpoint: options.endpoint, token: options.token, timeoutMs: unaryMs });
  return {
    transport: "grpc",
    getVersion: () => c.system.getVersion({}),
    getHealth: () => c.system.getHealth({}),
    runDiagnostics: (request, signal) => c.system.runDiagnostics(request, { signal, timeoutMs: streamMs }),
    getOperation: (id) => c.operations.getOperation({ id }),
    listOperations: (request) => c.operations.listOperations(request),
    watchOperation: (id, afterSequence, signal) => c.operations.watchOperation({ id, afterSequence }, { signal, timeoutMs: streamMs }),
    cancelOperation: (id) => c.operations.cancelOperation({ id }),
    close: () => c.close(),
  };
}
