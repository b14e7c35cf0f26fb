/**
 * The fetch-based transport behind the generated REST clients (gen/piccolo/<area>/v1/*_rest.ts).
 * Builds the URL, query and body from the method's google.api.http binding, speaks proto3 JSON
 * through the API's descriptors, and reads server streams as newline-delimited JSON. Works in
 * Node 20 and in browsers.
 */
import { type DescField, type DescMessage, type JsonObject, type JsonValue } from "@bufbuild/protobuf";
import type { RestCallOptions, RestMethod, RestTransport } from "../../gen/piccolo/rest.js";
import { compilePathTemplate, type PathTemplate } from "../common/http-rule.js";
import { binaryToJson, jsonToBinary, messageDesc } from "../common/proto-registry.js";

/** An error answer from the gateway: the gRPC code, the HTTP status and the google.rpc.Status details. */
export class RestError extends Error {
  override readonly name = "RestError";
  constructor(
    /** gRPC status code (google.rpc.Code). */
    readonly code: number,
    message: string,
    /** HTTP status; 0 for an error sent inside a stream. */
    readonly httpStatus: number,
    /** google.rpc.Status details as JSON (each with "@type"). */
    readonly details: readonly JsonValue[] = [],
  ) {
    super(message);
  }
}

/** Options of createRestTransport. */
export interface RestTransportOptions {
  /** e.g. "http://127.0.0.1:8080". */
  readonly baseUrl: string;
  /** Bearer token. */
  readonly token?: string;
  /** The fetch to use; defaults to globalThis.fetch. */
  readonly fetch?: typeof fetch;
  /** Ask streams as Server-Sent Events instead of NDJSON. */
  readonly sse?: boolean;
}

const templates = new Map<string, PathTemplate>();
const templateOf = (pattern: string): PathTemplate => {
  let t = templates.get(pattern);
  if (!t) templates.set(pattern, (t = compilePathTemplate(pattern)));
  return t;
};

function getPath(obj: JsonObject, msg: DescMessage, path: string): { value: JsonValue | undefined; jsonPath: string[] } {
  let cur: JsonValue | undefined = obj;
  let desc: DescMessage | undefined = msg;
  const jsonPath: string[] = [];
  for (const part of path.split(".")) {
    const f: DescField | undefined = desc?.fields.find((x) => x.name === part);
    const key = f?.jsonName ?? part;
    jsonPath.push(key);
    cur = cur && typeof cur === "object" && !Array.isArray(cur) ? (cur as JsonObject)[key] : undefined;
    desc = f?.fieldKind === "message" ? f.message : undefined;
  }
  return { value: cur, jsonPath };
}

function deletePath(obj: JsonObject, jsonPath: string[]): void {
  let cur: JsonValue | undefined = obj;
  for (let i = 0; i < jsonPath.length - 1; i++) cur = (cur as JsonObject | undefined)?.[jsonPath[i]!];
  if (cur && typeof cur === "object" && !Array.isArray(cur)) delete (cur as JsonObject)[jsonPath[jsonPath.length - 1]!];
}

/** Flattens the remaining fields into query parameters (a.b=v, repeated as repeated keys). */
function toQuery(obj: JsonObject, prefix: string, out: URLSearchParams): void {
  for (const [k, v] of Object.entries(obj)) {
    const key = prefix ? `${prefix}.${k}` : k;
    if (Array.isArray(v)) for (const x of v) out.append(key, String(x));
    else if (v !== null && typeof v === "object") toQuery(v, key, out);
    else if (v !== null) out.append(key, String(v));
  }
}

async function errorFrom(res: Response): Promise<RestError> {
  const text = await res.text();
  try {
    const j = JSON.parse(text) as { code?: number; message?: string; details?: JsonValue[] };
    return new RestError(j.code ?? 2, j.message ?? res.statusText, res.status, j.details ?? []);
  } catch {
    return new RestError(res.status === 404 ? 5 : 2, `HTTP ${res.status}: ${text.slice(0, 200)}`, res.status);
  }
}

/** Creates the transport. */
export function createRestTransport(options: RestTransportOptions): RestTransport {
  const doFetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  const base = options.baseUrl.replace(/\/+$/, "");

  const build = <Req, Res>(method: RestMethod<Req, Res>, request: Req, o: RestCallOptions | undefined, accept: string) => {
    const binding = method.bindings[0]!;
    const input = messageDesc(method.requestType);
    const json = binaryToJson(method.requestType, method.encodeRequest(request)) as JsonObject;
    const template = templateOf(binding.pattern);
    const path = template.expand((fieldPath) => {
      const { value, jsonPath } = getPath(json, input, fieldPath);
      deletePath(json, jsonPath);
      return value === undefined || value === null ? undefined : String(value);
    });
    let body: string | undefined;
    const query = new URLSearchParams();
    if (binding.body === "*") body = JSON.stringify(json);
    else {
      if (binding.body) {
        const { value, jsonPath } = getPath(json, input, binding.body);
        deletePath(json, jsonPath);
        body = JSON.stringify(value ?? {});
      }
      toQuery(json, "", query);
    }
    const qs = query.toString();
    const headers: Record<string, string> = { accept, ...(o?.headers ?? {}) };
    if (body !== undefined) headers["content-type"] = "application/json";
    if (options.token) headers["authorization"] = `Bearer ${options.token}`;
    return {
      url: `${base}${path}${qs ? `?${qs}` : ""}`,
      init: { method: binding.method, headers, body, signal: o?.signal } as RequestInit,
    };
  };

  const decode = <Res>(method: RestMethod<unknown, Res>, json: JsonValue): Res =>
    method.decodeResponse(jsonToBinary(method.responseType, json));

  return {
    async unary(method, request, o) {
      const { url, init } = build(method, request, o, "application/json");
      const res = await doFetch(url, init);
      if (!res.ok) throw await errorFrom(res);
      return decode(method as RestMethod<unknown, never>, (await res.json()) as JsonValue);
    },
    serverStream(method, request, o) {
      return {
        async *[Symbol.asyncIterator]() {
          const { url, init } = build(method, request, o, options.sse ? "text/event-stream" : "application/x-ndjson");
          const res = await doFetch(url, init);
          if (!res.ok) throw await errorFrom(res);
          if (!res.body) throw new RestError(2, "the gateway sent no body", res.status);
          const reader = res.body.getReader();
          const decoder = new TextDecoder();
          let buf = "";
          const sep = options.sse ? "\n\n" : "\n";
          try {
            for (;;) {
              const { done, value } = await reader.read();
              if (value) buf += decoder.decode(value, { stream: true });
              let i: number;
              while ((i = buf.indexOf(sep)) >= 0) {
                let chunk = buf.slice(0, i);
                buf = buf.slice(i + sep.length);
                if (options.sse) {
                  chunk = chunk
                    .split("\n")
                    .filter((l) => l.startsWith("data:"))
                    .map((l) => l.slice(5).trimStart())
                    .join("\n");
                }
                if (!chunk.trim()) continue;
                const frame = JSON.parse(chunk) as { result?: JsonValue; error?: { code?: number; message?: string; details?: JsonValue[] } };
                if (frame.error) throw new RestError(frame.error.code ?? 2, frame.error.message ?? "stream failed", 0, frame.error.details ?? []);
                if (frame.result !== undefined) yield decode(method as RestMethod<unknown, never>, frame.result);
              }
              if (done) break;
            }
          } finally {
            reader.cancel().catch(() => undefined);
          }
        },
      };
    },
  };
}
