/**
 * The engine going away: killing dockerd (SIGKILL) in the middle of StreamLogs, WatchEvents and
 * a PullImage ends each with UNAVAILABLE naming the engine's socket, the daemon stays up and
 * healthy (reporting the engine as missing), and everything works again once dockerd is back.
 * An engine that is not there at all is UNAVAILABLE over gRPC and HTTP 503 over REST.
 */
import * as grpc from "@grpc/grpc-js";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  ContainerServiceService,
  EnsureRunningAction,
  RestartPolicy,
  type ContainerEvent,
  type ContainerSpec,
  type LogEntry,
} from "../gen/piccolo/containers/v1/containers.js";
import { ContainerServiceRestClient } from "../gen/piccolo/containers/v1/containers_rest.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { CheckStatus } from "../gen/piccolo/system/v1/system.js";
import { createPromiseClient, type PromiseClient } from "../src/clients/grpc-client.js";
import { createRestTransport, type RestError } from "../src/clients/rest-transport.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { startDockerd, startRegistry, startThrottledProxy, type TestDockerd, type TestRegistry, type ThrottledProxy } from "./helpers/dockerd.js";

type Client = PromiseClient<typeof ContainerServiceService>;

let engine: TestDockerd;
let registry: TestRegistry;
let proxy: ThrottledProxy;
let d: TestDaemon;
let clients: ReturnType<TestDaemon["grpcUnix"]>;
let api: Client;
let rest: ContainerServiceRestClient;
let work: string;

const IMAGE = "piccolo-test/tiny:1";

const spec = (name: string, command: string[]): ContainerSpec => ({
  name,
  image: IMAGE,
  command,
  entrypoint: [],
  env: {},
  ports: [],
  mounts: [],
  restartPolicy: RestartPolicy.RESTART_POLICY_NO,
  restartMaxRetries: 0,
  resources: undefined,
  labels: {},
  network: "none",
  healthcheck: undefined,
  privileged: false,
  pidMode: "",
  ipcMode: "",
});

// It stops on SIGTERM, so a restarted engine does not wait 10 s before killing it.
const CHATTY = ["sh", "-c", 'trap "exit 0" TERM; i=0; while true; do echo "line $i"; i=$((i+1)); sleep 0.1; done'];

beforeAll(async () => {
  engine = await startDockerd();
  registry = await startRegistry(join(engine.dir, "registry"));
  work = await mkdtemp(join(tmpdir(), "piccolod-res-"));
  await engine.makeImage(IMAGE);
  // One 8 MB layer in the registry, pulled through a 1 MB/s proxy: slow enough to interrupt.
  const ctx = join(work, "ctx");
  await mkdir(ctx);
  await writeFile(join(ctx, "blob"), randomBytes(8 * 1024 * 1024));
  await writeFile(join(ctx, "Dockerfile"), "FROM scratch\nCOPY blob /blob\n");
  await engine.dockerOk(["build", "-q", "-t", `${registry.address}/slow:1`, ctx]);
  await engine.dockerOk(["push", `${registry.address}/slow:1`]);
  await engine.dockerOk(["rmi", `${registry.address}/slow:1`]);
  await engine.dockerOk(["image", "prune", "-f"]);
  proxy = await startThrottledProxy(Number(registry.address.split(":")[1]), 1000 * 1000);
  d = await startTestDaemon({ extraArgs: ["--docker-socket", engine.socket, "--container-data-roots", join(work, "data")] });
  clients = d.grpcUnix();
  api = createPromiseClient(clients.channel, ContainerServiceService);
  rest = new ContainerServiceRestClient(createRestTransport({ baseUrl: d.endpoints.rest, token: d.adminToken, fetch: d.pinnedFetch }));
}, 180_000);

