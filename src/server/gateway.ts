/**
 * The REST gateway: serves every RPC that has a google.api.http annotation, with routes, path
 * variables, query parameters and bodies bound by the annotation's rules at start-up (no
 * hand-kept route table), proto3 JSON in and out, errors as {code, message, details} with the
 * status from the shared error table, and server streams as newline-delimited JSON
 * ({"result": …} per message, {"error": …} to end on failure) or, with
 * `Accept: text/event-stream`, as Server-Sent Events. Over HTTPS with the daemon's certificate
 * unless the development switch insecurePlaintext is on.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { createServer as createTlsServer, type Server as TlsServer } from "node:https";
import { ScalarType, type DescField, type DescMessage, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import type { Logger } from "pino";
import { Status } from "../../gen/google/rpc/status.js";
import { compilePathTemplate, readHttpBindings, type HttpBinding, type PathTemplate } from "../common/http-rule.js";
import { apiRegistry, binaryToJson, JsonMappingError, jsonToBinary } from "../common/proto-registry.js";
import { PiccoloError, toRpcStatus } from "./errors.js";
import { areaLoggers, clientGone, invoke, type CallContext, type Interceptor, type MethodEntry, type MethodRegistry, type StreamSink } from "./rpc.js";

/** One route: an HTTP binding of a registered method. */
interface Route {
  readonly entry: MethodEntry;
  readonly binding: HttpBinding;
  readonly template: PathTemplate;
}

/** Largest request body accepted. */
const MAX_BODY = 4 * 1024 * 1024;

/** The running gateway. */
export interface Gateway {
  readonly server: Server | TlsServer;
  /** Every route, for listings and tests. */
  readonly routes: readonly { method: string; pattern: string; rpc: string }[];
  listen(host: string, port: number): Promise<number>;
  close(): Promise<void>;
}

/** Builds the routes from the annotations of the registered methods. */
function buildRoutes(registry: MethodRegistry): Route[] {
  const routes: Route[] = [];
  for (const entry of registry.methods.values()) {
    for (const binding of readHttpBindings(entry.desc, apiRegistry)) {
      routes.push({ entry, binding, template: compilePathTemplate(binding.pattern) });
    }
  }
  // Templates with a verb and more literal segments first, so "/x/{id}:watch" wins over "/x/{id}".
  routes.sort(
    (a, b) => Number(b.template.verb !== "") - Number(a.template.verb !== "") || b.template.literalCount - a.template.literalCount,
  );
  return routes;
}

class HttpError extends PiccoloError {}

const bad = (field: string, problem: string): HttpError =>
  new HttpError("invalid_argument", `${field}: ${problem}`, { field, reason: "INVALID_FIELD" });

/** Finds the field for a dotted path (proto or JSON names), returning each step. */
function resolveFieldPath(msg: DescMessage, path: string): DescField[] | undefined {
  const steps: DescField[] = [];
  let cur: DescMessage | undefined = msg;
  for (const part of path.split(".")) {
    if (!cur) return undefined;
    const f: DescField | undefined = cur.fields.find((x) => x.name === part || x.jsonName === part);
    if (!f) return undefined;
    steps.push(f);
    cur = f.fieldKind === "message" ? f.message : undefined;
  }
  return steps;
}

/** Converts a path or query string to the JSON value proto3 JSON expects for the field. */
function stringToJson(field: DescField, raw: string, name: string): JsonValue {
  const scalar = field.fieldKind === "scalar" || (field.fieldKind === "list" && field.listKind === "scalar") ? field.scalar : undefined;
  if (scalar === ScalarType.BOOL) {
    if (raw === "true" || raw === "1") return true;
    if (raw === "false" || raw === "0") return false;
    throw bad(name, `expected true or false, got ${JSON.stringify(raw)}`);
  }
  const isEnum = field.fieldKind === "enum" || (field.fieldKind === "list" && field.listKind === "enum");
  if (isEnum && /^-?\d+$/.test(raw)) return Number(raw);
  return raw;
}

function setPath(obj: JsonObject, steps: DescField[], value: JsonValue, append: boolean): void {
  let cur = obj;
  for (let i = 0; i < steps.length - 1; i++) {
    const k = steps[i]!.jsonName;
    const next = cur[k];
    if (typeof next !== "object" || next === null || Array.isArray(next)) cur[k] = {};
    cur = cur[k] as JsonObject;
  }
  const last = steps[steps.length - 1]!;
  if (append) {
    const arr = Array.isArray(cur[last.jsonName]) ? (cur[last.jsonName] as JsonValue[]) : [];
    arr.push(value);
    cur[last.jsonName] = arr;
  } else cur[last.jsonName] = value;
}

