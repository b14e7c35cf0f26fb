/**
 * The gRPC transport: one @grpc/grpc-js server on the unix socket and the TCP listener, serving
 * every registered service through the shared interceptors, plus the standard health checking
 * protocol (grpc.health.v1) and server reflection so generic gRPC tools work without .proto files.
 */
import * as grpc from "@grpc/grpc-js";
import type { Logger } from "pino";
import { Status } from "../../gen/google/rpc/status.js";
import { toRpcStatus } from "./errors.js";
import { addReflection, createHealthService, ServingStatus, type HealthState } from "./grpc-standard.js";
import { areaLoggers, clientGone, invoke, type CallContext, type Interceptor, type MethodEntry, type MethodRegistry, type StreamSink, type Transport } from "./rpc.js";

/**
 * The running gRPC servers: one for the unix socket and one for TCP, so a call's transport (and
 * so whether it is root's) comes from the listener it arrived on, never from its peer address.
 */
export interface GrpcServer {
  /** The unix socket's server. */
  readonly server: grpc.Server;
  /** Both servers. */
  readonly servers: readonly grpc.Server[];
  readonly health: HealthState;
  /** Binds "unix:/path" or "host:port" (with TLS when `tls` is given); resolves to the bound port (0 for unix). */
  bind(address: string, tls?: TlsIdentity): Promise<number>;
  /** Marks every service NOT_SERVING and stops accepting calls; waits for calls to end up to `graceMs`. */
  shutdown(graceMs: number): Promise<void>;
}

/** A TLS key and certificate (PEM). */
export interface TlsIdentity {
  readonly key: string;
  readonly cert: string;
}

/** Options of createGrpcServer. */
export interface GrpcServerOptions {
  /**
   * Checks a server reflection call before it is served (reflection lists the whole API, so it
   * needs a token on TCP); throws the denial.
   */
  readonly reflectionGuard?: ReflectionGuard;
  /**
   * Authenticates a call before its request is even decoded (sets ctx.principal or throws the
   * denial), so a caller without the right token learns nothing from how its input is judged.
   */
  readonly authenticate?: (ctx: CallContext) => Promise<void> | undefined;
}

/** Throws when a reflection call may not go on; `unix` tells the unix socket from TCP. */
export type ReflectionGuard = (call: { readonly metadata: Record<string, string>; readonly transport: Transport; readonly actor: string }) => Promise<void>;

/** Turns any thrown value into a grpc-js status with the rich status in grpc-status-details-bin. */
export function toServiceError(err: unknown): grpc.StatusObject & Error {
  const st = toRpcStatus(err);
  const metadata = new grpc.Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(Status.encode(st.status).finish()));
  return Object.assign(new Error(st.message), { code: st.code, details: st.message, metadata });
}

const asBuffer = (u: Uint8Array): Buffer => (Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength));

const headerRecord = (md: grpc.Metadata): Record<string, string> => {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(md.getMap())) out[k] = typeof v === "string" ? v : v.toString("base64");
  return out;
};

