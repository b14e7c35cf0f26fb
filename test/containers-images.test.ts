/**
 * Image operations end to end against a real dockerd and a local docker-registry: a pull that
 * streams per-layer progress and ends at 100% with the registry's own byte count, a build that
 * streams each step and whose image runs, imports of a root filesystem and of a `docker save`
 * archive, cancel, and the failures a user meets (missing tag, unreachable registry, failing
 * step, paths outside the data roots). Every result is checked with the docker CLI.
 */
import * as grpc from "@grpc/grpc-js";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  BuildImageResult,
  ContainerServiceService,
  ContainerState,
  ImportFormat,
  ImportImageResult,
  PullImageResult,
} from "../gen/piccolo/containers/v1/containers.js";
import { ContainerServiceRestClient } from "../gen/piccolo/containers/v1/containers_rest.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { createPromiseClient, type PromiseClient } from "../src/clients/grpc-client.js";
import { createRestTransport } from "../src/clients/rest-transport.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { freePort, run, startDockerd, startRegistry, startThrottledProxy, type TestDockerd, type TestRegistry, type ThrottledProxy } from "./helpers/dockerd.js";

type Client = PromiseClient<typeof ContainerServiceService>;

let engine: TestDockerd;
let registry: TestRegistry;
let proxy: ThrottledProxy;
let d: TestDaemon;
let api: Client;
let grpcClients: ReturnType<TestDaemon["grpcUnix"]>;
let rest: ContainerServiceRestClient;
let work: string;
let dataRoot: string;
/** The layers of REG/multi:1 as the registry's manifest lists them. */
let manifestLayers: { digest: string; size: number }[];

const S = OperationState;
const MiB = 1024 * 1024;

/** A random file: random bytes do not compress, so layer sizes are predictable. */
const randomFile = (bytes: number): Buffer => randomBytes(bytes);

beforeAll(async () => {
  engine = await startDockerd();
  registry = await startRegistry(join(engine.dir, "registry"));
  work = await mkdtemp(join(tmpdir(), "piccolod-img-"));
  dataRoot = join(work, "data");
  await mkdir(dataRoot, { recursive: true });

  // A four-layer image in the registry: the busybox base, 3 MB, a RUN, 300 kB.
  await engine.makeImage("piccolo-test/seed-base:1");
  const ctx = join(work, "seed");
  await mkdir(ctx);
  await writeFile(join(ctx, "big"), randomFile(3 * MiB));
  await writeFile(join(ctx, "small"), randomFile(300 * 1000));
  await writeFile(join(ctx, "Dockerfile"), 'FROM piccolo-test/seed-base:1\nCOPY big /big\nRUN echo pulled-ok > /x\nCOPY small /small\nCMD ["cat", "/x"]\n');
  await engine.dockerOk(["build", "-q", "-t", `${registry.address}/multi:1`, ctx]);
  await engine.dockerOk(["push", `${registry.address}/multi:1`]);
  // A one-layer 6 MB image for the cancelled pull.
  await writeFile(join(ctx, "Dockerfile"), "FROM scratch\nCOPY big6 /big6\n");
  await writeFile(join(ctx, "big6"), randomFile(6 * MiB));
  await engine.dockerOk(["build", "-q", "-t", `${registry.address}/big:1`, ctx]);
  await engine.dockerOk(["push", `${registry.address}/big:1`]);
  // Nothing of them stays on the host, so a pull downloads every layer.
  await engine.dockerOk(["rmi", "-f", `${registry.address}/multi:1`, `${registry.address}/big:1`, "piccolo-test/seed-base:1"]);
  await engine.dockerOk(["image", "prune", "-a", "-f"]);
  const res = await fetch(`http://${registry.address}/v2/multi/manifests/1`, {
    headers: { accept: "application/vnd.docker.distribution.manifest.v2+json" },
  });
  manifestLayers = ((await res.json()) as { layers: { digest: string; size: number }[] }).layers;
  expect(manifestLayers).toHaveLength(4);

  proxy = await startThrottledProxy(Number(registry.address.split(":")[1]), 3 * 1000 * 1000);
  d = await startTestDaemon({ extraArgs: ["--docker-socket", engine.socket, "--container-data-roots", dataRoot] });
  grpcClients = d.grpcUnix();
  api = createPromiseClient(grpcClients.channel, ContainerServiceService);
  rest = new ContainerServiceRestClient(createRestTransport({ baseUrl: d.endpoints.rest, token: d.adminToken, fetch: d.pinnedFetch }));
}, 180_000);