function readBody(req: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    req.on("data", (c: Buffer) => {
      size += c.length;
      if (size > MAX_BODY) {
        reject(new HttpError("resource_exhausted", `request body larger than ${MAX_BODY} bytes`));
        req.destroy();
        return;
      }
      chunks.push(c);
    });
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

/** The JSON request for a route: body, then path variables, then query parameters. */
async function buildRequestJson(route: Route, vars: Map<string, string>, url: URL, req: IncomingMessage): Promise<JsonObject> {
  const input = route.entry.desc.input;
  let obj: JsonObject = {};
  const { body } = route.binding;
  if (body !== "") {
    const raw = await readBody(req);
    if (raw.length > 0) {
      let parsed: unknown;
      try {
        parsed = JSON.parse(raw.toString("utf8"));
      } catch (e) {
        throw new HttpError("invalid_argument", `request body is not valid JSON: ${(e as Error).message}`, { reason: "MALFORMED_REQUEST" });
      }
      if (body === "*") {
        if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
          throw new HttpError("invalid_argument", `request body must be a JSON object (${input.typeName})`, { reason: "MALFORMED_REQUEST" });
        }
        obj = parsed as JsonObject;
      } else {
        const steps = resolveFieldPath(input, body);
        if (!steps) throw new Error(`body field ${body} not in ${input.typeName}`);
        setPath(obj, steps, parsed as JsonValue, false);
      }
    }
  } else {
    req.resume();
  }
  const bound = new Set<string>();
  for (const [fieldPath, value] of vars) {
    const steps = resolveFieldPath(input, fieldPath);
    if (!steps) throw new Error(`path variable ${fieldPath} not in ${input.typeName}`);
    setPath(obj, steps, stringToJson(steps[steps.length - 1]!, value, fieldPath), false);
    bound.add(steps.map((s) => s.name).join("."));
  }
  if (body !== "*") {
    for (const [key, value] of url.searchParams) {
      const steps = resolveFieldPath(input, key);
      if (!steps) throw bad(key, `unknown query parameter for ${input.typeName}`);
      const protoPath = steps.map((s) => s.name).join(".");
      if (bound.has(protoPath)) throw bad(key, "is already given in the path");
      if (body !== "" && protoPath === body) throw bad(key, "is given in the body");
      const last = steps[steps.length - 1]!;
      if (last.fieldKind !== "list" && url.searchParams.getAll(key).length > 1) throw bad(key, "is given more than once");
      if (last.fieldKind === "message" && !last.message.typeName.startsWith("google.protobuf.")) {
        throw bad(key, "a message field cannot be set from the query string; set its fields (a.b=…)");
      }
      setPath(obj, steps, stringToJson(last, value, key), last.fieldKind === "list");
    }
  }
  return obj;
}

const errorJson = (err: unknown): { http: number; json: JsonValue } => {
  const st = toRpcStatus(err);
  return { http: st.httpStatus, json: binaryToJson("google.rpc.Status", Status.encode(st.status).finish()) };
};

/** Options of createGateway. */
export interface GatewayOptions {
  /** Serve HTTPS with this key and certificate (PEM); plain HTTP without. */
  readonly tls?: { readonly key: string; readonly cert: string };
  /** Authenticates a call before its request is read (sets ctx.principal or throws the denial). */
  readonly authenticate?: (ctx: CallContext) => Promise<void> | undefined;
}

