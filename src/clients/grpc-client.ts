/**
 * Typed gRPC clients for piccolod over a unix socket or TCP: promise-returning unary methods and
 * async-iterable server streams, typed from the ts-proto service definitions, with deadlines and
 * a bearer token. TCP is TLS, pinned to the daemon's own certificate (see tls.ts).
 */
import * as grpc from "@grpc/grpc-js";
import { AuthServiceService } from "../../gen/piccolo/auth/v1/auth.js";
import { ContainerServiceService } from "../../gen/piccolo/containers/v1/containers.js";
import { InstallerServiceService } from "../../gen/piccolo/installer/v1/installer.js";
import { BackupServiceService } from "../../gen/piccolo/backup/v1/backup.js";
import { NetworkServiceService } from "../../gen/piccolo/network/v1/network.js";
import { OperationsServiceService } from "../../gen/piccolo/operations/v1/operations.js";
import { StorageServiceService } from "../../gen/piccolo/storage/v1/storage.js";
import { SystemServiceService } from "../../gen/piccolo/system/v1/system.js";
import { TaskServiceService } from "../../gen/piccolo/tasks/v1/tasks.js";
import { TrustServiceService } from "../../gen/piccolo/trust/v1/trust.js";
import { UpdateServiceService } from "../../gen/piccolo/update/v1/update.js";
import { pemFingerprint, pinnedIdentity } from "./tls.js";

/** The shape of a ts-proto grpc-js service definition entry. */
interface DefEntry {
  readonly path: string;
  readonly requestStream: boolean;
  readonly responseStream: boolean;
  readonly requestSerialize: (v: never) => Buffer;
  readonly responseDeserialize: (b: Buffer) => unknown;
}

/** Per-call options. */
export interface GrpcCallOptions {
  /** Milliseconds until the call fails with DEADLINE_EXCEEDED; overrides the client default. 0 for none. */
  readonly timeoutMs?: number;
  /** Aborts the call (CANCELLED). */
  readonly signal?: AbortSignal;
}

/** A promise client for one service definition. */
export type PromiseClient<D> = {
  [K in keyof D]: D[K] extends {
    responseStream: true;
    requestSerialize: (v: infer Req) => Buffer;
    responseDeserialize: (b: Buffer) => infer Res;
  }
    ? (request: Req, options?: GrpcCallOptions) => AsyncIterable<Res>
    : D[K] extends { requestSerialize: (v: infer Req) => Buffer; responseDeserialize: (b: Buffer) => infer Res }
      ? (request: Req, options?: GrpcCallOptions) => Promise<Res>
      : never;
};

/** Options of createGrpcClients. */
export interface GrpcClientOptions {
  /** "unix:///run/piccolod/piccolod.sock", "unix:/path" or "host:port". */
  readonly endpoint: string;
  /** Bearer token sent as `authorization` metadata. */
  readonly token?: string;
  /** Default deadline of unary calls in ms (streams have none unless given per call). Default 30 s. */
  readonly timeoutMs?: number;
  /**
   * TCP: the daemon's TLS certificate (PEM) to trust; only that certificate is accepted (see
   * resolveTrust() in tls.ts to get it from a fingerprint).
   */
  readonly ca?: string;
  /** TCP: the SHA-256 fingerprint the certificate must have (defaults to that of `ca`). */
  readonly fingerprint?: string;
  /** TCP without TLS, for a daemon run with the development switch insecurePlaintext. */
  readonly plaintext?: boolean;
}

/** The channel credentials for an endpoint: none on a unix socket or with `plaintext`, else TLS pinned to `ca`. */
export function channelCredentials(options: Pick<GrpcClientOptions, "endpoint" | "ca" | "fingerprint" | "plaintext">): grpc.ChannelCredentials {
  if (grpcTarget(options.endpoint).startsWith("unix:") || options.plaintext) return grpc.credentials.createInsecure();
  const fp = options.fingerprint ?? (options.ca ? pemFingerprint(options.ca) : undefined);
  return grpc.credentials.createSsl(options.ca ? Buffer.from(options.ca) : null, null, null, fp ? { checkServerIdentity: pinnedIdentity(fp) } : {});
}

/** Cancels the call when the signal aborts, at once if it already has. */
function cancelOnAbort(signal: AbortSignal | undefined, call: { cancel(): void }): void {
  if (signal?.aborted) call.cancel();
  else signal?.addEventListener("abort", () => call.cancel(), { once: true });
}

