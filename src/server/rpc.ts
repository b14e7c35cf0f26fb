/**
 * The transport-neutral RPC layer. Services are plain objects whose methods take the decoded
 * request and a CallContext; the gRPC server and the REST gateway both dispatch through
 * `invoke()`, so validation, logging, audit and error mapping are one code path for both.
 */
import type { DescMethod } from "@bufbuild/protobuf";
import type { Logger } from "pino";
import { apiRegistry } from "../common/proto-registry.js";
import { invalidArgument, PiccoloError } from "./errors.js";

/** Which listener a call arrived on. */
export type Transport = "grpc-unix" | "grpc-tcp" | "rest";

/** What a handler knows about its call. */
export interface CallContext {
  /** The method being called. */
  readonly method: MethodEntry;
  /** Who is calling, e.g. "unix:uid=0" or "tcp:127.0.0.1". */
  readonly actor: string;
  /** The listener. */
  readonly transport: Transport;
  /** Aborted when the client goes away or the deadline passes. */
  readonly signal: AbortSignal;
  /** Request metadata / headers, lower-case keys. */
  readonly metadata: Readonly<Record<string, string>>;
  /** A child logger of the method's area. */
  readonly log: Logger;
  /**
   * Who is calling, set by the auth gate before the handler runs: the role, the token's subject
   * ("root" on the unix socket) and the token.
   */
  principal?: { readonly role: number; readonly subject: string; readonly token?: { readonly id: string } };
  /** Set by a handler that started an operation, so the audit record names it. */
  startedOperation?: { readonly id: string };
}

/** Writes stream messages; resolves once the message is handed to the transport (backpressure). */
export interface StreamSink<Res> {
  send(message: Res): Promise<void>;
}

/** A unary handler. */
export type UnaryHandler<Req, Res> = (request: Req, ctx: CallContext) => Promise<Res>;
/** A server-streaming handler; resolves when the stream is complete. */
export type StreamHandler<Req, Res> = (request: Req, ctx: CallContext, sink: StreamSink<Res>) => Promise<void>;

/** The shape of a ts-proto grpc-js service definition entry. */
interface DefEntry {
  readonly path: string;
  readonly requestStream: boolean;
  readonly responseStream: boolean;
  readonly requestDeserialize: (b: Buffer) => unknown;
  readonly responseSerialize: (v: never) => Buffer;
}

/** An implementation of a ts-proto service definition with transport-neutral handlers. */
export type ServiceImpl<D> = {
  [K in keyof D]: D[K] extends {
    responseStream: true;
    requestDeserialize: (b: Buffer) => infer Req;
    responseSerialize: (v: infer Res) => Buffer;
  }
    ? StreamHandler<Req, Res>
    : D[K] extends {
          responseStream: false;
          requestDeserialize: (b: Buffer) => infer Req;
          responseSerialize: (v: infer Res) => Buffer;
        }
      ? UnaryHandler<Req, Res>
      : never;
};

/** One registered method. */
export interface MethodEntry {
  /** gRPC path, "/piccolo.system.v1.SystemService/GetVersion". */
  readonly path: string;
  /** Full service name. */
  readonly service: string;
  /** RPC name. */
  readonly name: string;
  /** The area it belongs to (logger and audit field), e.g. "system". */
  readonly area: string;
  /** Whether the server streams. */
  readonly serverStreaming: boolean;
  /** Whether calls change state (everything not marked idempotency_level = NO_SIDE_EFFECTS); audited. */
  readonly mutating: boolean;
  /** The method's descriptor. */
  readonly desc: DescMethod;
  /** Decodes the binary request; throws PiccoloError(invalid_argument) on a malformed one. */
  decode(bytes: Uint8Array): unknown;
  /** Encodes one response message. */
  encode(message: unknown): Uint8Array;
  /** The handler. */
  readonly handler: UnaryHandler<unknown, unknown> | StreamHandler<unknown, unknown>;
}

/** Wraps a call; call `next()` to go on. Thrown errors are mapped by the transport. */
export type Interceptor = (call: InterceptedCall, next: () => Promise<void>) => Promise<void>;

/** What an interceptor sees. */
export interface InterceptedCall {
  readonly ctx: CallContext;
  readonly request: unknown;
  /** Set by the call when it ends: null on success, else the error. */
  outcome?: { error: unknown } | null;
}

