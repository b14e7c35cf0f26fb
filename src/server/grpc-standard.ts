/**
 * The standard gRPC services generic tools expect, served from generated code and the API's
 * embedded descriptors (no .proto file is read at run time, so the single-executable build works):
 * health checking (grpc.health.v1.Health: Check, Watch, List) and server reflection
 * (grpc.reflection.v1 and v1alpha ServerReflection).
 */
import * as grpc from "@grpc/grpc-js";
import { toBinary, type DescFile } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import {
  HealthCheckRequest,
  HealthCheckResponse,
  HealthCheckResponse_ServingStatus as ServingStatus,
  HealthListRequest,
  HealthListResponse,
  HealthService,
} from "../../gen/health/v1/health.js";
import {
  ServerReflectionRequest,
  ServerReflectionResponse,
  ServerReflectionService,
} from "../../gen/grpc/reflection/v1/reflection.js";
import { apiRegistry } from "../common/proto-registry.js";

export { ServingStatus };

/** The health service's state. */
export interface HealthState {
  /** Sets a service's status ("" is the server as a whole); watchers are told. */
  set(service: string, status: ServingStatus): void;
  /** Adds grpc.health.v1.Health to a server. */
  addToServer(server: grpc.Server): void;
}

/** Creates the health service with every named service SERVING. */
export function createHealthService(services: readonly string[]): HealthState {
  const statuses = new Map<string, ServingStatus>([["", ServingStatus.SERVING], ...services.map((s) => [s, ServingStatus.SERVING] as const)]);
  const watchers = new Set<{ service: string; push(s: ServingStatus): void }>();
  return {
    set(service, status) {
      statuses.set(service, status);
      for (const w of watchers) if (w.service === service) w.push(status);
    },
    addToServer(server) {
      const def = HealthService;
      server.addService(def as unknown as grpc.ServiceDefinition, {
        check(call: grpc.ServerUnaryCall<HealthCheckRequest, HealthCheckResponse>, cb: grpc.sendUnaryData<HealthCheckResponse>) {
          const s = statuses.get(call.request.service);
          if (s === undefined) cb({ code: grpc.status.NOT_FOUND, details: `unknown service ${call.request.service}` });
          else cb(null, { status: s });
        },
        watch(call: grpc.ServerWritableStream<HealthCheckRequest, HealthCheckResponse>) {
          let last: ServingStatus | undefined;
          const push = (s: ServingStatus): void => {
            if (s === last) return;
            last = s;
            call.write({ status: s });
          };
          const w = { service: call.request.service, push };
          watchers.add(w);
          call.once("cancelled", () => watchers.delete(w));
          call.once("close", () => watchers.delete(w));
          push(statuses.get(call.request.service) ?? ServingStatus.SERVICE_UNKNOWN);
        },
        list(_call: grpc.ServerUnaryCall<HealthListRequest, HealthListResponse>, cb: grpc.sendUnaryData<HealthListResponse>) {
          cb(null, { statuses: Object.fromEntries([...statuses].map(([k, v]) => [k, { status: v }])) });
        },
      });
    },
  };
}

/** Index of the embedded descriptors for reflection: files, their dependencies, and where each symbol lives. */
function reflectionIndex(): {
  files: Map<string, { bytes: Uint8Array; deps: string[] }>;
  symbols: Map<string, string>;
  extensions: Map<string, Map<number, string>>;
} {
  const files = new Map<string, { bytes: Uint8Array; deps: string[] }>();
  const symbols = new Map<string, string>();
  const extensions = new Map<string, Map<number, string>>();
  const fileName = (f: DescFile): string => f.proto.name;
  for (const f of apiRegistry.files) {
    files.set(fileName(f), { bytes: toBinary(FileDescriptorProtoSchema, f.proto), deps: f.dependencies.map(fileName) });
  }
  for (const t of apiRegistry) {
    symbols.set(t.typeName, fileName(t.file));
    if (t.kind === "service") for (const m of t.methods) symbols.set(`${t.typeName}.${m.name}`, fileName(t.file));
    if (t.kind === "extension") {
      const byNumber = extensions.get(t.extendee.typeName) ?? new Map<number, string>();
      byNumber.set(t.number, fileName(t.file));
      extensions.set(t.extendee.typeName, byNumber);
    }
  }
  return { files, symbols, extensions };
}