/** Creates the gRPC server for the registered services. */
export function createGrpcServer(registry: MethodRegistry, interceptors: readonly Interceptor[], log: Logger, options: GrpcServerOptions = {}): GrpcServer {
  const logOf = areaLoggers(log);
  const authenticate = options.authenticate;
  const health = createHealthService(registry.services);
  const unixServer = build("grpc-unix");
  const tcpServer = build("grpc-tcp");
  const servers = [unixServer, tcpServer];

  function build(transport: Transport): grpc.Server {
    const server = new grpc.Server({
      "grpc.max_receive_message_length": 4 * 1024 * 1024,
      "grpc.keepalive_time_ms": 60_000,
    });
    const actorOf = (call: { getPeer(): string }): string =>
      transport === "grpc-unix" ? `unix:uid=${process.getuid?.() ?? "?"}` : `tcp:${call.getPeer().replace(/^ipv[46]:/, "")}`;

    const context = (entry: MethodEntry, call: grpc.ServerUnaryCall<Buffer, Buffer> | grpc.ServerWritableStream<Buffer, Buffer>, signal: AbortSignal): CallContext => ({
      method: entry,
      actor: actorOf(call),
      transport,
      signal,
      metadata: headerRecord(call.metadata),
      log: logOf(entry.area),
    });

    for (const [, def] of registry.definitions) {
      const rawDef: Record<string, grpc.MethodDefinition<Buffer, Buffer>> = {};
      const impl: grpc.UntypedServiceImplementation = {};
      for (const [key, d] of Object.entries(def)) {
        const entry = registry.methods.get(d.path)!;
        // Requests are decoded by the handler so a malformed frame is INVALID_ARGUMENT, not INTERNAL.
        rawDef[key] = {
          path: d.path,
          requestStream: false,
          responseStream: d.responseStream,
          requestDeserialize: (b: Buffer) => b,
          requestSerialize: (b: Buffer) => b,
          responseSerialize: (b: Buffer) => b,
          responseDeserialize: (b: Buffer) => b,
          originalName: key,
        };
        if (!entry.serverStreaming) {
          impl[key] = ((call: grpc.ServerUnaryCall<Buffer, Buffer>, callback: grpc.sendUnaryData<Buffer>) => {
            // grpc-js emits "cancelled" whenever the stream closes, also after a normal answer;
            // aborting then would only cost time, so the listener goes before the answer does.
            const ac = new AbortController();
            const onCancel = (): void => ac.abort();
            call.once("cancelled", onCancel);
            const answer: grpc.sendUnaryData<Buffer> = (err, bytes) => {
              call.removeListener("cancelled", onCancel);
              callback(err, bytes);
            };
            const ctx = context(entry, call, ac.signal);
            const go = (): void => {
              let request: unknown;
              try {
                request = entry.decode(call.request);
              } catch (e) {
                answer(toServiceError(e));
                return;
              }
              invoke(interceptors, ctx, request)
                .then((res) => asBuffer(entry.encode(res)))
                .then(
                  (bytes) => answer(null, bytes),
                  (err: unknown) => answer(toServiceError(err)),
                );
            };
            let pending: Promise<void> | undefined;
            try {
              pending = authenticate?.(ctx);
            } catch (err) {
              answer(toServiceError(err));
              return;
            }
            if (pending) pending.then(go, (err: unknown) => answer(toServiceError(err)));
            else go();
          }) as grpc.handleUnaryCall<Buffer, Buffer>;
        } else {
          impl[key] = ((call: grpc.ServerWritableStream<Buffer, Buffer>) => {
            const ac = new AbortController();
            let ended = false;
            const onGone = (): void => {
              if (!ended) ac.abort();
            };
            call.once("cancelled", onGone);
            call.once("close", onGone);
            const ctx = context(entry, call, ac.signal);
            const go = (): void => {
              let request: unknown;
              try {
                request = entry.decode(call.request);
              } catch (e) {
                call.emit("error", toServiceError(e));
                return;
              }
              const sink: StreamSink<unknown> = {
                send(message) {
                  return new Promise((resolve, reject) => {
                    if (ac.signal.aborted) {
                      reject(clientGone());
                      return;
                    }
                    if (call.write(asBuffer(entry.encode(message)))) {
                      resolve();
                      return;
                    }
                    const onAbort = (): void => {
                      call.removeListener("drain", onDrain);
                      reject(clientGone());
                    };
                    const onDrain = (): void => {
                      ac.signal.removeEventListener("abort", onAbort);
                      resolve();
                    };
                    call.once("drain", onDrain);
                    ac.signal.addEventListener("abort", onAbort, { once: true });
                  });
                },
              };
              invoke(interceptors, ctx, request, sink).then(
                () => {
                  ended = true;
                  call.end();
                },
                (err: unknown) => {
                  if (!ac.signal.aborted) call.emit("error", toServiceError(err));
                },
              );
            };
            const fail = (err: unknown): void => {
              if (!ac.signal.aborted) call.emit("error", toServiceError(err));
            };
            let pending: Promise<void> | undefined;
            try {
              pending = authenticate?.(ctx);
            } catch (err) {
              fail(err);
              return;
            }
            if (pending) pending.then(go, fail);
            else go();
          }) as grpc.handleServerStreamingCall<Buffer, Buffer>;
        }
      }
      server.addService(rawDef, impl);
    }

    health.addToServer(server);
    const guard = options.reflectionGuard;
    addReflection(
      server,
      registry.services,
      guard ? (call) => guard({ metadata: headerRecord(call.metadata), transport, actor: actorOf(call) }) : undefined,
      (err) => toServiceError(err),
    );
    return server;
  }

  return {
    server: unixServer,
    servers,
    health,
    bind(address, tls) {
      const server = address.startsWith("unix:") ? unixServer : tcpServer;
      const creds = tls
        ? grpc.ServerCredentials.createSsl(null, [{ private_key: Buffer.from(tls.key), cert_chain: Buffer.from(tls.cert) }], false)
        : grpc.ServerCredentials.createInsecure();
      return new Promise((resolve, reject) => {
        server.bindAsync(address, creds, (err, port) => (err ? reject(err) : resolve(port)));
      });
    },
    async shutdown(graceMs) {
      health.set("", ServingStatus.NOT_SERVING);
      for (const s of registry.services) health.set(s, ServingStatus.NOT_SERVING);
      await Promise.all(
        servers.map(
          (server) =>
            new Promise<void>((resolve) => {
              const t = setTimeout(() => {
                server.forceShutdown();
                resolve();
              }, graceMs);
              server.tryShutdown(() => {
                clearTimeout(t);
                resolve();
              });
            }),
        ),
      );
    },
  };
}