/** Turns a CLI/config endpoint into a grpc-js target. */
export function grpcTarget(endpoint: string): string {
  if (endpoint.startsWith("unix://")) return `unix:${endpoint.slice("unix://".length)}`;
  if (endpoint.startsWith("unix:")) return endpoint;
  if (endpoint.startsWith("/")) return `unix:${endpoint}`;
  if (/^[^/]+:\d+$/.test(endpoint) || /^\[[^\]]+\]:\d+$/.test(endpoint)) return endpoint;
  throw new Error(`endpoint ${JSON.stringify(endpoint)}: expected unix:///path/to.sock or host:port`);
}

/** Creates a promise client for one ts-proto service definition over an existing channel. */
export function createPromiseClient<D extends Record<string, DefEntry>>(
  client: grpc.Client,
  definition: D,
  options: Pick<GrpcClientOptions, "token" | "timeoutMs"> = {},
): PromiseClient<D> {
  const out: Record<string, unknown> = {};
  const metadata = (): grpc.Metadata => {
    const md = new grpc.Metadata();
    if (options.token) md.set("authorization", `Bearer ${options.token}`);
    return md;
  };
  for (const [key, def] of Object.entries(definition)) {
    const serialize = def.requestSerialize as (v: unknown) => Buffer;
    if (!def.responseStream) {
      out[key] = (request: unknown, o: GrpcCallOptions = {}) =>
        new Promise((resolve, reject) => {
          const timeout = o.timeoutMs ?? options.timeoutMs ?? 30_000;
          const call = client.makeUnaryRequest(
            def.path,
            serialize,
            def.responseDeserialize,
            request,
            metadata(),
            timeout > 0 ? { deadline: Date.now() + timeout } : {},
            (err, res) => (err ? reject(err) : resolve(res)),
          );
          cancelOnAbort(o.signal, call);
        });
    } else {
      out[key] = (request: unknown, o: GrpcCallOptions = {}) => {
        const timeout = o.timeoutMs ?? 0;
        const call = client.makeServerStreamRequest(
          def.path,
          serialize,
          def.responseDeserialize,
          request,
          metadata(),
          timeout > 0 ? { deadline: Date.now() + timeout } : {},
        );
        cancelOnAbort(o.signal, call);
        return {
          async *[Symbol.asyncIterator]() {
            try {
              for await (const m of call) yield m;
            } finally {
              call.cancel();
            }
          },
        };
      };
    }
  }
  return out as PromiseClient<D>;
}

/** The clients for every piccolod service, sharing one channel. */
export interface PiccoloGrpcClients {
  readonly auth: PromiseClient<typeof AuthServiceService>;
  readonly system: PromiseClient<typeof SystemServiceService>;
  readonly operations: PromiseClient<typeof OperationsServiceService>;
  readonly containers: PromiseClient<typeof ContainerServiceService>;
  readonly tasks: PromiseClient<typeof TaskServiceService>;
  readonly trust: PromiseClient<typeof TrustServiceService>;
  readonly update: PromiseClient<typeof UpdateServiceService>;
  readonly installer: PromiseClient<typeof InstallerServiceService>;
  readonly storage: PromiseClient<typeof StorageServiceService>;
  readonly network: PromiseClient<typeof NetworkServiceService>;
  readonly backup: PromiseClient<typeof BackupServiceService>;
  /** The underlying channel, for services not listed here (e.g. grpc.health.v1). */
  readonly channel: grpc.Client;
  close(): void;
}

/** Connects to piccolod. Nothing is sent until the first call. */
export function createGrpcClients(options: GrpcClientOptions): PiccoloGrpcClients {
  const target = grpcTarget(options.endpoint);
  const tls = !target.startsWith("unix:") && !options.plaintext;
  const channel = new grpc.Client(target, channelCredentials(options), {
    "grpc.max_receive_message_length": 16 * 1024 * 1024,
    // The certificate is pinned, so the name checked does not matter; an IP address as TLS
    // server name (SNI) is not allowed (RFC 6066) and makes Node warn.
    ...(tls && /^(\[[^\]]*\]|[\d.]+):\d+$/.test(target) ? { "grpc.ssl_target_name_override": "localhost" } : {}),
  });
  return {
    auth: createPromiseClient(channel, AuthServiceService, options),
    system: createPromiseClient(channel, SystemServiceService, options),
    operations: createPromiseClient(channel, OperationsServiceService, options),
    containers: createPromiseClient(channel, ContainerServiceService, options),
    tasks: createPromiseClient(channel, TaskServiceService, options),
    trust: createPromiseClient(channel, TrustServiceService, options),
    update: createPromiseClient(channel, UpdateServiceService, options),
    installer: createPromiseClient(channel, InstallerServiceService, options),
    storage: createPromiseClient(channel, StorageServiceService, options),
    network: createPromiseClient(channel, NetworkServiceService, options),
    backup: createPromiseClient(channel, BackupServiceService, options),
    channel,
    close: () => channel.close(),
  };
}
