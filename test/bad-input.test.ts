/**
 * Bad input against the real daemon: every kind of malformed request gets a well-formed error that
 * names what is wrong (never UNKNOWN/INTERNAL or a 5xx), over REST and gRPC, and a seeded fuzz of
 * every REST route and every gRPC method (both derived from the descriptors) leaves the daemon
 * alive and answering.
 */
import * as grpc from "@grpc/grpc-js";
import { fromBinary, type DescMethod, type DescService, type JsonValue } from "@bufbuild/protobuf";
import { Agent, request as httpRequest } from "node:https";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BadRequest, ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import { GetOperationRequest, ListOperationsRequest, OperationState, WatchOperationRequest } from "../gen/piccolo/operations/v1/operations.js";
import { RunDiagnosticsRequest } from "../gen/piccolo/system/v1/system.js";
import { compilePathTemplate, readHttpBindings, type HttpBinding, type PathTemplate } from "../src/common/http-rule.js";
import { apiRegistry, jsonToBinary } from "../src/common/proto-registry.js";
import { httpStatusFor } from "../src/server/errors.js";
import { loadSync } from "@grpc/proto-loader";
import { ROOT, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

let d: TestDaemon;
let noDockerDir: string;
/** API services the daemon has registered. */
let served: Set<string>;
beforeAll(async () => {
  // Warnings and errors only, and a short operation history: the fuzz makes 140,000 calls and
  // starts hundreds of operations, and neither a debug line per call nor 50-operation pages are
  // what it is about (errors are still logged, and checked below).
  // Every host part is one that cannot exist or a folder of its own: random input must never
  // reach a real engine, bus (a valid random Reboot would reboot the host), disk or server.
  noDockerDir = await mkdtemp(join(tmpdir(), "piccolod-no-docker-"));
  const sandbox = (name: string): string => join(noDockerDir, name);
  d = await startTestDaemon({
    extraArgs: [
      ...["--log-level", "warn", "--operation-retention", "10", "--docker-socket", sandbox("docker.sock")],
      ...["--system-bus-address", `unix:path=${sandbox("no-system-bus")}`, "--update-server", "http://127.0.0.1:9"],
      ...["--update-conf-file", sandbox("update.conf"), "--update-disk", sandbox("no-disk.img")],
      ...["--agent-unit-dir", sandbox("units"), "--tasks-secrets-dir", sandbox("task-secrets")],
      ...["--tpm-devices", sandbox("no-tpm"), "--central-url", ""],
    ],
  });
  served = new Set(await listServedServices());
});
afterAll(async () => {
  await d.cleanup();
  await rm(noDockerDir, { recursive: true, force: true });
});

interface ErrorBody {
  code: number;
  message: string;
  details: { "@type": string; reason?: string; metadata?: Record<string, string>; fieldViolations?: { field: string }[] }[];
}

async function rest(path: string, init: RequestInit = {}): Promise<{ status: number; body: ErrorBody }> {
  const res = await d.fetch(path, init);
  const text = await res.text();
  expect(res.headers.get("content-type")).toBe("application/json");
  return { status: res.status, body: JSON.parse(text) as ErrorBody };
}

const post = (path: string, body: string): Promise<{ status: number; body: ErrorBody }> =>
  rest(path, { method: "POST", body, headers: { "content-type": "application/json" } });

/** Fails the way a gRPC call fails, or throws if it succeeded. */
async function grpcError(p: Promise<unknown> | AsyncIterable<unknown>): Promise<grpc.ServiceError> {
  try {
    if (Symbol.asyncIterator in p) {
      for await (const _ of p) {
        // until the error
      }
    } else await p;
  } catch (e) {
    return e as grpc.ServiceError;
  }
  throw new Error("expected the call to fail");
}

function statusOf(err: grpc.ServiceError): Status {
  const bin = err.metadata?.get("grpc-status-details-bin")[0];
  if (!Buffer.isBuffer(bin)) throw new Error(`no grpc-status-details-bin on ${err.code} ${err.details}`);
  return Status.decode(bin);
}

const errorInfoOf = (st: Status): ErrorInfo => {
  const any = st.details.find((a) => a.typeUrl === "type.googleapis.com/google.rpc.ErrorInfo");
  if (!any) throw new Error(`no ErrorInfo in ${JSON.stringify(st)}`);
  return ErrorInfo.decode(any.value);
};

describe("REST: malformed requests are 4xx with code, message and the field at fault", () => {
  test("a wrong-typed JSON field in the body is 400 naming the field", async () => {
    const r = await post("/api/v1/diagnostics", JSON.stringify({ writeProbeMib: "x" }));
    expect(r.status).toBe(400);
    expect(r.body.code).toBe(3);
    expect(r.body.message).toContain("write_probe_mib");
    expect(r.body.details[0]).toMatchObject({ "@type": "type.googleapis.com/google.rpc.ErrorInfo", reason: "INVALID_JSON", domain: "piccolo.space" });
    const neg = await post("/api/v1/diagnostics", JSON.stringify({ writeProbeMib: -1 }));
    expect([neg.status, neg.body.code]).toEqual([400, 3]);
    expect(neg.body.message).toContain("write_probe_mib");
  });

  test("a wrong-typed query parameter is 400 naming the field", async () => {
    const r = await rest("/api/v1/operations?pageSize=abc");
    expect([r.status, r.body.code]).toEqual([400, 3]);
    expect(r.body.message).toContain("page_size");
    const w = await rest("/api/v1/operations/op-1:watch?afterSequence=later");
    expect([w.status, w.body.code]).toEqual([400, 3]);
    expect(w.body.message).toContain("after_sequence");
  });

  test("an unknown enum name is 400 naming the enum; an unknown enum number is 400 naming the field", async () => {
    const r = await rest("/api/v1/operations?state=FOO");
    expect([r.status, r.body.code]).toEqual([400, 3]);
    expect(r.body.message).toContain("piccolo.operations.v1.OperationState");
    expect(r.body.message).toContain("FOO");
    const n = await rest("/api/v1/operations?state=99");
    expect([n.status, n.body.code]).toEqual([400, 3]);
    expect(n.body.message).toMatch(/^state: /);
  });

  test("an unknown JSON field, an unknown query parameter and a body that is not JSON (or not an object) are 400", async () => {
    const unknown = await post("/api/v1/diagnostics", JSON.stringify({ writeProbeMib: 1, probe: true }));
    expect([unknown.status, unknown.body.code]).toEqual([400, 3]);
    expect(unknown.body.message).toContain('"probe"');
    const query = await rest("/api/v1/operations?colour=blue");
    expect([query.status, query.body.code]).toEqual([400, 3]);
    expect(query.body.message).toMatch(/^colour: unknown query parameter/);
    const notJson = await post("/api/v1/diagnostics", "writeProbeMib=1");
    expect([notJson.status, notJson.body.code]).toEqual([400, 3]);
    expect(notJson.body.message).toMatch(/not valid JSON/);
    expect(notJson.body.details[0]).toMatchObject({ reason: "MALFORMED_REQUEST" });
    const array = await post("/api/v1/operations/op-1:cancel", "[1,2]");
    expect([array.status, array.body.code]).toEqual([400, 3]);
    expect(array.body.message).toContain("must be a JSON object");
  });

  test("a missing required id is INVALID_ARGUMENT naming id, over REST and gRPC", async () => {
    const r = await rest("/api/v1/operations/%20");
    expect([r.status, r.body.code]).toEqual([400, 3]);
    expect(r.body.message).toBe("id: is required");
    expect(r.body.details).toEqual(
      expect.arrayContaining([
        expect.objectContaining({ "@type": "type.googleapis.com/google.rpc.ErrorInfo", reason: "INVALID_FIELD", metadata: { field: "id" } }),
        expect.objectContaining({ "@type": "type.googleapis.com/google.rpc.BadRequest", fieldViolations: [expect.objectContaining({ field: "id" })] }),
      ]),
    );
    for (const c of [d.grpcUnix(), d.grpcTcp()]) {
      const e = await grpcError(c.operations.getOperation({ id: "" }));
      expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(e.details).toBe("id: is required");
      const st = statusOf(e);
      expect(errorInfoOf(st).metadata["field"]).toBe("id");
      const br = BadRequest.decode(st.details.find((a) => a.typeUrl.endsWith("google.rpc.BadRequest"))!.value);
      expect(br.fieldViolations.map((v) => v.field)).toEqual(["id"]);
      const w = await grpcError(c.operations.watchOperation({ id: "", afterSequence: 0 }));
      expect(w.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(w.details).toMatch(/^id: /);
    }
  });

  test("an unknown operation id is 404 / NOT_FOUND", async () => {
    const r = await rest("/api/v1/operations/op-20990101T000000Z-000000");
    expect([r.status, r.body.code]).toEqual([404, 5]);
    expect(r.body.message).toContain("op-20990101T000000Z-000000");
    const c = await post("/api/v1/operations/op-nope:cancel", "{}");
    expect([c.status, c.body.code]).toEqual([404, 5]);
    const w = await rest("/api/v1/operations/op-nope:watch");
    expect([w.status, w.body.code]).toEqual([404, 5]);
    const g = await grpcError(d.grpcUnix().operations.getOperation({ id: "op-nope" }));
    expect(g.code).toBe(grpc.status.NOT_FOUND);
    expect(errorInfoOf(statusOf(g)).reason).toBe("NOT_FOUND");
  });

  test("an out-of-range write_probe_mib is INVALID_ARGUMENT naming it, and starts nothing", async () => {
    const r = await post("/api/v1/diagnostics", JSON.stringify({ writeProbeMib: 99999 }));
    expect([r.status, r.body.code]).toEqual([400, 3]);
    expect(r.body.message).toMatch(/^write_probe_mib: must be between 1 and 4096/);
    const e = await grpcError(d.grpcTcp().system.runDiagnostics({ writeProbeMib: 99999 }));
    expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(e.details).toMatch(/^write_probe_mib: /);
    expect(errorInfoOf(statusOf(e)).metadata["field"]).toBe("write_probe_mib");
    const list = await d.grpcUnix().operations.listOperations(ListOperationsRequest.fromPartial({}));
    expect(list.operations).toEqual([]);
  });
});

describe("gRPC: a malformed protobuf frame", () => {
  test("is INVALID_ARGUMENT with a google.rpc.Status carrying ErrorInfo, on every method", async () => {
    const client = new grpc.Client(d.endpoints.grpc, d.channelCredentials());
    const id = (b: Buffer): Buffer => b;
    const frame = Buffer.from([0x0a, 0xff]); // field 1, length-delimited, length varint cut short
    try {
      for (const m of registeredMethods()) {
        const path = `/${m.parent.typeName}/${m.name}`;
        const err = await new Promise<grpc.ServiceError>((resolve, reject) => {
          if (m.methodKind === "server_streaming") {
            const call = client.makeServerStreamRequest(path, id, id, frame, new grpc.Metadata(), {});
            call.on("data", () => reject(new Error(`${path} answered a malformed frame`)));
            call.on("error", resolve);
          } else {
            client.makeUnaryRequest(path, id, id, frame, (e) => (e ? resolve(e) : reject(new Error(`${path} answered a malformed frame`))));
          }
        });
        expect({ path, code: grpc.status[err.code] }).toEqual({ path, code: "INVALID_ARGUMENT" });
        expect(err.details).toContain(`malformed ${m.input.typeName} message`);
        const st = statusOf(err);
        expect(st.code).toBe(grpc.status.INVALID_ARGUMENT);
        expect(st.message).toBe(err.details);
        const info = errorInfoOf(st);
        expect(info).toMatchObject({ reason: "MALFORMED_REQUEST", domain: "piccolo.space" });
      }
    } finally {
      client.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// Fuzz

/** Every method, from the descriptors, of every API service the daemon has registered. */
function registeredMethods(): DescMethod[] {
  const services: DescService[] = [];
  for (const t of apiRegistry) if (t.kind === "service" && served.has(t.typeName)) services.push(t);
  // Never vacuous: at least the two foundation services are there.
  expect(services.map((x) => x.typeName)).toEqual(expect.arrayContaining(["piccolo.system.v1.SystemService", "piccolo.operations.v1.OperationsService"]));
  return services.flatMap((x) => x.methods);
}

/** A method that starts an operation and streams its events (e.g. RunDiagnostics), as opposed to one that only watches. */
const startsOperations = (m: DescMethod): boolean =>
  m.methodKind === "server_streaming" && m.output.typeName === "piccolo.operations.v1.OperationEvent" && m.name !== "WatchOperation";

/** xoshiro128** — small, seeded, reproducible. */
function prng(seed: number): () => number {
  let a = seed >>> 0 || 1;
  let b = 0x9e3779b9;
  let c = 0x243f6a88;
  let dd = 0xb7e15162;
  const next = (): number => {
    const r = Math.imul(rotl(Math.imul(b, 5), 7), 9);
    const t = b << 9;
    c ^= a;
    dd ^= b;
    b ^= c;
    a ^= dd;
    c ^= t;
    dd = rotl(dd, 11);
    return (r >>> 0) / 4294967296;
  };
  const rotl = (x: number, k: number): number => (x << k) | (x >>> (32 - k));
  for (let i = 0; i < 16; i++) next();
  return next;
}

const JSON_TOKENS = [
  "{", "}", "[", "]", ":", ",", " ", '"', "\\", "null", "true", "false", "0", "-1", "1", "1.5", "4096", "99999", "1e400", "-0",
  "18446744073709551616", '"x"', '""', '"\\ud800"', '"é"', '"op-20990101T000000Z-000000"', '"OPERATION_STATE_RUNNING"', '"FOO"',
  '"writeProbeMib"', '"write_probe_mib"', '"id"', '"afterSequence"', '"pageSize"', '"pageToken"', '"state"', '"kind"', '"@type"',
];
const VALID_JSON = ['{"writeProbeMib":1}', '{"id":"op-1"}', '{"pageSize":1,"state":"OPERATION_STATE_SUCCEEDED"}', '{"afterSequence":"3"}', "{}"];
const VALID_PROTO = [
  RunDiagnosticsRequest.encode({ writeProbeMib: 1 }).finish(),
  GetOperationRequest.encode({ id: "op-1" }).finish(),
  ListOperationsRequest.encode({ kind: "system.diagnostics", state: OperationState.OPERATION_STATE_RUNNING, pageSize: 2, pageToken: "eyJ0IjoxfQ" }).finish(),
  WatchOperationRequest.encode({ id: "op-1", afterSequence: 2 }).finish(),
];

/** A random byte string of 0..256 bytes: raw noise, JSON-ish token soup, or a mutated valid request. */
function randomBytes(rnd: () => number): Buffer {
  const int = (n: number): number => Math.floor(rnd() * n);
  const len = int(257);
  const mode = rnd();
  let out: Buffer;
  if (mode < 0.5) {
    out = Buffer.alloc(len);
    for (let i = 0; i < len; i++) out[i] = int(256);
  } else if (mode < 0.75) {
    let s = "";
    while (Buffer.byteLength(s) < len) s += JSON_TOKENS[int(JSON_TOKENS.length)];
    out = Buffer.from(s).subarray(0, len);
  } else {
    const base = rnd() < 0.5 ? Buffer.from(VALID_JSON[int(VALID_JSON.length)]!) : Buffer.from(VALID_PROTO[int(VALID_PROTO.length)]!);
    const bytes = [...base];
    for (let k = int(4); k >= 0; k--) {
      const op = int(3);
      const at = int(bytes.length + 1);
      if (op === 0 && bytes.length > 0) bytes[at % bytes.length] = int(256);
      else if (op === 1) bytes.splice(at, 0, int(256));
      else bytes.splice(at, 1);
    }
    out = Buffer.from(bytes.slice(0, 256));
  }
  return out;
}

const ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-";
function randomId(rnd: () => number): string {
  const r = rnd();
  const len = 1 + Math.floor(rnd() * 40);
  if (r < 0.7) {
    let s = "op-";
    for (let i = 0; i < len; i++) s += ID_CHARS[Math.floor(rnd() * ID_CHARS.length)];
    return s;
  }
  // Anything at all, percent-encoded by the template: spaces, slashes, unicode, control characters.
  let s = "";
  for (let i = 0; i < len; i++) s += String.fromCodePoint(Math.floor(rnd() * (rnd() < 0.8 ? 128 : 0x3000)));
  return s.trim() === "" ? " x" : s;
}

interface Finding {
  readonly where: string;
  readonly index: number;
  readonly input: string;
  readonly problem: string;
}

/** Runs tasks with at most `limit` in flight. */
async function pool(tasks: Iterable<() => Promise<void>>, limit: number): Promise<void> {
  const it = tasks[Symbol.iterator]();
  const worker = async (): Promise<void> => {
    for (let n = it.next(); !n.done; n = it.next()) await n.value();
  };
  await Promise.all(Array.from({ length: limit }, worker));
}

describe("fuzz", () => {
  const SEED = Number(process.env["FUZZ_SEED"] ?? 20261123);
  /** Distinct random inputs. */
  const COUNT = Number(process.env["FUZZ_COUNT"] ?? 10_000);
  /**
   * By default the calls are capped at FUZZ_CALLS (200,000): each target gets a window of the
   * inputs, and the windows together cover all of them. FUZZ_FULL=1 sends every input to every
   * route and method (with the nine areas' 148 targets, about 1.5 million calls: close to an hour
   * on a 2-core machine, too long for CI).
   */
  const BUDGET = Number(process.env["FUZZ_CALLS"] ?? 200_000);
  const FULL = process.env["FUZZ_FULL"] === "1";

  test(`${COUNT} seeded random byte strings (seed ${SEED}) to every REST route and every gRPC method get well-formed answers`, async () => {
    const rnd = prng(SEED);
    const methods = registeredMethods();
    expect(methods.length).toBeGreaterThanOrEqual(7);

    const routes: { method: DescMethod; binding: HttpBinding; template: PathTemplate }[] = methods.flatMap((m) =>
      readHttpBindings(m, apiRegistry).map((binding) => ({ method: m, binding, template: compilePathTemplate(binding.pattern) })),
    );
    expect(routes.map((r) => `${r.binding.method} ${r.binding.pattern}`)).toEqual(
      expect.arrayContaining(["POST /api/v1/diagnostics", "GET /api/v1/operations/{id}:watch", "POST /api/v1/operations/{id}:cancel"]),
    );

    const findings: Finding[] = [];
    const startedOps = new Set<string>();
    const stats = new Map<string, number>();
    const count = (k: string): void => void stats.set(k, (stats.get(k) ?? 0) + 1);
    const agent = new Agent({ keepAlive: true, maxSockets: 64, ca: d.certificate, checkServerIdentity: () => undefined });
    const grpcClients = [
      new grpc.Client(d.endpoints.grpc, d.channelCredentials()),
      new grpc.Client(`unix:${d.endpoints.socket}`, grpc.credentials.createInsecure()),
    ];
    const canceller = d.grpcUnix();
    const cancels: Promise<unknown>[] = [];
    const noteOperation = (id: string): void => {
      if (startedOps.has(id)) return;
      startedOps.add(id);
      // Random input may start an operation (a diagnostics run, say); stop it at once so the fuzz
      // does not spend its time writing probes.
      cancels.push(canceller.operations.cancelOperation({ id }).catch(() => undefined));
    };
    // Answers repeat (a page of operations only changes when one starts), so each distinct
    // answer is validated once.
    const validated = new Map<string, string | undefined>();
    const validJson = (typeName: string, json: unknown): string | undefined => {
      try {
        jsonToBinary(typeName, json as JsonValue);
        return undefined;
      } catch (e) {
        return `not a valid ${typeName}: ${(e as Error).message}`;
      }
    };
    const validJsonText = (typeName: string, text: string): string | undefined => {
      const key = `${typeName} ${text}`;
      if (validated.has(key)) return validated.get(key);
      let problem: string | undefined;
      try {
        problem = validJson(typeName, JSON.parse(text));
      } catch {
        problem = `not JSON: ${JSON.stringify(text.slice(0, 200))}`;
      }
      validated.set(key, problem);
      return problem;
    };
    const validBinary = (desc: DescMethod["output"], bytes: Buffer): string | undefined => {
      const key = `${desc.typeName} ${bytes.toString("latin1")}`;
      if (validated.has(key)) return validated.get(key);
      let problem: string | undefined;
      try {
        fromBinary(desc, bytes);
      } catch (e) {
        problem = `answer does not decode as ${desc.typeName}: ${(e as Error).message}`;
      }
      validated.set(key, problem);
      return problem;
    };
    /** A well-formed REST error: {code, message} with a code that is not OK/UNKNOWN/INTERNAL, sent with the HTTP status of the shared table (4xx, or 503/504 for a host part that is away). */
    const checkErrorJson = (json: unknown, http: number): string | undefined => {
      const e = json as Partial<ErrorBody> | null;
      if (!e || typeof e.code !== "number" || typeof e.message !== "string" || e.message === "") return `error body without code/message: ${JSON.stringify(json)}`;
      if (e.code === 2 || e.code === 13 || e.code === 0) return `error code ${e.code}: ${e.message}`;
      if (http !== 0 && http !== httpStatusFor(e.code)) return `HTTP ${http} for code ${e.code}: ${e.message}`;
      if (http === 500) return `HTTP 500: ${e.message}`;
      return undefined;
    };

    /** Everything random about one REST call is decided here, in generation order, so a seed always replays the same calls. */
    const planRest = (route: (typeof routes)[number], body: Buffer): { path: string; sse: boolean } => {
      const { method, binding } = route;
      let path = route.template.expand(() => randomId(rnd));
      if (binding.body !== "*" && rnd() < 0.25) {
        // Also fuzz the query string: a field of the request (from its descriptor) set to the random bytes.
        const fields = method.input.fields;
        const f = fields[Math.floor(rnd() * fields.length)];
        if (f) path += `?${rnd() < 0.5 ? f.name : f.jsonName}=${encodeURIComponent(body.toString("latin1").slice(0, 64))}`;
      }
      return { path, sse: rnd() < 0.5 };
    };

    const restCall = (index: number, route: (typeof routes)[number], body: Buffer, plan: { path: string; sse: boolean }): Promise<void> => {
      const { method, binding } = route;
      const { path, sse } = plan;
      const streaming = method.methodKind === "server_streaming";
      const report = (problem: string): void => {
        findings.push({ where: `REST ${binding.method} ${binding.pattern} (${path.slice(0, 80)})`, index, input: body.toString("hex"), problem });
      };
      return new Promise<void>((resolve) => {
        let finished = false;
        let hungUp = false;
        const req = httpRequest(
          `${d.endpoints.rest}${path}`,
          {
            method: binding.method,
            agent,
            headers: {
              authorization: `Bearer ${d.adminToken}`,
              "content-type": "application/json",
              "content-length": body.length,
              accept: streaming && sse ? "text/event-stream" : "application/json",
            },
          },
          (res) => {
            const status = res.statusCode ?? 0;
            count(`REST ${status}`);
            let text = "";
            res.setEncoding("utf8");
            const finish = (): void => {
              if (finished) return;
              finished = true;
              if (status >= 200 && status < 300 && streaming) {
                // First frame: {"result": OperationEvent} or {"error": Status}.
                const frame = sse ? text.split("\n\n")[0]!.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n") : text.split("\n")[0]!;
                let parsed: { result?: unknown; error?: unknown };
                try {
                  parsed = JSON.parse(frame) as typeof parsed;
                } catch {
                  if (text === "") return; // ended without a message: nothing wrong with that
                  report(`stream frame is not JSON: ${JSON.stringify(text.slice(0, 200))}`);
                  return;
                }
                if (parsed.error !== undefined) {
                  const p = checkErrorJson(parsed.error, 0);
                  if (p) report(p);
                } else {
                  const p = validJson(method.output.typeName, parsed.result);
                  if (p) report(p);
                  const op = (parsed.result as { attached?: { id?: string } } | undefined)?.attached;
                  if (startsOperations(method) && op?.id) noteOperation(op.id);
                }
                return;
              }
              if (status >= 200 && status < 300) {
                const p = validJsonText(method.output.typeName, text);
                if (p) report(`HTTP ${status}: ${p}`);
                return;
              }
              let json: unknown;
              try {
                json = JSON.parse(text);
              } catch {
                report(`HTTP ${status} body is not JSON: ${JSON.stringify(text.slice(0, 200))}`);
                return;
              }
              const p = checkErrorJson(json, status);
              if (p) report(p);
            };
            res.on("data", (chunk: string) => {
              text += chunk;
              if (streaming && status === 200 && text.includes(sse ? "\n\n" : "\n")) {
                finish();
                hungUp = true;
                req.destroy(); // cancel the stream after its first message
                resolve();
              }
            });
            res.on("end", () => {
              finish();
              resolve();
            });
            res.on("error", (e) => {
              if (!hungUp) report(`response failed: ${e.message}`);
              resolve();
            });
            res.on("close", () => {
              if (!hungUp && !finished) report("the connection closed before the answer was complete");
              resolve();
            });
          },
        );
        req.on("error", (e) => {
          if (!hungUp) report(`request failed: ${e.message}`);
          resolve();
        });
        req.end(body);
      });
    };

    const ident = (b: Buffer): Buffer => b;
    const grpcCall = (index: number, method: DescMethod, frame: Buffer): Promise<void> => {
      const path = `/${method.parent.typeName}/${method.name}`;
      const client = grpcClients[index % grpcClients.length]!;
      const report = (problem: string): void => {
        findings.push({ where: `gRPC ${path}`, index, input: frame.toString("hex"), problem });
      };
      const checkAnswer = (bytes: Buffer): void => {
        const p = validBinary(method.output, bytes);
        if (p) report(p);
      };
      const checkError = (err: grpc.ServiceError): void => {
        count(`gRPC ${grpc.status[err.code]}`);
        if (err.code === grpc.status.UNKNOWN || err.code === grpc.status.INTERNAL) {
          report(`${grpc.status[err.code]}: ${err.details}`);
          return;
        }
        try {
          const st = statusOf(err);
          if (st.code !== err.code) report(`status details say ${st.code}, the call ${err.code}`);
          errorInfoOf(st);
        } catch (e) {
          report(`${grpc.status[err.code]} without a decodable google.rpc.Status: ${(e as Error).message} (${err.details})`);
        }
      };
      return new Promise<void>((resolve) => {
        const options = { deadline: Date.now() + 60_000 };
        if (method.methodKind !== "server_streaming") {
          client.makeUnaryRequest(path, ident, ident, frame, new grpc.Metadata(), options, (err, res) => {
            if (err) checkError(err);
            else {
              count("gRPC OK");
              checkAnswer(res!);
            }
            resolve();
          });
          return;
        }
        let cancelled = false;
        const call = client.makeServerStreamRequest(path, ident, ident, frame, new grpc.Metadata(), options);
        call.on("data", (msg: Buffer) => {
          if (cancelled) return;
          cancelled = true;
          count("gRPC stream message");
          checkAnswer(msg);
          if (startsOperations(method)) {
            const ev = fromBinary(method.output, msg) as { event?: { case?: string; value?: { id?: string } } };
            if (ev.event?.case === "attached" && ev.event.value?.id) noteOperation(ev.event.value.id);
          }
          call.cancel();
        });
        call.on("error", (err: grpc.ServiceError) => {
          if (!(cancelled && err.code === grpc.status.CANCELLED)) checkError(err);
          resolve();
        });
        call.on("status", () => resolve());
        call.on("end", () => resolve());
      });
    };

    // grpc-js builds an Error (with a source-mapped stack under jest) for every failed call; the
    // stacks are useless here and cost more than the calls.
    const stackTraceLimit = Error.stackTraceLimit;
    Error.stackTraceLimit = 0;
    const t0 = performance.now();
    const corpus = Array.from({ length: COUNT }, () => randomBytes(rnd));
    const targets = routes.length + methods.length;
    const perTarget = FULL ? COUNT : Math.min(COUNT, Math.floor(BUDGET / targets));
    const used = new Uint8Array(COUNT);
    function* tasks(): Generator<() => Promise<void>> {
      // Round by round, so every target is exercised all along (and alongside operations that random input started).
      for (let round = 0; round < perTarget; round++) {
        let j = 0;
        for (const r of routes) {
          const i = (j++ * perTarget + round) % COUNT;
          used[i] = 1;
          const plan = planRest(r, corpus[i]!);
          yield () => restCall(i, r, corpus[i]!, plan);
        }
        for (const m of methods) {
          const i = (j++ * perTarget + round) % COUNT;
          used[i] = 1;
          yield () => grpcCall(i, m, corpus[i]!);
        }
      }
    }
    await pool(tasks(), 32);
    const seconds = (performance.now() - t0) / 1000;
    Error.stackTraceLimit = stackTraceLimit;
    await Promise.all(cancels);

    // Random input may have started operations: cancel any still going and wait for their end.
    const unfinished = async (): Promise<string[]> => {
      const ids: string[] = [];
      for (const state of [OperationState.OPERATION_STATE_PENDING, OperationState.OPERATION_STATE_RUNNING]) {
        const page = await canceller.operations.listOperations(ListOperationsRequest.fromPartial({ state, pageSize: 1000 }));
        ids.push(...page.operations.map((o) => o.id));
      }
      return ids;
    };
    for (const id of await unfinished()) {
      const op = { id };
      await canceller.operations.cancelOperation({ id: op.id }).catch(() => undefined);
      for await (const _ of canceller.operations.watchOperation({ id: op.id, afterSequence: 0 })) {
        // until the outcome
      }
    }
    expect(await unfinished()).toEqual([]);
    const probes = await readdir(join(d.stateDir, "tmp")).catch(() => [] as string[]);
    expect(probes.filter((n) => n.endsWith(".probe"))).toEqual([]);

    const total = perTarget * targets;
    // Every input was sent somewhere; with few enough targets, everywhere.
    expect(used.reduce((a, b) => a + b, 0)).toBe(Math.min(COUNT, total));
    process.stdout.write(
      `fuzz: seed ${SEED}, ${COUNT} inputs, ${perTarget} to each of ${routes.length} routes + ${methods.length} methods = ${total} calls in ${seconds.toFixed(1)} s ` +
        `(${Math.round(total / seconds)}/s); ${startedOps.size} operations started by random input; answers: ${JSON.stringify(Object.fromEntries([...stats].sort()))}\n`,
    );
    expect(findings.slice(0, 10)).toEqual([]);
    expect(findings.length).toBe(0);

    // The daemon is alive and still answers.
    expect(d.proc.exitCode).toBeNull();
    expect(d.proc.signalCode).toBeNull();
    expect(() => process.kill(d.proc.pid!, 0)).not.toThrow();
    const health = await d.grpcTcp().system.getHealth({});
    expect(health.checks.length).toBeGreaterThan(0);
    const restHealth = await d.fetch("/api/v1/health", {}, { token: null });
    expect(restHealth.status).toBe(200);
    // Nothing it logged was an internal error or a crash.
    const bad = d
      .output()
      .split("\n")
      .filter((l) => /"level":(50|60)/.test(l) || /^piccolod: fatal/.test(l));
    expect(bad.slice(0, 5)).toEqual([]);

    agent.destroy();
    for (const c of grpcClients) c.close();
  }, 1_800_000); // about four minutes on an idle 2-core machine; generous for a shared one
});

/**
 * The API services (from the descriptors) the daemon has registered: those grpc.health.v1 reports
 * SERVING. (Server reflection is no help here: it lists every service in the descriptor set.)
 */
async function listServedServices(): Promise<string[]> {
  const pkg = loadSync(join(ROOT, "node_modules/grpc-health-check/proto/health/v1/health.proto"), { enums: String });
  const proto = grpc.loadPackageDefinition(pkg) as unknown as {
    grpc: { health: { v1: { Health: new (t: string, c: grpc.ChannelCredentials) => grpc.Client & Record<string, Function> } } };
  };
  const client = new proto.grpc.health.v1.Health(d.endpoints.grpc, d.channelCredentials({ token: null }));
  const names: string[] = [];
  for (const t of apiRegistry) if (t.kind === "service") names.push(t.typeName);
  try {
    const serving = await Promise.all(
      names.map(
        (service) =>
          new Promise<boolean>((resolve) =>
            client["check"]!({ service }, (e: grpc.ServiceError | null, r: { status: string }) => resolve(!e && r.status === "SERVING")),
          ),
      ),
    );
    return names.filter((_, i) => serving[i]);
  } finally {
    client.close();
  }
}
