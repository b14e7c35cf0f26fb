/**
 * The auth matrix, generated from the proto descriptors (src/common/access.ts apiMethods()), so an
 * RPC added later is covered without editing this test: every RPC the daemon serves, over gRPC
 * (TCP, TLS) and REST (every google.api.http binding), with no token, an expired token, a token
 * with a forged signature, a token of too low a role, and a token of the right role. Only the last
 * gets past authentication (request contents are empty, so "past" means any answer but
 * UNAUTHENTICATED / PERMISSION_DENIED); every denial is UNAUTHENTICATED/401 or
 * PERMISSION_DENIED/403 and leaves an audit record naming the method, the transport and why.
 */
import * as grpc from "@grpc/grpc-js";
import type { DescMethod } from "@bufbuild/protobuf";
import { generateKeyPairSync } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { decodeJwt, decodeProtectedHeader, SignJWT } from "jose";
import { Role } from "../gen/piccolo/common/v1/access.js";
import { apiMethods, declaredRole } from "../src/common/access.js";
import { compilePathTemplate, readHttpBindings } from "../src/common/http-rule.js";
import { apiRegistry } from "../src/common/proto-registry.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

let d: TestDaemon;
let work: string;
beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-auth-matrix-"));
  // No Docker engine (its socket cannot exist): container RPCs answer UNAVAILABLE once past auth.
  d = await startTestDaemon({ extraArgs: ["--docker-socket", join(work, "no-docker.sock"), "--container-data-roots", join(work, "data")] });
}, 60_000);
afterAll(async () => {
  await d?.cleanup();
  await rm(work, { recursive: true, force: true });
});

type Case = "none" | "expired" | "forged" | "low" | "right";
const ROLE_NAMES: Partial<Record<Role, "reader" | "operator" | "admin">> = {
  [Role.ROLE_READER]: "reader",
  [Role.ROLE_OPERATOR]: "operator",
  [Role.ROLE_ADMIN]: "admin",
};
/** The role just below each role a token can have; READER and PUBLIC have none. */
const BELOW: Partial<Record<Role, Role>> = { [Role.ROLE_OPERATOR]: Role.ROLE_READER, [Role.ROLE_ADMIN]: Role.ROLE_OPERATOR };

/** What auth should do with a case: let it through, or deny it with this code and reason. */
function expected(need: Role, c: Case): { pass: true } | { pass: false; code: "UNAUTHENTICATED" | "PERMISSION_DENIED"; reason: string } {
  switch (c) {
    case "none":
      return need === Role.ROLE_PUBLIC ? { pass: true } : { pass: false, code: "UNAUTHENTICATED", reason: "TOKEN_MISSING" };
    case "expired":
      return { pass: false, code: "UNAUTHENTICATED", reason: "TOKEN_EXPIRED" };
    case "forged":
      return { pass: false, code: "UNAUTHENTICATED", reason: "TOKEN_BAD_SIGNATURE" };
    case "low":
      return { pass: false, code: "PERMISSION_DENIED", reason: "ROLE_TOO_LOW" };
    case "right":
      return { pass: true };
  }
}

/** Runs `jobs` with at most `n` at a time. */
async function pool<T>(n: number, jobs: (() => Promise<T>)[]): Promise<T[]> {
  const out: T[] = [];
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < jobs.length) {
        const i = next++;
        out[i] = await jobs[i]!();
      }
    }),
  );
  return out;
}

/** The gRPC code of one call with an empty request (OK when it answered or streamed a first message). */
function grpcCall(client: grpc.Client, path: string, streaming: boolean): Promise<number> {
  const id = (b: Buffer): Buffer => b;
  const deadline = { deadline: Date.now() + 60_000 };
  return new Promise((resolve) => {
    if (!streaming) {
      client.makeUnaryRequest(path, id, id, Buffer.alloc(0), new grpc.Metadata(), deadline, (err) => resolve(err ? err.code : grpc.status.OK));
      return;
    }
    const call = client.makeServerStreamRequest(path, id, id, Buffer.alloc(0), new grpc.Metadata(), deadline);
    let done = false;
    call.on("data", () => {
      if (done) return;
      done = true;
      resolve(grpc.status.OK);
      call.cancel();
    });
    call.on("error", (e: grpc.ServiceError) => {
      if (!done) resolve(e.code);
      done = true;
    });
    call.on("status", (s: grpc.StatusObject) => {
      if (!done) resolve(s.code);
      done = true;
    });
  });
}