afterAll(async () => {
  await d?.cleanup();
  await proxy?.stop();
  await registry?.stop();
  await engine?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

/** Reads a stream in the background; `error` is what it ended with. */
function follow<T>(it: AsyncIterable<T>): { items: T[]; ended: Promise<unknown> } {
  const items: T[] = [];
  const ended = (async () => {
    try {
      for await (const x of it) items.push(x);
      return undefined;
    } catch (e) {
      return e;
    }
  })();
  return { items, ended };
}

async function until(pred: () => boolean, what: string, timeoutMs = 20_000): Promise<void> {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** The daemon answers and reports the engine's state in its health checks. */
async function dockerCheck(): Promise<CheckStatus> {
  const h = await clients.system.getHealth({});
  return h.checks.find((c) => c.name === "docker_socket")!.status;
}

test("killing dockerd mid StreamLogs and WatchEvents ends both with UNAVAILABLE; the daemon stays healthy and works again when dockerd is back", async () => {
  const first = await api.ensureRunning({ spec: spec("chatty", CHATTY) });
  expect(first.action).toBe(EnsureRunningAction.ENSURE_RUNNING_ACTION_CREATED);
  const grpcLogs = follow<LogEntry>(api.streamLogs({ name: "chatty", follow: true, timestamps: false, tail: undefined, since: undefined }));
  const restLogs = follow<LogEntry>(rest.streamLogs({ name: "chatty", follow: true }));
  const events = follow<ContainerEvent>(api.watchEvents({ includeUnmanaged: true, since: undefined, name: "" }));
  await until(() => grpcLogs.items.length >= 5 && restLogs.items.length >= 5, "log lines");

  await engine.kill9();
  const grpcEnd = (await grpcLogs.ended) as grpc.ServiceError;
  expect(grpcEnd?.code).toBe(grpc.status.UNAVAILABLE);
  expect(grpcEnd.details).toContain(`Docker engine at ${engine.socket}`);
  const restEnd = (await restLogs.ended) as RestError;
  expect(restEnd?.code).toBe(grpc.status.UNAVAILABLE);
  expect(restEnd.message).toContain(engine.socket);
  const eventsEnd = (await events.ended) as grpc.ServiceError;
  expect(eventsEnd?.code).toBe(grpc.status.UNAVAILABLE);
  // The lines received before were whole and in order.
  const nums = grpcLogs.items.map((e) => Number(e.line.split(" ")[1]));
  expect(nums).toEqual([...nums].sort((a, b) => a - b));

  // The daemon is up: it answers, says the engine is missing, and fails container calls cleanly.
  expect(d.proc.exitCode).toBeNull();
  expect(await dockerCheck()).toBe(CheckStatus.CHECK_STATUS_WARN);
  const list = await api.listContainers({ includeUnmanaged: true }).catch((e: grpc.ServiceError) => e);
  expect(list).toMatchObject({ code: grpc.status.UNAVAILABLE, details: expect.stringContaining(engine.socket) });
  const r = await d.fetch("/api/v1/containers");
  expect(r.status).toBe(503);

  // dockerd is back: the same calls work; the container (stopped by the engine's restart) is
  // started again by EnsureRunning and its logs flow.
  await engine.restart();
  await new Promise((res) => setTimeout(res, 1100)); // the health result is cached for a second
  expect(await dockerCheck()).toBe(CheckStatus.CHECK_STATUS_PASS);
  expect((await api.listContainers({ includeUnmanaged: true })).containers.map((c) => c.name)).toContain("chatty");
  const again = await api.ensureRunning({ spec: spec("chatty", CHATTY) });
  expect(again.action).toBe(EnsureRunningAction.ENSURE_RUNNING_ACTION_STARTED);
  expect(again.container!.id).toBe(first.container!.id);
  const ac = new AbortController();
  const fresh: LogEntry[] = [];
  for await (const e of api.streamLogs({ name: "chatty", follow: true, timestamps: false, tail: 0, since: undefined }, { signal: ac.signal })) {
    fresh.push(e);
    if (fresh.length === 3) break;
  }
  ac.abort();
  expect(fresh).toHaveLength(3);
  expect((await engine.ps()).find((c) => c["Names"] === "chatty")!["State"]).toBe("running");
});

test("killing dockerd mid PullImage ends the operation with UNAVAILABLE; the pull works once dockerd is back", async () => {
  const ref = `127.0.0.1:${proxy.port}/slow:1`;
  const events: OperationEvent[] = [];
  let killed = false;
  for await (const e of api.pullImage({ reference: ref })) {
    events.push(e);
    if (!killed && e.progress && e.progress.phase === "download" && e.progress.bytesDone > 0) {
      killed = true;
      await engine.kill9();
    }
  }
  expect(killed).toBe(true);
  const end = events[events.length - 1]!.outcome!;
  expect(end.state).toBe(OperationState.OPERATION_STATE_FAILED);
  expect(end.error!.code).toBe(grpc.status.UNAVAILABLE);
  expect(end.error!.message).toContain(`Docker engine at ${engine.socket}`);
  // Progress had been made and was reported before the engine went away.
  const last = events.filter((e) => e.progress).pop()!.progress!;
  expect(last.bytesDone).toBeGreaterThan(0);
  expect(last.bytesDone).toBeLessThan(last.bytesTotal);
  const op = await clients.operations.getOperation({ id: events[0]!.operationId });
  expect(op.state).toBe(OperationState.OPERATION_STATE_FAILED);
  expect(d.proc.exitCode).toBeNull();
  expect((await clients.system.getVersion({})).version).not.toBe("");

  await engine.restart();
  const direct = `${registry.address}/slow:1`;
  const retry: OperationEvent[] = [];
  for await (const e of api.pullImage({ reference: direct })) retry.push(e);
  expect(retry[retry.length - 1]!.outcome!.state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  expect((await engine.images()).map((i) => `${i["Repository"]}:${i["Tag"]}`)).toContain(direct);
});

test("an engine that is not there: UNAVAILABLE naming the socket over gRPC, 503 over REST, and pulls fail the same way", async () => {
  const missing = join(work, "no-engine", "docker.sock");
  const lone = await startTestDaemon({ extraArgs: ["--docker-socket", missing, "--container-data-roots", join(work, "data")] });
  try {
    const c = createPromiseClient(lone.grpcUnix().channel, ContainerServiceService);
    const e = (await c.listContainers({ includeUnmanaged: false }).catch((x: unknown) => x)) as grpc.ServiceError;
    expect(e.code).toBe(grpc.status.UNAVAILABLE);
    expect(e.details).toBe(`Docker engine at ${missing} is unavailable: no socket there (ENOENT)`);
    const r = await lone.fetch("/api/v1/containers/anything");
    expect(r.status).toBe(503);
    expect(((await r.json()) as { message: string }).message).toContain(missing);
    const events: OperationEvent[] = [];
    for await (const ev of c.pullImage({ reference: "app:1" })) events.push(ev);
    expect(events[events.length - 1]!.outcome!.error).toMatchObject({ code: grpc.status.UNAVAILABLE, message: expect.stringContaining(missing) });
  } finally {
    await lone.cleanup();
  }
});