/** Creates the gateway for the registered methods. */
export function createGateway(registry: MethodRegistry, interceptors: readonly Interceptor[], log: Logger, options: GatewayOptions = {}): Gateway {
  const routes = buildRoutes(registry);
  const logOf = areaLoggers(log);

  const sendJson = (res: ServerResponse, status: number, body: JsonValue): void => {
    const text = JSON.stringify(body);
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
    res.end(text);
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const url = new URL(req.url ?? "/", "http://gateway");
    const method = (req.method ?? "GET").toUpperCase();
    let route: Route | undefined;
    let vars: Map<string, string> | undefined;
    const allowed: string[] = [];
    for (const r of routes) {
      const m = r.template.match(url.pathname);
      if (!m) continue;
      if (r.binding.method === method) {
        route = r;
        vars = m;
        break;
      }
      allowed.push(r.binding.method);
    }
    if (!route || !vars) {
      req.resume();
      if (allowed.length > 0) {
        res.setHeader("allow", [...new Set(allowed)].join(", "));
        sendJson(res, 405, { code: 12, message: `method ${method} not allowed on ${url.pathname}; use ${[...new Set(allowed)].join(" or ")}`, details: [] });
      } else {
        sendJson(res, 404, { code: 5, message: `no route for ${method} ${url.pathname}`, details: [] });
      }
      return;
    }
    const entry = route.entry;
    const ac = new AbortController();
    // "close" also follows a complete answer; only a client that left early aborts the call.
    res.once("close", () => {
      if (!res.writableFinished) ac.abort();
    });
    const metadata: Record<string, string> = {};
    for (const [k, v] of Object.entries(req.headers)) if (typeof v === "string") metadata[k] = v;
    const ctx: CallContext = {
      method: entry,
      actor: `rest:${req.socket.remoteAddress ?? "?"}`,
      transport: "rest",
      signal: ac.signal,
      metadata,
      log: logOf(entry.area),
    };
    const sse = (req.headers.accept ?? "").includes("text/event-stream");
    let started = false;
    try {
      if (options.authenticate) {
        try {
          await options.authenticate(ctx);
        } catch (e) {
          req.resume();
          throw e;
        }
      }
      const json = await buildRequestJson(route, vars, url, req);
      let bytes: Uint8Array;
      try {
        bytes = jsonToBinary(entry.desc.input.typeName, json);
      } catch (e) {
        if (e instanceof JsonMappingError) {
          throw new HttpError("invalid_argument", e.message, { reason: "INVALID_JSON", ...(e.field ? { field: e.field } : {}) });
        }
        throw e;
      }
      const request = entry.decode(bytes);
      const outType = entry.desc.output.typeName;
      const responseBody = route.binding.responseBody;
      const render = (msg: unknown): JsonValue => {
        const j = binaryToJson(outType, entry.encode(msg));
        if (!responseBody) return j;
        const steps = resolveFieldPath(entry.desc.output, responseBody);
        return (j as JsonObject)[steps?.[0]?.jsonName ?? responseBody] ?? null;
      };
      if (!entry.serverStreaming) {
        const response = await invoke(interceptors, ctx, request);
        sendJson(res, 200, render(response));
        return;
      }
      const sink: StreamSink<unknown> = {
        send(message) {
          if (!started) {
            started = true;
            res.writeHead(200, {
              "content-type": sse ? "text/event-stream" : "application/x-ndjson",
              "cache-control": "no-cache",
              "x-accel-buffering": "no",
            });
          }
          const payload = JSON.stringify({ result: render(message) });
          const ok = res.write(sse ? `data: ${payload}\n\n` : payload + "\n");
          if (ok) return Promise.resolve();
          return new Promise((resolve, reject) => {
            const onClose = (): void => reject(clientGone());
            res.once("drain", () => {
              res.removeListener("close", onClose);
              resolve();
            });
            res.once("close", onClose);
          });
        },
      };
      await invoke(interceptors, ctx, request, sink);
      if (!started) {
        res.writeHead(200, { "content-type": sse ? "text/event-stream" : "application/x-ndjson" });
      }
      res.end();
    } catch (err) {
      if (ac.signal.aborted && res.destroyed) return;
      const { http, json } = errorJson(err);
      if (!started) {
        if (http === 401) res.setHeader("www-authenticate", 'Bearer realm="piccolod"');
        sendJson(res, http, json);
      } else {
        const payload = JSON.stringify({ error: json });
        res.end(sse ? `event: error\ndata: ${payload}\n\n` : payload + "\n");
      }
    }
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse): void => {
    handle(req, res).catch((err: unknown) => {
      log.error({ err: (err as Error).message }, "gateway failure");
      if (!res.headersSent) sendJson(res, 500, { code: 13, message: "internal gateway error", details: [] });
      else res.destroy();
    });
  };
  const server = options.tls
    ? createTlsServer({ keepAliveTimeout: 65_000, key: options.tls.key, cert: options.tls.cert }, onRequest)
    : createServer({ keepAliveTimeout: 65_000 }, onRequest);
  server.on("clientError", (_err, socket) => {
    if (socket.writable) socket.end("HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n");
    else socket.destroy();
  });

  return {
    server,
    routes: routes.map((r) => ({ method: r.binding.method, pattern: r.binding.pattern, rpc: r.entry.path })),
    listen(host, port) {
      return new Promise((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, host, () => {
          server.removeListener("error", reject);
          const addr = server.address();
          resolve(typeof addr === "object" && addr ? addr.port : port);
        });
      });
    },
    close() {
      return new Promise((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
    },
  };
}