test("every RPC over gRPC and REST: only a token of the right role gets past auth, and every denial is audited", async () => {
  // The RPCs the daemon serves: every API method the descriptors have whose service it registered.
  const served = new Set(await servedServices());
  const methods = [...apiMethods()].filter(([, m]) => served.has(m.parent.typeName));
  expect(methods.length).toBeGreaterThan(20);
  expect(methods.map(([p]) => p)).toEqual(expect.arrayContaining(["/piccolo.auth.v1.AuthService/CreateToken", "/piccolo.system.v1.SystemService/GetVersion"]));

  // Tokens: one per role, one that has expired, and one signed by another key with claims the daemon would accept.
  const tokens: Record<"reader" | "operator" | "admin", string> = {
    reader: await d.token("reader"),
    operator: await d.token("operator"),
    admin: await d.token("admin"),
  };
  const expired = await d.token("admin", 1, "soon-expired");
  const real = decodeJwt(tokens.admin);
  const foreign = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
  const forged = await new SignJWT({ ...real })
    .setProtectedHeader({ ...decodeProtectedHeader(tokens.admin), alg: "ES256" })
    .sign(foreign);
  expect(forged.split(".")[1]).toBe(tokens.admin.split(".")[1]); // same claims, only the signature differs
  await new Promise((r) => setTimeout(r, 2500)); // let the 1 s token expire

  const tokenFor = (need: Role, c: Case): string | null => {
    switch (c) {
      case "none":
        return null;
      case "expired":
        return expired;
      case "forged":
        return forged;
      case "low":
        return tokens[ROLE_NAMES[BELOW[need]!]!];
      case "right":
        return need === Role.ROLE_PUBLIC ? null : tokens[ROLE_NAMES[need]!];
    }
  };
  const casesFor = (need: Role): Case[] => ["none", "expired", "forged", ...(BELOW[need] !== undefined ? (["low"] as const) : []), "right"];

  const grpcClients = new Map<string | null, grpc.Client>();
  const grpcClient = (token: string | null): grpc.Client => {
    let c = grpcClients.get(token);
    if (!c) grpcClients.set(token, (c = new grpc.Client(d.endpoints.grpc, d.channelCredentials({ token }), { "grpc.ssl_target_name_override": "localhost" })));
    return c;
  };

  interface Result {
    readonly where: string;
    readonly method: string;
    readonly transport: "grpc-tcp" | "rest";
    readonly need: string;
    readonly c: Case;
    readonly got: string;
  }
  const jobs: (() => Promise<Result>)[] = [];
  for (const [path, m] of methods) {
    const need = declaredRole(m);
    expect({ path, need }).not.toEqual({ path, need: Role.ROLE_UNSPECIFIED });
    const streaming = m.methodKind === "server_streaming";
    for (const c of casesFor(need)) {
      const token = tokenFor(need, c);
      jobs.push(async () => {
        const code = await grpcCall(grpcClient(token), path, streaming);
        return { where: `gRPC ${path}`, method: path.slice(1), transport: "grpc-tcp", need: Role[need], c, got: grpc.status[code] ?? String(code) };
      });
      for (const b of readHttpBindings(m as DescMethod, apiRegistry)) {
        const url = compilePathTemplate(b.pattern).expand(() => "x");
        jobs.push(async () => {
          const res = await d.fetch(url, { method: b.method, ...(b.body !== "" ? { body: "{}", headers: { "content-type": "application/json" } } : {}) }, { token });
          await res.body?.cancel();
          return { where: `REST ${b.method} ${b.pattern}`, method: path.slice(1), transport: "rest", need: Role[need], c, got: String(res.status) };
        });
      }
    }
  }
  const results = await pool(6, jobs);
  for (const c of grpcClients.values()) c.close();

  const wrong: unknown[] = [];
  const denials: Result[] = [];
  for (const r of results) {
    const e = expected(Role[r.need as keyof typeof Role], r.c);
    const denied = ["UNAUTHENTICATED", "PERMISSION_DENIED", "401", "403"].includes(r.got);
    if (e.pass) {
      if (denied) wrong.push({ ...r, want: "past auth" });
    } else {
      const want = r.transport === "rest" ? (e.code === "UNAUTHENTICATED" ? "401" : "403") : e.code;
      if (r.got !== want) wrong.push({ ...r, want });
      else denials.push(r);
    }
  }
  process.stdout.write(
    `auth matrix: ${methods.length} RPCs, ${results.length} calls (${results.filter((r) => r.transport === "rest").length} REST), ${denials.length} denied as expected, ` +
      `answers past auth: ${JSON.stringify(Object.fromEntries([...new Set(results.filter((r) => r.c === "right").map((r) => r.got))].map((g) => [g, results.filter((r) => r.c === "right" && r.got === g).length])))}\n`,
  );
  expect(wrong).toEqual([]);
  expect(denials.length).toBeGreaterThan(4 * methods.length);
  expect(results.filter((r) => r.transport === "rest").length).toBeGreaterThan(4 * 20);

  // Every denial wrote one audit record naming the method, the transport and why.
  const records = (await readFile(join(d.stateDir, "audit.log"), "utf8"))
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as { method: string; transport: string; result: string; reason?: string; actor: string });
  const denialRecords = records.filter((r) => r.result === "UNAUTHENTICATED" || r.result === "PERMISSION_DENIED");
  const key = (method: string, transport: string, reason: string | undefined): string => `${method} ${transport} ${reason}`;
  const have = new Map<string, number>();
  for (const r of denialRecords) have.set(key(r.method, r.transport, r.reason), (have.get(key(r.method, r.transport, r.reason)) ?? 0) + 1);
  const missing: string[] = [];
  for (const r of denials) {
    const e = expected(Role[r.need as keyof typeof Role], r.c);
    const k = key(r.method, r.transport, e.pass ? "" : e.reason);
    const n = have.get(k) ?? 0;
    if (n === 0) missing.push(`${r.where} (${r.c})`);
    else have.set(k, n - 1);
  }
  expect(missing).toEqual([]);
  expect(denialRecords.length).toBe(denials.length);
  expect(denialRecords.every((r) => r.actor.startsWith("tcp:") || r.actor.startsWith("rest:"))).toBe(true);
}, 300_000);

/** API services the daemon registered: those grpc.health.v1 reports SERVING over the unix socket. */
async function servedServices(): Promise<string[]> {
  const { HealthClient } = await import("../gen/health/v1/health.js");
  const client = new HealthClient(`unix:${d.endpoints.socket}`, grpc.credentials.createInsecure());
  const names = [...new Set([...apiMethods().values()].map((m) => m.parent.typeName))];
  try {
    const serving = await Promise.all(
      names.map(
        (service) => new Promise<boolean>((resolve) => client.check({ service }, (e, r) => resolve(!e && r.status === 1 /* SERVING */))),
      ),
    );
    return names.filter((_, i) => serving[i]);
  } finally {
    client.close();
  }
}