/** All registered methods, by gRPC path. */
export interface MethodRegistry {
  readonly methods: ReadonlyMap<string, MethodEntry>;
  /** Full names of the registered services. */
  readonly services: readonly string[];
  /** ts-proto definitions by service name, for the gRPC server. */
  readonly definitions: ReadonlyMap<string, Record<string, DefEntry>>;
  /** Registers an implementation of a ts-proto service definition. */
  add<D extends Record<string, DefEntry>>(definition: D, impl: ServiceImpl<D>, area: string): void;
}

/** Creates an empty method registry. */
export function createMethodRegistry(): MethodRegistry {
  const methods = new Map<string, MethodEntry>();
  const services: string[] = [];
  const definitions = new Map<string, Record<string, DefEntry>>();
  return {
    methods,
    services,
    definitions,
    add(definition, impl, area) {
      let serviceName = "";
      for (const [key, def] of Object.entries(definition)) {
        const [, service = "", name = ""] = /^\/([^/]+)\/([^/]+)$/.exec(def.path) ?? [];
        serviceName = service;
        const svcDesc = apiRegistry.getService(service);
        const desc = svcDesc?.methods.find((m) => m.name === name);
        if (!desc) throw new Error(`no descriptor for ${def.path}; regenerate gen/`);
        if (def.requestStream) throw new Error(`${def.path}: client streaming is not supported`);
        const handler = (impl as Record<string, unknown>)[key];
        if (typeof handler !== "function") throw new Error(`${def.path}: no handler`);
        methods.set(def.path, {
          path: def.path,
          service,
          name,
          area,
          serverStreaming: def.responseStream,
          mutating: desc.idempotency !== 1 /* NO_SIDE_EFFECTS */,
          desc,
          decode(bytes) {
            try {
              return def.requestDeserialize(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
            } catch (e) {
              throw new PiccoloError(
                "invalid_argument",
                `malformed ${desc.input.typeName} message: ${(e as Error).message}`,
                { reason: "MALFORMED_REQUEST", cause: e },
              );
            }
          },
          encode: (m) => def.responseSerialize(m as never),
          handler: (handler as (...a: unknown[]) => unknown).bind(impl) as MethodEntry["handler"],
        });
      }
      services.push(serviceName);
      definitions.set(serviceName, definition);
    },
  };
}

/** Returns a function giving each area's child logger, created once. */
export function areaLoggers(log: Logger): (area: string) => Logger {
  const cache = new Map<string, Logger>();
  return (area) => {
    let l = cache.get(area);
    if (!l) cache.set(area, (l = log.child({ area })));
    return l;
  };
}

/** The error a stream write fails with once the client has gone. */
export function clientGone(): Error {
  return Object.assign(new Error("the client went away"), { name: "AbortError" });
}

/** Runs a call through the interceptors and its handler. */
export async function invoke(
  interceptors: readonly Interceptor[],
  ctx: CallContext,
  request: unknown,
  sink?: StreamSink<unknown>,
): Promise<unknown> {
  let response: unknown;
  const call: InterceptedCall = { ctx, request };
  const run = async (i: number): Promise<void> => {
    if (i < interceptors.length) {
      await interceptors[i]!(call, () => run(i + 1));
      return;
    }
    if (ctx.method.serverStreaming) {
      if (!sink) throw new Error("stream call without a sink");
      await (ctx.method.handler as StreamHandler<unknown, unknown>)(request, ctx, sink);
    } else {
      response = await (ctx.method.handler as UnaryHandler<unknown, unknown>)(request, ctx);
    }
  };
  await run(0);
  return response;
}

/** Validation helpers for services: each throws invalid_argument naming the field. */
export const validate = {
  /** A required non-empty string. */
  required(value: string, field: string): string {
    if (value.trim() === "") throw invalidArgument(field, "is required");
    return value;
  },
  /** An integer within [min, max]; 0 means "use the default". */
  range(value: number, field: string, min: number, max: number, dflt: number): number {
    if (value === 0) return dflt;
    if (!Number.isInteger(value) || value < min || value > max) {
      throw invalidArgument(field, `must be between ${min} and ${max} (got ${value})`);
    }
    return value;
  },
  /** An identifier made of safe characters, such as an operation id. */
  id(value: string, field: string): string {
    validate.required(value, field);
    if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(value)) {
      throw invalidArgument(field, `${JSON.stringify(value.slice(0, 64))} is not a valid id`);
    }
    return value;
  },
};