/**
 * Adds server reflection (v1 and v1alpha) for `services` to a server. `guard`, when given, is
 * asked once per stream before anything is answered; when it throws, the stream ends with
 * `toError(err)`.
 */
export function addReflection(
  server: grpc.Server,
  services: readonly string[],
  guard?: (call: grpc.ServerDuplexStream<ServerReflectionRequest, ServerReflectionResponse>) => Promise<void>,
  toError: (err: unknown) => Partial<grpc.StatusObject> = (err) => ({ code: grpc.status.PERMISSION_DENIED, details: String(err) }),
): void {
  let index: ReturnType<typeof reflectionIndex> | undefined;
  const withDeps = (name: string): Uint8Array[] => {
    const out: Uint8Array[] = [];
    const seen = new Set<string>();
    const visit = (n: string): void => {
      if (seen.has(n)) return;
      seen.add(n);
      const f = index!.files.get(n);
      if (!f) return;
      out.push(f.bytes);
      f.deps.forEach(visit);
    };
    visit(name);
    return out;
  };
  const answer = (req: ServerReflectionRequest): ServerReflectionResponse => {
    index ??= reflectionIndex();
    const base = { validHost: req.host, originalRequest: req };
    const notFound = (what: string): ServerReflectionResponse => ({
      ...base,
      errorResponse: { errorCode: grpc.status.NOT_FOUND, errorMessage: `${what} not found` },
    });
    if (req.listServices !== undefined) {
      return { ...base, listServicesResponse: { service: [...services, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection"].map((name) => ({ name })) } };
    }
    if (req.fileByFilename !== undefined) {
      return index.files.has(req.fileByFilename)
        ? { ...base, fileDescriptorResponse: { fileDescriptorProto: withDeps(req.fileByFilename) } }
        : notFound(`file ${req.fileByFilename}`);
    }
    if (req.fileContainingSymbol !== undefined) {
      const file = index.symbols.get(req.fileContainingSymbol.replace(/^\./, ""));
      return file ? { ...base, fileDescriptorResponse: { fileDescriptorProto: withDeps(file) } } : notFound(`symbol ${req.fileContainingSymbol}`);
    }
    if (req.fileContainingExtension !== undefined) {
      const { containingType, extensionNumber } = req.fileContainingExtension;
      const file = index.extensions.get(containingType)?.get(extensionNumber);
      return file ? { ...base, fileDescriptorResponse: { fileDescriptorProto: withDeps(file) } } : notFound(`extension ${containingType}(${extensionNumber})`);
    }
    if (req.allExtensionNumbersOfType !== undefined) {
      const nums = index.extensions.get(req.allExtensionNumbersOfType);
      if (!nums && !index.symbols.has(req.allExtensionNumbersOfType)) return notFound(`type ${req.allExtensionNumbersOfType}`);
      return { ...base, allExtensionNumbersResponse: { baseTypeName: req.allExtensionNumbersOfType, extensionNumber: [...(nums?.keys() ?? [])] } };
    }
    return { ...base, errorResponse: { errorCode: grpc.status.INVALID_ARGUMENT, errorMessage: "empty reflection request" } };
  };
  const handler = (call: grpc.ServerDuplexStream<ServerReflectionRequest, ServerReflectionResponse>): void => {
    call.on("error", () => undefined);
    const allowed = guard
      ? guard(call).then(
          () => true,
          (err: unknown) => {
            call.emit("error", toError(err));
            return false;
          },
        )
      : Promise.resolve(true);
    call.on("data", (req: ServerReflectionRequest) => void allowed.then((ok) => ok && call.write(answer(req))));
    call.on("end", () => void allowed.then((ok) => ok && call.end()));
  };
  const v1 = ServerReflectionService.serverReflectionInfo;
  server.addService({ serverReflectionInfo: v1 } as unknown as grpc.ServiceDefinition, { serverReflectionInfo: handler });
  // grpcurl and older tools ask v1alpha, which has the same messages.
  server.addService(
    { serverReflectionInfo: { ...v1, path: "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" } } as unknown as grpc.ServiceDefinition,
    { serverReflectionInfo: handler },
  );
}
