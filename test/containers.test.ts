/**
 * Containers end to end: the real daemon against a real dockerd (test/helpers/dockerd.ts), with
 * every change the API makes checked through the docker CLI as an independent client, and every
 * change made with the CLI checked in ListContainers and WatchEvents. Life cycle over gRPC and
 * REST, logs with stdout and stderr apart, stats, the grace period, 20 concurrent EnsureRunning
 * calls, the engine's errors mapped, and each refused spec leaving the engine unchanged.
 */
import * as grpc from "@grpc/grpc-js";
import { mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BadRequest, ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import {
  ContainerEventType,
  ContainerServiceService,
  ContainerState,
  EnsureRunningAction,
  HealthStatus,
  LogStream,
  MountType,
  PortProtocol,
  RestartPolicy,
  type ContainerEvent,
  ContainerSpec,
  type LogEntry,
} from "../gen/piccolo/containers/v1/containers.js";
import { ContainerServiceRestClient } from "../gen/piccolo/containers/v1/containers_rest.js";
import { createPromiseClient, type PromiseClient } from "../src/clients/grpc-client.js";
import { createRestTransport, RestError } from "../src/clients/rest-transport.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { startDockerd, type TestDockerd } from "./helpers/dockerd.js";

type Client = PromiseClient<typeof ContainerServiceService>;

let engine: TestDockerd;
let d: TestDaemon;
let api: Client;
let rest: ContainerServiceRestClient;
let work: string;
let dataRoot: string;

const IMAGE = "piccolo-test/tiny:1";

beforeAll(async () => {
  engine = await startDockerd();
  await engine.makeImage(IMAGE, { files: { "etc/motd": "hello from the image\n" } });
  work = await mkdtemp(join(tmpdir(), "piccolod-ctr-"));
  dataRoot = join(work, "data");
  await mkdir(join(dataRoot, "app"), { recursive: true });
  await writeFile(join(dataRoot, "app/hello.txt"), "hello from the data root\n");
  d = await startTestDaemon({ extraArgs: ["--docker-socket", engine.socket, "--container-data-roots", dataRoot] });
  api = createPromiseClient(d.grpcUnix().channel, ContainerServiceService);
  rest = new ContainerServiceRestClient(createRestTransport({ baseUrl: d.endpoints.rest, token: d.adminToken, fetch: d.pinnedFetch }));
});

afterAll(async () => {
  await d?.cleanup();
  await engine?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

/** A spec with the defaults filled in. */
const spec = (s: Partial<ContainerSpec> & { name: string }): ContainerSpec => ({
  ...ContainerSpec.create(),
  image: IMAGE,
  network: "none",
  ...s,
});

/** A shell loop that writes one numbered line to stdout and one to stderr every 100 ms. */
const CHATTY = ["sh", "-c", 'i=0; while true; do echo "out $i"; echo "err $i" >&2; i=$((i+1)); sleep 0.1; done'];
const SLEEPER = ["sleep", "3600"];

/** `docker ps -a` reduced to what a change would alter, in a stable order. */
async function psSnapshot(): Promise<string[]> {
  return (await engine.ps()).map((c) => `${c["ID"]} ${c["Names"]} ${c["Image"]} ${c["State"]}`).sort();
}

/** `docker images` reduced to ids and tags, in a stable order. */
async function imagesSnapshot(): Promise<string[]> {
  return (await engine.images()).map((i) => `${i["ID"]} ${i["Repository"]}:${i["Tag"]}`).sort();
}

/** `docker inspect` of one container. */
async function inspect(name: string): Promise<any> {
  return (JSON.parse(await engine.dockerOk(["inspect", "--type", "container", name])) as any[])[0];
}

/** The gRPC error of a call, with the ErrorInfo and BadRequest it carries. */
async function failure(p: Promise<unknown> | AsyncIterable<unknown>): Promise<{ code: number; message: string; field: string; reason: string; badRequest: string[] }> {
  let err: grpc.ServiceError | undefined;
  try {
    if (Symbol.asyncIterator in p) {
      for await (const _ of p) {
        // drain until the error
      }
    } else await p;
  } catch (e) {
    err = e as grpc.ServiceError;
  }
  if (!err) throw new Error("expected the call to fail");
  const bin = err.metadata?.get("grpc-status-details-bin")[0] as Buffer | undefined;
  const status = bin ? Status.decode(bin) : { details: [] };
  let field = "";
  let reason = "";
  const badRequest: string[] = [];
  for (const any of status.details) {
    if (any.typeUrl.endsWith("google.rpc.ErrorInfo")) {
      const info = ErrorInfo.decode(any.value);
      field = info.metadata["field"] ?? "";
      reason = info.reason;
    }
    if (any.typeUrl.endsWith("google.rpc.BadRequest")) badRequest.push(...BadRequest.decode(any.value).fieldViolations.map((v) => v.field));
  }
  return { code: err.code, message: err.details, field, reason, badRequest };
}

/** Collects a stream in the background. */
function collect<T>(it: AsyncIterable<T>): { items: T[]; done: Promise<unknown> } {
  const items: T[] = [];
  const done = (async () => {
    try {
      for await (const x of it) items.push(x);
      return undefined;
    } catch (e) {
      return e;
    }
  })();
  return { items, done };
}

async function until(pred: () => boolean | Promise<boolean>, what: string, timeoutMs = 20_000): Promise<void> {
  const t0 = Date.now();
  while (!(await pred())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe("life cycle", () => {
  test("over gRPC: create → start → logs → stats → stop (grace) → remove, each step seen by the docker CLI", async () => {
    const created = await api.createContainer({
      spec: spec({
        name: "life-grpc",
        command: ["sh", "-c", 'cat /data/hello.txt; echo "env=$GREETING"; ' + CHATTY[2]!],
        env: { GREETING: "hi there" },
        labels: { app: "demo" },
        ports: [{ hostAddress: "127.0.0.1", hostPort: 18081, containerPort: 80, protocol: PortProtocol.PORT_PROTOCOL_TCP }],
        mounts: [
          { type: MountType.MOUNT_TYPE_BIND, source: join(dataRoot, "app"), target: "/data", readOnly: true },
          { type: MountType.MOUNT_TYPE_VOLUME, source: "life-grpc-vol", target: "/state", readOnly: false },
        ],
        restartPolicy: RestartPolicy.RESTART_POLICY_UNLESS_STOPPED,
        resources: { cpus: 0.5, memoryBytes: 64 * 1024 * 1024 },
      }),
    });
    expect(created.state).toBe(ContainerState.CONTAINER_STATE_CREATED);
    expect(created.managed).toBe(true);
    let cli = await inspect("life-grpc");
    expect(cli.Id).toBe(created.id);
    expect(cli.State.Status).toBe("created");
    expect(cli.Config.Labels).toMatchObject({ "space.piccolo.managed": "true", app: "demo" });
    expect(cli.Config.Env).toContain("GREETING=hi there");
    expect(cli.HostConfig.PortBindings).toEqual({ "80/tcp": [{ HostIp: "127.0.0.1", HostPort: "18081" }] });
    expect(cli.HostConfig.RestartPolicy.Name).toBe("unless-stopped");
    expect(cli.HostConfig.NanoCpus).toBe(500_000_000);
    expect(cli.HostConfig.Memory).toBe(64 * 1024 * 1024);
    expect(cli.HostConfig.Privileged).toBe(false);
    const mounts = (cli.Mounts as any[]).map((m) => ({ type: m.Type, source: m.Type === "bind" ? m.Source : m.Name, target: m.Destination, rw: m.RW }));
    expect(mounts).toEqual(
      expect.arrayContaining([
        { type: "bind", source: join(dataRoot, "app"), target: "/data", rw: false },
        { type: "volume", source: "life-grpc-vol", target: "/state", rw: true },
      ]),
    );
    // What GetContainer reads back is the spec that was asked for.
    const got = await api.getContainer({ name: "life-grpc" });
    expect(got.spec).toMatchObject({
      name: "life-grpc",
      image: IMAGE,
      labels: { app: "demo" },
      restartPolicy: RestartPolicy.RESTART_POLICY_UNLESS_STOPPED,
      resources: { cpus: 0.5, memoryBytes: 64 * 1024 * 1024 },
      ports: [{ hostAddress: "127.0.0.1", hostPort: 18081, containerPort: 80, protocol: PortProtocol.PORT_PROTOCOL_TCP }],
    });
    expect(got.spec!.env["GREETING"]).toBe("hi there");

    const started = await api.startContainer({ name: "life-grpc" });
    expect(started.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    cli = await inspect("life-grpc");
    expect(cli.State.Running).toBe(true);

    // Logs: wait until there is output, then read it without follow; stdout and stderr apart.
    await until(async () => (await engine.docker(["logs", "life-grpc"])).stderr.includes("err 5"), "output");
    const entries: LogEntry[] = [];
    for await (const e of api.streamLogs({ name: "life-grpc", follow: false, timestamps: true, tail: undefined, since: undefined })) entries.push(e);
    const out = entries.filter((e) => e.stream === LogStream.LOG_STREAM_STDOUT).map((e) => e.line);
    const err = entries.filter((e) => e.stream === LogStream.LOG_STREAM_STDERR).map((e) => e.line);
    expect(out.slice(0, 3)).toEqual(["hello from the data root", "env=hi there", "out 0"]);
    expect(err.slice(0, 3)).toEqual(["err 0", "err 1", "err 2"]);
    expect(out.every((l) => !l.startsWith("err"))).toBe(true);
    expect(err.every((l) => l.startsWith("err "))).toBe(true);
    expect(entries.every((e) => e.time instanceof Date && Math.abs(e.time.getTime() - Date.now()) < 60_000)).toBe(true);
    // The docker CLI prints the container's stdout on its stdout and stderr on its stderr: the same split.
    const dl = await engine.docker(["logs", "life-grpc"]);
    const cliOut = dl.stdout.split("\n").filter(Boolean);
    const cliErr = dl.stderr.split("\n").filter(Boolean);
    expect(out.slice(0, 5)).toEqual(cliOut.slice(0, 5));
    expect(err.slice(0, 5)).toEqual(cliErr.slice(0, 5));
    // tail: only the last lines.
    const tail: LogEntry[] = [];
    for await (const e of api.streamLogs({ name: "life-grpc", follow: false, timestamps: false, tail: 2, since: undefined })) tail.push(e);
    expect(tail).toHaveLength(2);
    expect(tail.every((e) => e.time === undefined)).toBe(true);
    // follow: new lines arrive live, numbered beyond what was there.
    const last = Number(out[out.length - 1]!.split(" ")[1]);
    const ac = new AbortController();
    const live: LogEntry[] = [];
    for await (const e of api.streamLogs({ name: "life-grpc", follow: true, timestamps: false, tail: 0, since: undefined }, { signal: ac.signal })) {
      live.push(e);
      if (live.filter((x) => x.stream === LogStream.LOG_STREAM_STDOUT).length >= 5) break;
    }
    ac.abort();
    const liveNums = live.filter((x) => x.stream === LogStream.LOG_STREAM_STDOUT).map((x) => Number(x.line.split(" ")[1]));
    expect(liveNums[0]).toBeGreaterThan(last);
    expect(liveNums).toEqual([...liveNums].sort((a, b) => a - b));

    // Stats: one sample, then a stream of samples a second apart.
    const one: unknown[] = [];
    for await (const s of api.getStats({ name: "life-grpc", stream: false })) one.push(s);
    expect(one).toHaveLength(1);
    expect(one[0]).toMatchObject({ id: created.id, name: "life-grpc", memoryLimitBytes: 64 * 1024 * 1024, onlineCpus: expect.any(Number) });
    expect((one[0] as any).memoryUsageBytes).toBeGreaterThan(0);
    expect((one[0] as any).pids).toBeGreaterThanOrEqual(2);
    const samples: { time?: Date }[] = [];
    for await (const s of api.getStats({ name: "life-grpc", stream: true })) {
      samples.push(s);
      if (samples.length === 2) break;
    }
    expect(samples[1]!.time!.getTime()).toBeGreaterThan(samples[0]!.time!.getTime());

    // Stop: the shell ignores SIGTERM, so the engine kills it when the 1 s grace period is over.
    const t0 = Date.now();
    const stopped = await api.stopContainer({ name: "life-grpc", gracePeriodSeconds: 1 });
    const took = Date.now() - t0;
    expect(took).toBeGreaterThanOrEqual(900);
    expect(took).toBeLessThan(8000);
    expect(stopped.state).toBe(ContainerState.CONTAINER_STATE_EXITED);
    expect(stopped.exitCode).toBe(137);
    cli = await inspect("life-grpc");
    expect(cli.State.Running).toBe(false);
    expect(cli.State.ExitCode).toBe(137);

    // Remove with its anonymous volumes; the named volume stays, as documented.
    const removed = await api.removeContainer({ name: "life-grpc", force: false, volumes: true });
    expect(removed.id).toBe(created.id);
    expect((await engine.ps()).map((c) => c["Names"])).not.toContain("life-grpc");
    expect(await engine.dockerOk(["volume", "ls", "-q"])).toContain("life-grpc-vol");
    const gone = await failure(api.getContainer({ name: "life-grpc" }));
    expect(gone.code).toBe(grpc.status.NOT_FOUND);
  });

  test("over REST: create → start → logs (NDJSON) → stats → restart → stop → remove", async () => {
    const created = await rest.createContainer({ spec: spec({ name: "life-rest", command: CHATTY }) });
    expect(created.state).toBe(ContainerState.CONTAINER_STATE_CREATED);
    expect((await inspect("life-rest")).State.Status).toBe("created");
    const started = await rest.startContainer({ name: "life-rest" });
    expect(started.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    const firstStart = (await inspect("life-rest")).State.StartedAt as string;
    await until(async () => (await engine.docker(["logs", "life-rest"])).stdout.includes("out 3"), "output");
    const lines: LogEntry[] = [];
    for await (const e of rest.streamLogs({ name: "life-rest", tail: 3 })) lines.push(e);
    expect(lines.some((e) => e.stream === LogStream.LOG_STREAM_STDOUT && e.line.startsWith("out "))).toBe(true);
    expect(lines.some((e) => e.stream === LogStream.LOG_STREAM_STDERR && e.line.startsWith("err "))).toBe(true);
    // The same stream as raw NDJSON, the way curl sees it.
    const raw = await (await d.fetch("/api/v1/containers/life-rest/logs?tail=2")).text();
    const frames = raw.trim().split("\n").map((l) => JSON.parse(l));
    expect(frames.map((f) => f.result.stream).sort()).toEqual(["LOG_STREAM_STDERR", "LOG_STREAM_STDOUT"]);
    // since: only what was written after that moment (a Timestamp in the query string).
    const cut = new Date();
    await new Promise((r) => setTimeout(r, 500));
    const recent: LogEntry[] = [];
    for await (const e of rest.streamLogs({ name: "life-rest", since: cut, timestamps: true })) recent.push(e);
    expect(recent.length).toBeGreaterThanOrEqual(4);
    expect(recent.every((e) => e.time!.getTime() >= cut.getTime() - 5)).toBe(true);
    expect(Number(recent[0]!.line.split(" ")[1])).toBeGreaterThan(3);
    const stats = [];
    for await (const s of rest.getStats({ name: "life-rest" })) stats.push(s);
    expect(stats).toHaveLength(1);
    expect(stats[0]!.memoryUsageBytes).toBeGreaterThan(0);

    const restarted = await rest.restartContainer({ name: "life-rest", gracePeriodSeconds: 0 });
    expect(restarted.state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    expect((await inspect("life-rest")).State.StartedAt).not.toBe(firstStart);

    const stopped = await rest.stopContainer({ name: "life-rest", gracePeriodSeconds: 0 });
    expect(stopped.state).toBe(ContainerState.CONTAINER_STATE_EXITED);
    expect((await inspect("life-rest")).State.Running).toBe(false);
    await rest.removeContainer({ name: "life-rest" });
    expect((await engine.ps()).map((c) => c["Names"])).not.toContain("life-rest");
    const res = await d.fetch("/api/v1/containers/life-rest");
    expect(res.status).toBe(404);
    expect(((await res.json()) as { message: string }).message).toContain("life-rest");
  });

  test("RemoveContainer of a running container needs force", async () => {
    await api.ensureRunning({ spec: spec({ name: "rm-running", command: SLEEPER }) });
    const e = await failure(api.removeContainer({ name: "rm-running", force: false, volumes: false }));
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(e.message).toMatch(/rm-running.*running.*force/);
    expect((await inspect("rm-running")).State.Running).toBe(true);
    await api.removeContainer({ name: "rm-running", force: true, volumes: false });
    expect((await engine.ps()).map((c) => c["Names"])).not.toContain("rm-running");
  });
});

describe("EnsureRunning", () => {
  test("20 concurrent calls for one name create exactly one container, and it runs", async () => {
    const calls = Array.from({ length: 20 }, (_, i) =>
      (i % 2 === 0 ? api.ensureRunning({ spec: spec({ name: "ensure-20", command: SLEEPER }) }) : rest.ensureRunning({ spec: spec({ name: "ensure-20", command: SLEEPER }) })),
    );
    const results = await Promise.all(calls);
    const actions = results.map((r) => r.action);
    expect(actions.filter((a) => a === EnsureRunningAction.ENSURE_RUNNING_ACTION_CREATED)).toHaveLength(1);
    expect(actions.filter((a) => a === EnsureRunningAction.ENSURE_RUNNING_ACTION_ALREADY_RUNNING)).toHaveLength(19);
    expect(new Set(results.map((r) => r.container!.id)).size).toBe(1);
    const matching = (await engine.ps()).filter((c) => c["Names"] === "ensure-20");
    expect(matching).toHaveLength(1);
    expect(matching[0]!["State"]).toBe("running");

    // Stopped with the CLI: EnsureRunning starts the same container again.
    await engine.dockerOk(["stop", "-t", "0", "ensure-20"]);
    const again = await api.ensureRunning({ spec: spec({ name: "ensure-20", command: SLEEPER }) });
    expect(again.action).toBe(EnsureRunningAction.ENSURE_RUNNING_ACTION_STARTED);
    expect(again.container!.id).toBe(results[0]!.container!.id);
    expect((await inspect("ensure-20")).State.Running).toBe(true);

    // Asked for another image: refused, nothing changed.
    await engine.dockerOk(["tag", IMAGE, "piccolo-test/other:1"]);
    const e = await failure(api.ensureRunning({ spec: spec({ name: "ensure-20", image: "piccolo-test/other:1", command: SLEEPER }) }));
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(e.field).toBe("spec.image");
    expect((await inspect("ensure-20")).Id).toBe(results[0]!.container!.id);
    await engine.dockerOk(["rm", "-f", "ensure-20"]);
  });

  test("a start that fails removes the container EnsureRunning had just created", async () => {
    const e = await failure(api.ensureRunning({ spec: spec({ name: "ensure-bad", command: ["/no/such/program"] }) }));
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(e.message).toMatch(/ensure-bad.*could not start.*removed again/s);
    expect((await engine.ps()).map((c) => c["Names"])).not.toContain("ensure-bad");
  });
});

describe("the engine's errors, mapped", () => {
  test("NOT_FOUND, ALREADY_EXISTS, and a missing image is FAILED_PRECONDITION saying to pull or import it", async () => {
    expect((await failure(api.getContainer({ name: "no-such-container" }))).code).toBe(grpc.status.NOT_FOUND);
    expect((await failure(api.startContainer({ name: "no-such-container" }))).code).toBe(grpc.status.NOT_FOUND);
    expect((await failure(api.stopContainer({ name: "no-such-container", gracePeriodSeconds: undefined }))).code).toBe(grpc.status.NOT_FOUND);
    expect((await failure(api.removeContainer({ name: "no-such-container", force: true, volumes: false }))).code).toBe(grpc.status.NOT_FOUND);
    expect((await failure(api.streamLogs({ name: "no-such-container", follow: false, timestamps: false, tail: undefined, since: undefined }))).code).toBe(
      grpc.status.NOT_FOUND,
    );

    await api.createContainer({ spec: spec({ name: "dup", command: SLEEPER }) });
    const dup = await failure(api.createContainer({ spec: spec({ name: "dup", command: SLEEPER }) }));
    expect(dup.code).toBe(grpc.status.ALREADY_EXISTS);
    expect(dup.message).toContain('"dup"');
    await api.removeContainer({ name: "dup", force: true, volumes: false });

    const before = await psSnapshot();
    for (const command of [SLEEPER, []]) {
      const missing = await failure(api.createContainer({ spec: spec({ name: "no-image", image: "piccolo-test/absent:9", command }) }));
      expect(missing.code).toBe(grpc.status.FAILED_PRECONDITION);
      expect(missing.field).toBe("spec.image");
      expect(missing.message).toMatch(/piccolo-test\/absent:9.*pull it \(PullImage\) or import it \(ImportImage\)/);
    }
    expect(await psSnapshot()).toEqual(before);
    // Over REST the same error is HTTP 412.
    const r = await d.fetch("/api/v1/containers", {
      method: "POST",
      body: JSON.stringify({ name: "no-image", image: "piccolo-test/absent:9", command: ["true"] }),
    });
    expect(r.status).toBe(412);
  });

  test("a host port another running container publishes is FAILED_PRECONDITION naming that container", async () => {
    const port = { hostAddress: "", hostPort: 18090, containerPort: 8080, protocol: PortProtocol.PORT_PROTOCOL_TCP };
    await api.ensureRunning({ spec: spec({ name: "port-owner", command: SLEEPER, ports: [port] }) });
    const before = await psSnapshot();
    const clash = await failure(
      api.createContainer({ spec: spec({ name: "port-thief", command: SLEEPER, ports: [{ ...port, hostAddress: "127.0.0.1", containerPort: 9090 }] }) }),
    );
    expect(clash.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(clash.field).toBe("spec.ports[0].host_port");
    expect(clash.message).toContain('running container "port-owner"');
    expect(await psSnapshot()).toEqual(before);
    // Another protocol or port is fine.
    await api.createContainer({ spec: spec({ name: "port-udp", command: SLEEPER, ports: [{ ...port, protocol: PortProtocol.PORT_PROTOCOL_UDP }] }) });
    // A container made with the CLI that publishes the port, started while the owner runs.
    await engine.dockerOk(["create", "--name", "port-cli", "--network", "none", "-p", "18090:80", IMAGE, "sleep", "3600"]);
    const start = await failure(api.startContainer({ name: "port-cli" }));
    expect(start.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(start.message).toContain('"port-owner"');
    expect((await inspect("port-cli")).State.Running).toBe(false);
    // Once the owner stops, the port is free.
    await api.stopContainer({ name: "port-owner", gracePeriodSeconds: 0 });
    expect((await api.startContainer({ name: "port-cli" })).state).toBe(ContainerState.CONTAINER_STATE_RUNNING);
    await engine.dockerOk(["rm", "-f", "port-owner", "port-udp", "port-cli"]);
  });
});

describe("refused specs", () => {
  let sym: string;
  beforeAll(async () => {
    sym = join(dataRoot, "sneaky");
    await symlink("/etc", sym);
  });

  const cases: [string, Partial<ContainerSpec>, string, RegExp][] = [
    ["privileged", { privileged: true }, "spec.privileged", /privileged containers are refused/],
    ["host PID namespace", { pidMode: "host" }, "spec.pid_mode", /"host" is refused/],
    ["host IPC namespace", { ipcMode: "host" }, "spec.ipc_mode", /"host" is refused/],
    ["bind mount of /", { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/", target: "/host", readOnly: true }] }, "spec.mounts[0].source", /bind mounts of \/ are refused/],
    ["bind mount of /etc", { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/etc", target: "/x", readOnly: true }] }, "spec.mounts[0].source", /bind mounts of \/etc are refused/],
    ["bind mount below /usr", { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/usr/bin", target: "/x", readOnly: true }] }, "spec.mounts[0].source", /bind mounts of \/usr .*are refused/],
    [
      "bind mount of /var/run/docker.sock",
      { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/var/run/docker.sock", target: "/var/run/docker.sock", readOnly: false }] },
      "spec.mounts[0].source",
      /\/var\/run\/docker\.sock.*refused/,
    ],
    ["bind mount of /var/run (holds docker.sock)", { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/var/run", target: "/x", readOnly: true }] }, "spec.mounts[0].source", /refused: it contains/],
    ["bind mount outside the data roots", { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/srv/elsewhere", target: "/x", readOnly: true }] }, "spec.mounts[0].source", /outside the data roots/],
    ["a symlink in a data root leading to /etc", { mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "", target: "/x", readOnly: true }] }, "spec.mounts[0].source", /leads to \/etc.*refused/],
    ["a second mount on the same target", { mounts: [{ type: MountType.MOUNT_TYPE_VOLUME, source: "v1", target: "/x", readOnly: false }, { type: MountType.MOUNT_TYPE_VOLUME, source: "v2", target: "/x/", readOnly: false }] }, "spec.mounts[1].target", /already the target/],
    ["a reserved label", { labels: { "space.piccolo.managed": "false" } }, 'spec.labels["space.piccolo.managed"]', /reserved/],
    ["too many CPUs", { resources: { cpus: 512, memoryBytes: 0 } }, "spec.resources.cpus", /between 0.01 and/],
    ["too little memory", { resources: { cpus: 0, memoryBytes: 1024 } }, "spec.resources.memory_bytes", /at least/],
    ["a bad name", { name: "-bad name" }, "spec.name", /not a container name/],
    ["a bad image reference", { image: "UPPER/Case::x" }, "spec.image", /not an image reference/],
  ];

  test.each(cases)("%s is INVALID_ARGUMENT naming the field; docker ps -a and docker images unchanged", async (_what, patch, field, message) => {
    const s = spec({ name: "refused", command: SLEEPER, ...patch });
    if (_what.startsWith("a symlink")) s.mounts[0]!.source = sym;
    const psBefore = await psSnapshot();
    const imagesBefore = await imagesSnapshot();
    for (const call of [() => api.createContainer({ spec: s }), () => api.ensureRunning({ spec: s })]) {
      const e = await failure(call());
      expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(e.field).toBe(field);
      expect(e.badRequest).toEqual([field]);
      expect(e.message).toMatch(message);
      expect(e.message.startsWith(`${field}: `)).toBe(true);
    }
    expect(await psSnapshot()).toEqual(psBefore);
    expect(await imagesSnapshot()).toEqual(imagesBefore);
  });

  test("a bind source that does not exist is FAILED_PRECONDITION naming the field", async () => {
    const before = await psSnapshot();
    const e = await failure(
      api.createContainer({
        spec: spec({ name: "refused", command: SLEEPER, mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: join(dataRoot, "absent"), target: "/x", readOnly: true }] }),
      }),
    );
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(e.field).toBe("spec.mounts[0].source");
    expect(e.message).toContain("does not exist");
    expect(await psSnapshot()).toEqual(before);
  });

  test("refusals over REST are HTTP 400 with the field in the body", async () => {
    const r = await d.fetch("/api/v1/containers", { method: "POST", body: JSON.stringify({ name: "refused", image: IMAGE, privileged: true }) });
    expect(r.status).toBe(400);
    const body = (await r.json()) as { code: number; message: string; details: { metadata?: { field?: string } }[] };
    expect(body.code).toBe(3);
    expect(body.details.find((x) => x.metadata)?.metadata?.field).toBe("spec.privileged");
  });
});

describe("changes made with the docker CLI", () => {
  test("show up in ListContainers (managed by label, or all) and WatchEvents, with start, health, kill, die, oom and destroy", async () => {
    const ac = new AbortController();
    const events = collect<ContainerEvent>(api.watchEvents({ includeUnmanaged: true, since: undefined, name: "" }, { signal: ac.signal }));
    const managedOnly = collect<ContainerEvent>(api.watchEvents({ includeUnmanaged: false, since: undefined, name: "" }, { signal: ac.signal }));
    await new Promise((r) => setTimeout(r, 300));

    await engine.dockerOk(["run", "-d", "--name", "cli-plain", "--network", "none", IMAGE, "sleep", "3600"]);
    await engine.dockerOk([
      "run", "-d", "--name", "cli-health", "--network", "none", "--label", "space.piccolo.managed=true",
      "--health-cmd", "true", "--health-interval", "1s", IMAGE, "sleep", "3600",
    ]);
    const list = await api.listContainers({ includeUnmanaged: false });
    const all = await api.listContainers({ includeUnmanaged: true });
    expect(list.containers.map((c) => c.name)).toContain("cli-health");
    expect(list.containers.map((c) => c.name)).not.toContain("cli-plain");
    expect(all.containers.map((c) => c.name)).toEqual(expect.arrayContaining(["cli-health", "cli-plain"]));
    // ListContainers agrees with docker ps -a on every container.
    const ps = await engine.ps();
    expect(all.containers.map((c) => c.id).sort()).toEqual(ps.map((c) => c["ID"]).sort());
    for (const c of all.containers) {
      const p = ps.find((x) => x["ID"] === c.id)!;
      expect({ name: c.name, image: c.image, running: c.state === ContainerState.CONTAINER_STATE_RUNNING }).toEqual({
        name: p["Names"],
        image: p["Image"],
        running: p["State"] === "running",
      });
    }

    await until(() => events.items.some((e) => e.containerName === "cli-health" && e.type === ContainerEventType.CONTAINER_EVENT_TYPE_HEALTH_STATUS), "health event");
    await engine.dockerOk(["kill", "cli-health"]);
    await engine.dockerOk(["rm", "-f", "cli-plain", "cli-health"]);
    // An out-of-memory kill, through the API's memory limit.
    await api.createContainer({
      spec: spec({ name: "oom", resources: { cpus: 0, memoryBytes: 8 * 1024 * 1024 }, command: ["sh", "-c", "x=$(head -c 64000000 /dev/zero | tr '\\0' a); sleep 3600"] }),
    });
    await api.startContainer({ name: "oom" });
    await until(() => events.items.some((e) => e.containerName === "oom" && e.type === ContainerEventType.CONTAINER_EVENT_TYPE_OOM), "oom event");
    await until(() => events.items.some((e) => e.containerName === "oom" && e.type === ContainerEventType.CONTAINER_EVENT_TYPE_DIE), "oom die event");
    await api.removeContainer({ name: "oom", force: true, volumes: true });
    await until(() => events.items.some((e) => e.containerName === "oom" && e.type === ContainerEventType.CONTAINER_EVENT_TYPE_DESTROY), "destroy event");
    ac.abort();

    const T = ContainerEventType;
    const of = (name: string) => events.items.filter((e) => e.containerName === name);
    expect(of("cli-plain").map((e) => e.type)).toEqual(expect.arrayContaining([T.CONTAINER_EVENT_TYPE_CREATE, T.CONTAINER_EVENT_TYPE_START, T.CONTAINER_EVENT_TYPE_DIE, T.CONTAINER_EVENT_TYPE_DESTROY]));
    const health = of("cli-health");
    const types = health.map((e) => e.type);
    expect(types.indexOf(T.CONTAINER_EVENT_TYPE_CREATE)).toBeLessThan(types.indexOf(T.CONTAINER_EVENT_TYPE_START));
    expect(health.find((e) => e.type === T.CONTAINER_EVENT_TYPE_HEALTH_STATUS)!.health).toBe(HealthStatus.HEALTH_STATUS_HEALTHY);
    expect(health.find((e) => e.type === T.CONTAINER_EVENT_TYPE_KILL)!.signal).toBe("9");
    expect(health.find((e) => e.type === T.CONTAINER_EVENT_TYPE_DIE)!.exitCode).toBe(137);
    expect(types.indexOf(T.CONTAINER_EVENT_TYPE_KILL)).toBeLessThan(types.indexOf(T.CONTAINER_EVENT_TYPE_DIE));
    expect(types[types.length - 1]).toBe(T.CONTAINER_EVENT_TYPE_DESTROY);
    expect(health.every((e) => e.managed && e.image === IMAGE)).toBe(true);
    // exec events of the health check are not passed on.
    expect(events.items.every((e) => !e.action.startsWith("exec_"))).toBe(true);
    expect(of("oom").find((e) => e.type === T.CONTAINER_EVENT_TYPE_DIE)!.exitCode).toBe(137);
    // The managed-only stream never saw the unmanaged container.
    await managedOnly.done;
    expect(managedOnly.items.some((e) => e.containerName === "cli-plain")).toBe(false);
    expect(managedOnly.items.some((e) => e.containerName === "cli-health")).toBe(true);
  });
});

describe("images", () => {
  test("ListImages agrees with docker images; RemoveImage untags, refuses an image in use naming the container, and 404s", async () => {
    const listed = await api.listImages({ reference: "" });
    const cli = await engine.images();
    expect(listed.images.map((i) => i.id).sort()).toEqual([...new Set(cli.map((i) => i["ID"]))].sort());
    expect(listed.images.flatMap((i) => i.repoTags)).toContain(IMAGE);
    const filtered = await api.listImages({ reference: "piccolo-test/tiny" });
    expect(filtered.images.flatMap((i) => i.repoTags)).toEqual([IMAGE]);

    await engine.makeImage("piccolo-test/in-use:1");
    await engine.dockerOk(["create", "--name", "user-of-image", "piccolo-test/in-use:1", "true"]);
    const e = await failure(api.removeImage({ reference: "piccolo-test/in-use:1", force: false }));
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(e.message).toContain('container "user-of-image"');
    expect(await imagesSnapshot()).toEqual(expect.arrayContaining([expect.stringContaining("piccolo-test/in-use:1")]));
    await engine.dockerOk(["rm", "user-of-image"]);
    const removed = await api.removeImage({ reference: "piccolo-test/in-use:1", force: false });
    expect(removed.untagged).toEqual(["piccolo-test/in-use:1"]);
    expect(removed.deleted.length).toBeGreaterThan(0);
    expect((await engine.images()).map((i) => `${i["Repository"]}:${i["Tag"]}`)).not.toContain("piccolo-test/in-use:1");
    const nf = await failure(api.removeImage({ reference: "piccolo-test/in-use:1", force: false }));
    expect(nf.code).toBe(grpc.status.NOT_FOUND);
    const restDel = await d.fetch("/api/v1/images/piccolo-test/in-use:1", { method: "DELETE" });
    expect(restDel.status).toBe(404);
  });
});

test("REST errors carry the gRPC code: RestError for a bad grace period", async () => {
  await expect(rest.stopContainer({ name: "whatever", gracePeriodSeconds: 99999 })).rejects.toMatchObject({ code: 3, httpStatus: 400 });
  await expect(rest.stopContainer({ name: "whatever", gracePeriodSeconds: 99999 })).rejects.toBeInstanceOf(RestError);
});