afterAll(async () => {
  await d?.cleanup();
  await proxy?.stop();
  await registry?.stop();
  await engine?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

async function all(it: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

const outcome = (events: OperationEvent[]) => events[events.length - 1]!.outcome!;
const progress = (events: OperationEvent[]) => events.filter((e) => e.progress).map((e) => e.progress!);

async function imageTags(): Promise<string[]> {
  return (await engine.images()).map((i) => `${i["Repository"]}:${i["Tag"]}`);
}

describe("PullImage", () => {
  test("streams per-layer progress that ends at 100% with the registry's total bytes; the image runs", async () => {
    const ref = `127.0.0.1:${proxy.port}/multi:1`;
    const t0 = Date.now();
    const events = await all(api.pullImage({ reference: ref }));
    const seconds = (Date.now() - t0) / 1000;
    expect(events[0]!.attached!.kind).toBe("containers.image_pull");
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const total = manifestLayers.reduce((a, l) => a + l.size, 0);
    // Throttled to 3 MB/s, so it took a while and was reported along the way.
    expect(seconds).toBeGreaterThan(total / 3e6 / 2);

    const p = progress(events);
    const downloads = p.filter((x) => x.phase === "download" && x.bytesDone > 0);
    expect(downloads.length).toBeGreaterThanOrEqual(3);
    const done = downloads.map((x) => x.bytesDone);
    expect(done).toEqual([...done].sort((a, b) => a - b));
    // Per layer: the messages name the layers being downloaded with their own byte counts.
    const named = new Set(p.flatMap((x) => [...x.message.matchAll(/\b([0-9a-f]{12}) download(?:ing|ed) [\d.]+ [kM]?B\/[\d.]+ [kM]?B/g)].map((m) => m[1]!)));
    for (const l of manifestLayers.filter((x) => x.size > 500_000)) expect(named).toContain(l.digest.slice(7, 19));
    // And typed, in Progress.items: every layer is listed, each with its own bytes, never past its
    // size; the engine only reports a size for layers it streams in chunks (a 114-byte layer goes
    // straight to "Download complete"), so those layers' sizes are the ones checked against the
    // registry's.
    const withItems = downloads.filter((x) => x.items.length > 0);
    expect(withItems.length).toBeGreaterThanOrEqual(3);
    for (const x of withItems) for (const it of x.items) if (it.bytesTotal > 0) expect(it.bytesDone).toBeLessThanOrEqual(it.bytesTotal);
    const seenTotal = new Map<string, number>();
    for (const x of withItems) for (const it of x.items) seenTotal.set(it.id, Math.max(seenTotal.get(it.id) ?? 0, it.bytesTotal));
    for (const l of manifestLayers) expect(seenTotal.has(l.digest.slice(7, 19))).toBe(true);
    for (const l of manifestLayers.filter((x) => x.size > 500_000)) expect(seenTotal.get(l.digest.slice(7, 19))).toBe(l.size);
    const sawPartial = withItems.some((x) => x.items.some((it) => it.bytesTotal > 500_000 && it.bytesDone > 0 && it.bytesDone < it.bytesTotal));
    expect(sawPartial).toBe(true);
    const percents = p.map((x) => x.percent);
    expect(percents).toEqual([...percents].sort((a, b) => a - b));
    const last = p[p.length - 1]!;
    expect(last).toMatchObject({ phase: "done", percent: 100, bytesDone: total, bytesTotal: total });

    const result = PullImageResult.decode(outcome(events).result!.value);
    expect(result.bytesTotal).toBe(total);
    expect(result.layers).toEqual(manifestLayers.map((l) => ({ id: l.digest.slice(7, 19), sizeBytes: l.size, alreadyPresent: false })));
    expect(result.image!.repoTags).toContain(ref);
    expect(result.status).toBe(`Downloaded newer image for ${ref}`);
    expect(await imageTags()).toContain(ref);
    // It runs: its CMD prints what its RUN step wrote.
    expect((await engine.dockerOk(["run", "--rm", "--network", "none", ref])).trim()).toBe("pulled-ok");

    // The operation is listed under its kind.
    const ops = await grpcClients.operations.listOperations({ kind: "containers.image_pull", state: 0, pageSize: 10, pageToken: "" });
    expect(ops.operations.map((o) => o.id)).toContain(events[0]!.operationId);

    // Pulled again over REST: up to date, nothing downloaded.
    const again = await all(rest.pullImage({ reference: ref }));
    expect(outcome(again).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const r2 = PullImageResult.decode(outcome(again).result!.value);
    expect(r2.status).toBe(`Image is up to date for ${ref}`);
    expect(r2.bytesTotal).toBe(0);
  });

  test("a missing tag fails NOT_FOUND, an unreachable registry UNAVAILABLE naming it; nothing is left", async () => {
    const before = await imageTags();
    const missing = await all(api.pullImage({ reference: `${registry.address}/multi:no-such-tag` }));
    expect(outcome(missing).state).toBe(S.OPERATION_STATE_FAILED);
    expect(outcome(missing).error!.code).toBe(grpc.status.NOT_FOUND);
    expect(outcome(missing).error!.message).toContain("multi:no-such-tag");
    const nowhere = `127.0.0.1:${await freePort()}/app:1`;
    const unreachable = await all(api.pullImage({ reference: nowhere }));
    expect(outcome(unreachable).state).toBe(S.OPERATION_STATE_FAILED);
    expect(outcome(unreachable).error!.code).toBe(grpc.status.UNAVAILABLE);
    expect(outcome(unreachable).error!.message).toContain(`the registry of "${nowhere}"`);
    expect(await imageTags()).toEqual(before);
    // A malformed reference never becomes an operation.
    await expect(all(api.pullImage({ reference: "Not A Reference" }))).rejects.toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
  });

  test("CancelOperation stops a pull: CANCELLED, and the image is not on the host", async () => {
    const slow = await startThrottledProxy(Number(registry.address.split(":")[1]), 1000 * 1000);
    try {
      const ref = `127.0.0.1:${slow.port}/big:1`;
      const events: OperationEvent[] = [];
      let cancelled = false;
      for await (const e of api.pullImage({ reference: ref })) {
        events.push(e);
        if (!cancelled && e.progress && e.progress.bytesDone > 0) {
          cancelled = true;
          await grpcClients.operations.cancelOperation({ id: e.operationId });
        }
      }
      expect(cancelled).toBe(true);
      expect(outcome(events).state).toBe(S.OPERATION_STATE_CANCELLED);
      expect(await imageTags()).not.toContain(ref);
    } finally {
      await slow.stop();
    }
  });
});

describe("BuildImage", () => {
  let ctx: string;
  beforeAll(async () => {
    await engine.makeImage("piccolo-test/base:1");
    ctx = join(dataRoot, "app");
    await mkdir(ctx, { recursive: true });
    await writeFile(join(ctx, "msg.txt"), "message file\n");
    await writeFile(
      join(ctx, "Dockerfile"),
      [
        "FROM piccolo-test/base:1",
        "ARG GREETING=hello",
        "COPY msg.txt /msg.txt",
        'RUN echo "built with $GREETING" > /built.txt && echo step-output-line',
        "LABEL org.example.kind=demo",
        'CMD ["sh", "-c", "cat /msg.txt /built.txt"]',
        "",
      ].join("\n"),
    );
  });

  test("streams every step as it starts, and the result image runs", async () => {
    const psBefore = (await engine.ps()).length;
    const events = await all(
      api.buildImage({
        contextPath: ctx,
        dockerfile: "",
        tags: ["piccolo-test/built:1", "piccolo-test/built:latest"],
        buildArgs: { GREETING: "hola" },
        noCache: true,
        labels: { "space.example.built-by": "test" },
      }),
    );
    expect(events[0]!.attached!.kind).toBe("containers.image_build");
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const steps = progress(events).filter((p) => /^step_\d+$/.test(p.phase));
    // Each step was journaled, in order, with its line: the Dockerfile's six, and the LABEL step
    // the engine adds for the request's labels.
    const firsts = [...new Map(steps.map((p) => [p.phase, p])).values()];
    expect(firsts.map((p) => p.phaseIndex)).toEqual([1, 2, 3, 4, 5, 6, 7]);
    expect(firsts.every((p) => p.phaseCount === 7)).toBe(true);
    expect(firsts.map((p) => p.message.split(" | ")[0])).toEqual([
      "Step 1/7 : FROM piccolo-test/base:1",
      "Step 2/7 : ARG GREETING=hello",
      "Step 3/7 : COPY msg.txt /msg.txt",
      'Step 4/7 : RUN echo "built with $GREETING" > /built.txt && echo step-output-line',
      "Step 5/7 : LABEL org.example.kind=demo",
      'Step 6/7 : CMD ["sh", "-c", "cat /msg.txt /built.txt"]',
      "Step 7/7 : LABEL space.example.built-by=test",
    ]);
    const percents = progress(events).map((p) => p.percent);
    expect(percents).toEqual([...percents].sort((a, b) => a - b));
    expect(percents[percents.length - 1]).toBe(100);

    const result = BuildImageResult.decode(outcome(events).result!.value);
    expect(result.steps).toBe(7);
    expect(result.image!.repoTags.sort()).toEqual(["piccolo-test/built:1", "piccolo-test/built:latest"]);
    expect(result.image!.labels).toMatchObject({ "org.example.kind": "demo", "space.example.built-by": "test" });
    expect(await imageTags()).toEqual(expect.arrayContaining(["piccolo-test/built:1", "piccolo-test/built:latest"]));
    // Intermediate containers are gone.
    expect((await engine.ps()).length).toBe(psBefore);
    // It runs, as the CLI sees it and through the API.
    expect(await engine.dockerOk(["run", "--rm", "--network", "none", "piccolo-test/built:1"])).toBe("message file\nbuilt with hola\n");
    await api.createContainer({
      spec: {
        name: "from-build", image: "piccolo-test/built:1", command: [], entrypoint: [], env: {}, ports: [], mounts: [], restartPolicy: 0,
        restartMaxRetries: 0, resources: undefined, labels: {}, network: "none", healthcheck: undefined, privileged: false, pidMode: "", ipcMode: "",
      },
    });
    await api.startContainer({ name: "from-build" });
    for (let i = 0; i < 100 && (await api.getContainer({ name: "from-build" })).state !== ContainerState.CONTAINER_STATE_EXITED; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
    const lines = [];
    for await (const l of api.streamLogs({ name: "from-build", follow: false, timestamps: false, tail: undefined, since: undefined })) lines.push(l.line);
    expect(lines).toEqual(["message file", "built with hola"]);
    await api.removeContainer({ name: "from-build", force: true, volumes: true });
  });

  test("a context tarball builds too (over REST)", async () => {
    const tarball = join(dataRoot, "app.tar.gz");
    expect((await run("tar", ["-C", ctx, "-czf", tarball, "."])).code).toBe(0);
    const events = await all(rest.buildImage({ contextPath: tarball, tags: ["piccolo-test/from-tar:1"] }));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    expect(await engine.dockerOk(["run", "--rm", "--network", "none", "piccolo-test/from-tar:1"])).toBe("message file\nbuilt with hello\n");
  });

  test("a failing step fails the operation naming the step, and leaves no container behind", async () => {
    const bad = join(dataRoot, "bad");
    await mkdir(bad, { recursive: true });
    await writeFile(join(bad, "Dockerfile"), "FROM piccolo-test/base:1\nRUN echo about to fail && exit 3\n");
    const psBefore = (await engine.ps()).length;
    const events = await all(api.buildImage({ contextPath: bad, dockerfile: "", tags: ["piccolo-test/bad:1"], buildArgs: {}, noCache: false, labels: {} }));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_FAILED);
    expect(outcome(events).error!.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(outcome(events).error!.message).toMatch(/the build failed at step 2\/2 \(RUN echo about to fail && exit 3\).*non-zero code: 3/);
    expect((await engine.ps()).length).toBe(psBefore);
    expect(await imageTags()).not.toContain("piccolo-test/bad:1");
  });

  test("requests that cannot build are refused before an operation starts", async () => {
    const refuse = async (req: Parameters<Client["buildImage"]>[0]) => {
      try {
        await all(api.buildImage(req));
      } catch (e) {
        return e as grpc.ServiceError;
      }
      throw new Error("expected a refusal");
    };
    const base = { dockerfile: "", tags: ["piccolo-test/x:1"], buildArgs: {}, noCache: false, labels: {} };
    expect(await refuse({ ...base, contextPath: "/etc" })).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/^context_path: build contexts of \/etc are refused/) });
    expect(await refuse({ ...base, contextPath: work })).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringContaining("outside the data roots") });
    expect(await refuse({ ...base, contextPath: ctx, dockerfile: "Nope.Dockerfile" })).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, details: expect.stringMatching(/^dockerfile:/) });
    expect(await refuse({ ...base, contextPath: ctx, dockerfile: "../x" })).toMatchObject({ code: grpc.status.INVALID_ARGUMENT });
    expect(await refuse({ ...base, contextPath: ctx, tags: [] })).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/^tags:/) });
    const ops = await grpcClients.operations.listOperations({ kind: "containers.image_build", state: S.OPERATION_STATE_UNSPECIFIED, pageSize: 100, pageToken: "" });
    expect(ops.operations.every((o) => o.state !== S.OPERATION_STATE_RUNNING)).toBe(true);
  });
});

