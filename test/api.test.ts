/**
 * The API foundation end to end against the real daemon: the same answers over gRPC (unix socket
 * and TCP), REST (raw HTTP and the generated client); grpc.health.v1 and server reflection for
 * generic tools.
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { join } from "node:path";
import { fromBinary } from "@bufbuild/protobuf";
import { FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { CheckStatus, HealthState } from "../gen/piccolo/system/v1/system.js";
import { channelCredentials } from "../src/clients/grpc-client.js";
import { ROOT, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

let d: TestDaemon;
beforeAll(async () => {
  d = await startTestDaemon();
});
afterAll(async () => {
  await d.cleanup();
});

const stableHealth = (h: { state: number; checks: { name: string; status: number; detail: string; required: boolean }[] }) => ({
  state: h.state,
  checks: h.checks.map((c) => ({ name: c.name, status: c.status, detail: c.detail, required: c.required })),
});

test("GetVersion answers the same over the unix socket, TCP, REST and raw HTTP", async () => {
  const unix = await d.grpcUnix().system.getVersion({});
  const tcp = await d.grpcTcp().system.getVersion({});
  const rest = await d.rest().system.getVersion();
  const raw = (await (await d.fetch("/api/v1/version")).json()) as Record<string, unknown>;
  expect(unix.nodeVersion).toBe(process.version);
  expect(unix.version).toMatch(/^\d+\.\d+\.\d+/);
  expect(unix.os?.id).not.toBe("");
  expect(tcp).toEqual(unix);
  expect(rest).toEqual(unix);
  expect(raw["version"]).toBe(unix.version);
  expect(raw["nodeVersion"]).toBe(process.version);
  expect((raw["os"] as Record<string, string>)["versionId"]).toBe(unix.os?.versionId);
});

test("GetHealth answers the same over every transport and names each check", async () => {
  const unix = await d.grpcUnix().system.getHealth({});
  const tcp = await d.grpcTcp().system.getHealth({});
  const rest = await d.rest().system.getHealth();
  expect(stableHealth(tcp)).toEqual(stableHealth(unix));
  expect(stableHealth(rest)).toEqual(stableHealth(unix));
  expect(unix.checks.map((c) => c.name)).toEqual([
    "running_as_root",
    "state_dir_writable",
    "docker_socket",
    "system_bus",
    "tpm_device",
    "boot_disk",
  ]);
  const state = unix.checks.find((c) => c.name === "state_dir_writable")!;
  expect(state.status).toBe(CheckStatus.CHECK_STATUS_PASS);
  expect(state.required).toBe(true);
  expect(state.detail).toContain(d.stateDir);
  expect([HealthState.HEALTH_STATE_HEALTHY, HealthState.HEALTH_STATE_DEGRADED]).toContain(unix.state);
});

test("the unix socket is mode 0600", async () => {
  const { statSync } = await import("node:fs");
  expect(statSync(d.endpoints.socket).mode & 0o777).toBe(0o600);
});

test("grpc.health.v1 says SERVING for the server and each service", async () => {
  const pkg = protoLoader.loadSync(join(ROOT, "node_modules/grpc-health-check/proto/health/v1/health.proto"), { enums: String });
  const proto = grpc.loadPackageDefinition(pkg) as unknown as {
    grpc: { health: { v1: { Health: new (t: string, c: grpc.ChannelCredentials) => grpc.Client & Record<string, Function> } } };
  };
  // Health checking is public: TLS, no token.
  const client = new proto.grpc.health.v1.Health(d.endpoints.grpc, channelCredentials({ endpoint: d.endpoints.grpc, ca: d.certificate }));
  const check = (service: string) =>
    new Promise<{ status: string }>((resolve, reject) =>
      client["check"]!({ service }, (e: Error | null, r: { status: string }) => (e ? reject(e) : resolve(r))),
    );
  expect((await check("")).status).toBe("SERVING");
  expect((await check("piccolo.system.v1.SystemService")).status).toBe("SERVING");
  expect((await check("piccolo.operations.v1.OperationsService")).status).toBe("SERVING");
  await expect(check("no.such.Service")).rejects.toMatchObject({ code: grpc.status.NOT_FOUND });
  client.close();
});

test("server reflection lists the services and serves their descriptors", async () => {
  const pkg = protoLoader.loadSync(join(ROOT, "node_modules/@grpc/reflection/build/proto/grpc/reflection/v1/reflection.proto"), {
    keepCase: true,
  });
  const proto = grpc.loadPackageDefinition(pkg) as unknown as {
    grpc: { reflection: { v1: { ServerReflection: new (t: string, c: grpc.ChannelCredentials) => grpc.Client & Record<string, Function> } } };
  };
  const client = new proto.grpc.reflection.v1.ServerReflection(`unix:${d.endpoints.socket}`, grpc.credentials.createInsecure());
  const ask = (req: Record<string, string>) =>
    new Promise<Record<string, any>>((resolve, reject) => {
      const call = client["ServerReflectionInfo"]!() as grpc.ClientDuplexStream<unknown, Record<string, any>>;
      call.on("data", (r) => {
        resolve(r);
        call.end();
      });
      call.on("error", reject);
      call.write(req);
    });
  const list = await ask({ list_services: "" });
  const names = (list["list_services_response"]["service"] as { name: string }[]).map((s) => s.name);
  expect(names).toEqual(expect.arrayContaining(["piccolo.system.v1.SystemService", "piccolo.operations.v1.OperationsService"]));
  const file = await ask({ file_containing_symbol: "piccolo.system.v1.SystemService.GetVersion" });
  const protos = (file["file_descriptor_response"]["file_descriptor_proto"] as Buffer[]).map((b) => fromBinary(FileDescriptorProtoSchema, b));
  expect(protos[0]!.name).toBe("piccolo/system/v1/system.proto");
  expect(protos[0]!.service[0]!.method.map((m) => m.name)).toEqual(["GetVersion", "GetHealth", "RunDiagnostics"]);
  // Its imports come along, so a tool can build the whole descriptor.
  expect(protos.map((p) => p.name)).toEqual(expect.arrayContaining(["piccolo/operations/v1/operations.proto", "google/api/annotations.proto"]));
  const missing = await ask({ file_containing_symbol: "no.such.Symbol" });
  expect(missing["error_response"]["error_code"]).toBe(grpc.status.NOT_FOUND);
  client.close();
});

test("the REST gateway answers 404 JSON for an unknown route and 405 for a wrong method", async () => {
  const r404 = await d.fetch("/api/v1/nope");
  expect(r404.status).toBe(404);
  expect(await r404.json()).toMatchObject({ code: 5, message: expect.stringContaining("/api/v1/nope") });
  const r405 = await d.fetch("/api/v1/version", { method: "DELETE" });
  expect(r405.status).toBe(405);
  expect(r405.headers.get("allow")).toBe("GET");
});