describe("ImportImage", () => {
  test("a root filesystem tarball becomes a named image that runs, with byte progress to 100%", async () => {
    const tar = join(dataRoot, "rootfs.tar");
    await engine.writeRootfsTar(tar, { files: { "hello.txt": "imported rootfs\n" } });
    const size = (await stat(tar)).size;
    const events = await all(api.importImage({ path: tar, format: ImportFormat.IMPORT_FORMAT_ROOTFS, reference: "piccolo-test/imported:1" }));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const p = progress(events);
    expect(p[p.length - 1]).toMatchObject({ percent: 100, bytesDone: size, bytesTotal: size });
    const result = ImportImageResult.decode(outcome(events).result!.value);
    expect(result.bytesRead).toBe(size);
    expect(result.images.map((i) => i.repoTags)).toEqual([["piccolo-test/imported:1"]]);
    expect(await imageTags()).toContain("piccolo-test/imported:1");
    expect(await engine.dockerOk(["run", "--rm", "--network", "none", "piccolo-test/imported:1", "cat", "/hello.txt"])).toBe("imported rootfs\n");
  });

  test("a `docker save` archive loads its images back, and can be given a new name", async () => {
    await engine.makeImage("piccolo-test/saved:1", { files: { "saved.txt": "saved and loaded\n" } });
    const archive = join(dataRoot, "saved.tar");
    await engine.dockerOk(["save", "-o", archive, "piccolo-test/saved:1"]);
    const id = (await engine.dockerOk(["image", "inspect", "-f", "{{.Id}}", "piccolo-test/saved:1"])).trim();
    await engine.dockerOk(["rmi", "piccolo-test/saved:1"]);
    expect(await imageTags()).not.toContain("piccolo-test/saved:1");

    const events = await all(rest.importImage({ path: archive }));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const result = ImportImageResult.decode(outcome(events).result!.value);
    expect(result.images.map((i) => i.id)).toEqual([id]);
    expect(await imageTags()).toContain("piccolo-test/saved:1");

    const renamed = await all(api.importImage({ path: archive, format: ImportFormat.IMPORT_FORMAT_ARCHIVE, reference: "piccolo-test/renamed:2" }));
    expect(outcome(renamed).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    expect(ImportImageResult.decode(outcome(renamed).result!.value).images[0]!.repoTags).toContain("piccolo-test/renamed:2");
    expect(await engine.dockerOk(["run", "--rm", "--network", "none", "piccolo-test/renamed:2", "cat", "/saved.txt"])).toBe("saved and loaded\n");
  });

  test("paths outside the data roots, missing files and a nameless root filesystem are refused", async () => {
    const refuse = async (req: Parameters<Client["importImage"]>[0]) => {
      try {
        await all(api.importImage(req));
      } catch (e) {
        return e as grpc.ServiceError;
      }
      throw new Error("expected a refusal");
    };
    expect(await refuse({ path: "/etc/passwd", format: 0, reference: "" })).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringMatching(/^path: image imports of \/etc/) });
    expect(await refuse({ path: join(work, "x.tar"), format: 0, reference: "" })).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, details: expect.stringContaining("outside the data roots") });
    expect(await refuse({ path: join(dataRoot, "absent.tar"), format: 0, reference: "" })).toMatchObject({ code: grpc.status.FAILED_PRECONDITION });
    expect(await refuse({ path: join(dataRoot, "rootfs.tar"), format: ImportFormat.IMPORT_FORMAT_ROOTFS, reference: "" })).toMatchObject({
      code: grpc.status.INVALID_ARGUMENT,
      details: expect.stringMatching(/^reference:/),
    });
  });
});
