/**
 * Task runs end to end: the real daemon, a real dockerd (the agent image built with BuildImage
 * from test/fixtures/tasks-agent on a `docker import`ed busybox), sealed secrets on a real swtpm,
 * real git repositories with a bare origin, and the model planner against the loopback
 * chat-completions simulator. Every git result is read back with the git CLI (`git log --graph`,
 * `git branch -a`, `git for-each-ref`), every container with the docker CLI.
 */
import * as grpc from "@grpc/grpc-js";
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { cp, mkdir, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import { OperationState as S, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { TaskRun, TaskRunState, TaskStatus, type AgentProfile, type CreateTaskRunRequest } from "../gen/piccolo/tasks/v1/tasks.js";
import type { PiccoloGrpcClients } from "../src/clients/grpc-client.js";
import { CLI_JS, startTestDaemon, ROOT, type TestDaemon } from "./helpers/daemon.js";
import { run, startDockerd, type TestDockerd } from "./helpers/dockerd.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";
import { startOpenAiSim, type OpenAiSim } from "./sim/openai.js";

const BASE_IMAGE = "piccolo-test/busybox:1";
const AGENT_IMAGE = "piccolo-test/agent:1";
const SECRET = "sk-live-7f3a9c1e5b2d4086aa11-piccolo-secret-value";
const PLANNER_SECRET = "sk-planner-0d9e8f7a6b5c4d3e2f1a-secret";
const DOCKER_CLI = process.env["PICCOLO_TEST_DOCKER"] ?? "/usr/local/bin/docker";

let engine: TestDockerd;
let tpm: Swtpm;
let d: TestDaemon;
let api: PiccoloGrpcClients;
let work: string;
let dataRoot: string;
let secretsDir: string;
let bus: ChildProcess;
let busAddress: string;
let sim: OpenAiSim;
let plannerAnswer = "";

/** Runs git and returns stdout; throws on failure. */
async function g(dir: string, ...args: string[]): Promise<string> {
  const r = await run("git", ["-C", dir, "-c", "user.name=Test", "-c", "user.email=test@example.com", ...args]);
  if (r.code !== 0) throw new Error(`git ${args.join(" ")} failed: ${r.stderr}`);
  return r.stdout.trim();
}

/** A repository cloned from a bare origin, with README.md committed and pushed on main. */
async function makeRepo(name: string): Promise<{ repo: string; origin: string }> {
  const origin = join(dataRoot, `${name}-origin.git`);
  const repo = join(dataRoot, name);
  await run("git", ["init", "-q", "--bare", "-b", "main", origin]);
  await run("git", ["clone", "-q", origin, repo]);
  await g(repo, "checkout", "-q", "-b", "main");
  await writeFile(join(repo, "README.md"), "base\n");
  await g(repo, "add", "README.md");
  await g(repo, "commit", "-q", "-m", "base");
  await g(repo, "push", "-q", "-u", "origin", "main");
  return { repo, origin };
}

/** Everything about a repository that a run could change, read with git. */
async function repoState(repo: string): Promise<string> {
  return [await g(repo, "for-each-ref", "--format=%(refname) %(objectname)"), await g(repo, "status", "--porcelain"), await g(repo, "worktree", "list", "--porcelain")].join("\n--\n");
}

const profile = (p: Partial<AgentProfile> = {}): AgentProfile => ({
  image: AGENT_IMAGE,
  commandTemplate: 'agent exec "{prompt}"',
  secrets: [],
  cpus: 0,
  memoryBytes: 0,
  mountPath: "",
  secretMountPath: "",
  network: "none",
  timeoutSeconds: 0,
  gracePeriodSeconds: 0,
  plannerUrl: "",
  plannerModel: "",
  plannerSecret: "",
  ...p,
});

const request = (r: Partial<CreateTaskRunRequest> & { repository: string }): CreateTaskRunRequest => ({
  baseBranch: "",
  request: "",
  promptTemplate: "You are a coding agent. Task: {task}",
  profile: profile(),
  serviceBranch: "",
  ...r,
});

async function all<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}

const outcome = (events: OperationEvent[]) => events[events.length - 1]!.outcome!;

/** The gRPC error of a streaming call, with the field its ErrorInfo names. */
async function failure(it: AsyncIterable<unknown>): Promise<{ code: number; message: string; field: string }> {
  try {
    await all(it);
  } catch (e) {
    const err = e as grpc.ServiceError;
    const bin = err.metadata?.get("grpc-status-details-bin")[0] as Buffer | undefined;
    let field = "";
    for (const any of bin ? Status.decode(bin).details : []) {
      if (any.typeUrl.endsWith("google.rpc.ErrorInfo")) field = ErrorInfo.decode(any.value).metadata["field"] ?? "";
    }
    return { code: err.code, message: err.details, field };
  }
  throw new Error("expected the call to fail");
}

beforeAll(async () => {
  engine = await startDockerd();
  tpm = await startSwtpm({ manufacture: true });
  work = await mkdtemp(join(tmpdir(), "ptk-"));
  dataRoot = join(work, "data");
  await mkdir(dataRoot, { recursive: true });
  // Agent secrets are only ever written to memory: the daemon checks the folder is a tmpfs.
  secretsDir = await mkdtemp("/dev/shm/ptk-secrets-");
  // A real system-bus daemon without systemd on it: CreateAgentService must say systemd is missing.
  await mkdir(join(work, "bus"));
  busAddress = `unix:path=${join(work, "bus", "bus.sock")}`;
  await writeFile(
    join(work, "bus", "bus.conf"),
    [
      '<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN" "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">',
      "<busconfig><type>system</type>",
      `<listen>${busAddress}</listen>`,
      '<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy>',
      "</busconfig>",
    ].join("\n"),
  );
  bus = spawn("dbus-daemon", [`--config-file=${join(work, "bus", "bus.conf")}`, "--nofork", "--nopidfile", "--print-address=1"], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve) => bus.stdout!.once("data", () => resolve()));
  sim = await startOpenAiSim({ apiKey: PLANNER_SECRET, answer: () => plannerAnswer });
  await engine.makeImage(BASE_IMAGE);
  // As in piccolod.service (UMask=0077): the daemon inherits this.
  const umask = process.umask(0o077);
  d = await startTestDaemon({
    extraArgs: [
      "--docker-socket", engine.socket,
      "--container-data-roots", dataRoot,
      "--tasks-secrets-dir", secretsDir,
      "--tpm2-device", tpm.tcti,
      "--agent-unit-dir", join(work, "units"),
      "--agent-docker-cli", DOCKER_CLI,
      "--system-bus-address", busAddress,
    ],
  }).finally(() => process.umask(umask));
  api = d.grpcUnix();
  // The trust area makes the device's attestation key right after start; wait for it, as two
  // users of a TPM without a resource manager (swtpm here) must not interleave.
  for (let i = 0; ; i++) {
    const ok = await api.trust.getDeviceIdentity({}).then(() => true, () => false);
    if (ok) break;
    if (i > 600) throw new Error("the device identity never became available");
    await new Promise((r) => setTimeout(r, 200));
  }
  // Seal the keys through the trust area's SealSecret (systemd-creds on the daemon's credstore, to
  // the swtpm), so the audit record of that call is part of what the leak checks read.
  await api.trust.sealSecret({ name: "openai_key", value: Buffer.from(SECRET) });
  await api.trust.sealSecret({ name: "planner_key", value: Buffer.from(PLANNER_SECRET) });
  expect((await api.trust.listSecrets({})).secrets.map((x) => x.name)).toEqual(expect.arrayContaining(["openai_key", "planner_key"]));
  // The agent image, built from the Dockerfile in the fixture through the containers area.
  const ctx = join(dataRoot, "agent-image");
  await cp(join(ROOT, "test/fixtures/tasks-agent"), ctx, { recursive: true });
  const events = await all(
    api.containers.buildImage({ contextPath: ctx, dockerfile: "Dockerfile", tags: [AGENT_IMAGE], buildArgs: { BASE: BASE_IMAGE }, noCache: false, labels: {} }),
  );
  expect(outcome(events).error?.message ?? "").toBe("");
}, 300_000);

afterAll(async () => {
  await d?.cleanup();
  await sim?.stop();
  bus?.kill("SIGTERM");
  await engine?.cleanup();
  await tpm?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
  if (secretsDir) await rm(secretsDir, { recursive: true, force: true });
});

/** Checks that the secret values appear nowhere they must not. */
async function expectNoSecretLeak(repo: string): Promise<void> {
  const audit = await readFile(join(d.stateDir, "audit.log"), "utf8");
  const history = await g(repo, "log", "-p", "--all");
  for (const s of [SECRET, PLANNER_SECRET]) {
    expect(d.output()).not.toContain(s);
    expect(audit).not.toContain(s);
    expect(history).not.toContain(s);
  }
}

describe("a run with four tasks, one conflicting", () => {
  let repo: string;
  let result: TaskRun;
  let events: OperationEvent[];

  beforeAll(async () => {
    ({ repo } = await makeRepo("four"));
    // Upstream moves on (another clone pushes), and the working tree has an uncommitted change.
    const other = join(work, "other-clone");
    await run("git", ["clone", "-q", join(dataRoot, "four-origin.git"), other]);
    await writeFile(join(other, "upstream.txt"), "from upstream\n");
    await g(other, "add", "upstream.txt");
    await g(other, "commit", "-q", "-m", "upstream change");
    await g(other, "push", "-q", "origin", "main");
    await writeFile(join(repo, "local.txt"), "uncommitted local change\n");
    events = await all(
      api.tasks.createTaskRun(
        request({
          repository: repo,
          request: ["# Work", "- create a.txt alpha", "- secret openai_key b.txt", "- append README.md gamma", "- create README.md conflicting"].join("\n"),
          profile: profile({ secrets: ["openai_key"] }),
        }),
      ),
    );
    expect(outcome(events).error?.message ?? "").toBe("");
    result = TaskRun.decode(outcome(events).result!.value);
  }, 300_000);

  test("three tasks are merged into the service branch and the conflicting fourth keeps its own branch", async () => {
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    expect(result.state).toBe(TaskRunState.TASK_RUN_STATE_SUCCEEDED);
    expect(result.tasks.map((t) => t.text)).toEqual(["create a.txt alpha", "secret openai_key b.txt", "append README.md gamma", "create README.md conflicting"]);
    expect(result.tasks.map((t) => t.status)).toEqual([TaskStatus.TASK_STATUS_MERGED, TaskStatus.TASK_STATUS_MERGED, TaskStatus.TASK_STATUS_MERGED, TaskStatus.TASK_STATUS_CONFLICTED]);
    expect(result.tasks[3]!.mergeOutcome).toContain("README.md");
    const service = result.serviceBranch;
    expect(service).toBe(`piccolo/${result.id}`);

    // Independently, with git: the branches, the merges and the contents.
    const branches = (await g(repo, "branch", "-a", "--format=%(refname:short)")).split("\n");
    for (const b of [service, ...[1, 2, 3, 4].map((i) => `${service}-task-${i}`)]) expect(branches).toContain(b);
    expect(result.branches).toEqual([service, ...[1, 2, 3, 4].map((i) => `${service}-task-${i}`)]);
    const graph = await g(repo, "log", "--graph", "--oneline", service);
    expect(graph.match(/Merge task \d/g)).toEqual(["Merge task 3", "Merge task 2", "Merge task 1"]);
    expect(await g(repo, "show", `${service}:a.txt`)).toBe("alpha");
    expect(await g(repo, "show", `${service}:README.md`)).toBe("base\ngamma");
    expect(await g(repo, "show", `${service}-task-4:README.md`)).toBe("conflicting");
    for (const t of result.tasks.slice(0, 3)) {
      expect(await g(repo, "rev-parse", `${service}-task-${t.index}`)).toBe(t.commit);
      expect((await run("git", ["-C", repo, "merge-base", "--is-ancestor", t.commit, service])).code).toBe(0);
    }
    expect((await run("git", ["-C", repo, "merge-base", "--is-ancestor", result.tasks[3]!.commit, service])).code).toBe(1);
    // The sync step: the local change was committed and upstream pulled before the branches.
    expect(result.syncCommit).not.toBe("");
    expect(await g(repo, "show", `${service}:local.txt`)).toBe("uncommitted local change");
    expect(await g(repo, "show", `${service}:upstream.txt`)).toBe("from upstream");
    // The agent got the secret as a file: it wrote its hash (never the value) into the repository.
    expect(await g(repo, "show", `${service}:b.txt`)).toBe(createHash("sha256").update(SECRET).digest("hex"));
    // The agent's log tail is in the result.
    expect(result.tasks[0]!.logTail).toContain("agent: done: create");
  });

  test("progress names each phase and every task's status", () => {
    const phases = [...new Set(events.filter((e) => e.progress).map((e) => e.progress!.phase))];
    expect(phases).toEqual(expect.arrayContaining(["plan", "sync", "branches", "task_1", "task_2", "task_3", "task_4", "result"]));
    const last = events.filter((e) => e.progress).at(-1)!.progress!;
    expect(last.items.map((i) => `${i.id}=${i.status}`)).toEqual(["task_1=merged", "task_2=merged", "task_3=merged", "task_4=conflicted"]);
  });

  test("nothing is left behind: no containers, worktrees or secret files; the run is listed", async () => {
    expect((await engine.ps()).filter((c) => (c["Names"] ?? "").startsWith("piccolo-task-"))).toEqual([]);
    expect((await g(repo, "worktree", "list")).split("\n")).toHaveLength(1);
    expect(await readdir(secretsDir)).toEqual([]);
    const listed = await api.tasks.listTaskRuns({ pageSize: 0 });
    expect(listed.runs.map((r) => r.id)).toContain(result.id);
    const got = await api.tasks.getTaskRun({ id: result.id });
    expect(got.tasks.map((t) => t.status)).toEqual(result.tasks.map((t) => t.status));
    const viaRest = await d.rest().tasks.getTaskRun({ id: result.id });
    expect(viaRest.serviceBranch).toBe(result.serviceBranch);
  });

  test("no secret value in the daemon's output, the audit log or the repository history", async () => {
    await expectNoSecretLeak(repo);
  });
});

describe("bad input changes nothing", () => {
  let repo: string;
  beforeAll(async () => {
    ({ repo } = await makeRepo("bad"));
  }, 60_000);

  test("each refusal is a clear error before any branch is made", async () => {
    const before = await repoState(repo);
    const psBefore = (await engine.ps()).length;
    const notRepo = join(dataRoot, "not-a-repo");
    await mkdir(notRepo, { recursive: true });
    const cases: [CreateTaskRunRequest, number, string, RegExp][] = [
      [request({ repository: notRepo, request: "create x.txt x" }), grpc.status.FAILED_PRECONDITION, "repository", /not a git repository/],
      [request({ repository: "/etc", request: "create x.txt x" }), grpc.status.INVALID_ARGUMENT, "repository", /refused|outside/],
      [request({ repository: repo, request: "create x.txt x", profile: profile({ image: "piccolo-test/no-such-agent:1" }) }), grpc.status.FAILED_PRECONDITION, "profile.image", /not on this host/],
      [request({ repository: repo, request: "create x.txt x", profile: profile({ secrets: ["no_such_key"] }) }), grpc.status.FAILED_PRECONDITION, "profile.secrets[0]", /no sealed secret/],
      [request({ repository: repo, request: "\n# only a heading\n\n" }), grpc.status.INVALID_ARGUMENT, "request", /no task/],
      [request({ repository: repo, request: "create x.txt x", baseBranch: "no-such-branch" }), grpc.status.FAILED_PRECONDITION, "base_branch", /no branch/],
      [request({ repository: repo, request: "create x.txt x", profile: profile({ commandTemplate: 'agent exec "{prompt}' }) }), grpc.status.INVALID_ARGUMENT, "profile.command_template", /unterminated/],
    ];
    for (const [req, code, field, message] of cases) {
      const f = await failure(api.tasks.createTaskRun(req));
      expect({ field: f.field, code: f.code }).toEqual({ field, code });
      expect(f.message).toMatch(message);
    }
    expect(await repoState(repo)).toBe(before);
    expect((await engine.ps()).length).toBe(psBefore);
  });

  test("a dirty tree that cannot be committed (a merge with conflicts) is refused and left as it was", async () => {
    const { repo: r } = await makeRepo("conflicted");
    await g(r, "checkout", "-q", "-b", "side");
    await writeFile(join(r, "README.md"), "side\n");
    await g(r, "commit", "-q", "-am", "side");
    await g(r, "checkout", "-q", "main");
    await writeFile(join(r, "README.md"), "main\n");
    await g(r, "commit", "-q", "-am", "main");
    expect((await run("git", ["-C", r, "merge", "side"])).code).not.toBe(0);
    const before = await repoState(r);
    const f = await failure(api.tasks.createTaskRun(request({ repository: r, request: "create x.txt x" })));
    expect(f.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(f.field).toBe("repository");
    expect(f.message).toMatch(/middle of a merge|unmerged/);
    expect(await repoState(r)).toBe(before);
  });

  test("a dirty tree whose commit a hook refuses: the run fails before any branch, the index as it was", async () => {
    const { repo: r } = await makeRepo("hooked");
    await writeFile(join(r, ".git", "hooks", "pre-commit"), "#!/bin/sh\necho 'pre-commit: refusing this commit' >&2\nexit 1\n", { mode: 0o755 });
    await writeFile(join(r, "README.md"), "base\nstaged edit\n");
    await g(r, "add", "README.md");
    await writeFile(join(r, "new.txt"), "untracked\n");
    const before = await repoState(r);
    const events = await all(api.tasks.createTaskRun(request({ repository: r, request: "create x.txt x" })));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_FAILED);
    expect(outcome(events).error!.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(outcome(events).error!.message).toMatch(/could not be committed.*pre-commit: refusing/);
    expect(await repoState(r)).toBe(before);
    expect(await g(r, "status", "--porcelain")).toBe("M  README.md\n?? new.txt".trim());
  });

  test("a planner answer that is not a task list fails the run before any git change", async () => {
    plannerAnswer = "Sure! Here is what I would do: first write the code, then test it.";
    const before = await repoState(repo);
    const events = await all(
      api.tasks.createTaskRun(request({ repository: repo, request: "make it better", profile: profile({ plannerUrl: sim.url, plannerModel: "sim-planner-1", plannerSecret: "planner_key" }) })),
    );
    expect(outcome(events).state).toBe(S.OPERATION_STATE_FAILED);
    expect(outcome(events).error!.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(outcome(events).error!.message).toMatch(/not a task list/);
    expect(await repoState(repo)).toBe(before);
    plannerAnswer = JSON.stringify({ tasks: ["create x.txt x", "two\nlines"], prompt: "Task: {task}" });
    const again = await all(
      api.tasks.createTaskRun(request({ repository: repo, request: "make it better", profile: profile({ plannerUrl: sim.url, plannerModel: "sim-planner-1", plannerSecret: "planner_key" }) })),
    );
    expect(outcome(again).error!.message).toMatch(/not a task list.*one line/);
    expect(await repoState(repo)).toBe(before);
  });
});

test("the model planner's task list and prompt drive the run (over REST, repository at /src); its key travels only to the endpoint", async () => {
  const { repo } = await makeRepo("model");
  plannerAnswer = "```json\n" + JSON.stringify({ tasks: ["create m1.txt one", "create m2.txt two"], prompt: "Work in the repository. Task: {task}" }) + "\n```";
  const requestsBefore = sim.requests.length;
  const events = await all(
    d.rest().tasks.createTaskRun(
      request({
        repository: repo,
        request: "Add two files, m1 and m2.",
        promptTemplate: "",
        profile: profile({ plannerUrl: sim.url, plannerModel: "sim-planner-1", plannerSecret: "planner_key", mountPath: "/src" }),
      }),
    ),
  );
  expect(outcome(events).error?.message ?? "").toBe("");
  const result = TaskRun.decode(outcome(events).result!.value);
  expect(result.promptTemplate).toBe("Work in the repository. Task: {task}");
  expect(result.tasks.map((t) => [t.text, t.status])).toEqual([
    ["create m1.txt one", TaskStatus.TASK_STATUS_MERGED],
    ["create m2.txt two", TaskStatus.TASK_STATUS_MERGED],
  ]);
  expect(await g(repo, "show", `${result.serviceBranch}:m2.txt`)).toBe("two");
  const sent = sim.requests.slice(requestsBefore);
  expect(sent).toHaveLength(1);
  expect(sent[0]!.authorization).toBe(`Bearer ${PLANNER_SECRET}`);
  expect(sent[0]!.body.messages.at(-1)).toEqual({ role: "user", content: "Add two files, m1 and m2." });
  await expectNoSecretLeak(repo);
}, 300_000);

test("cancel stops the running agent within the grace period and keeps the branches", async () => {
  const { repo } = await makeRepo("cancel");
  const grace = 2;
  const stream = api.tasks.createTaskRun(
    request({ repository: repo, request: "- create c1.txt first\n- sleep 600\n- create c3.txt never", profile: profile({ secrets: ["openai_key"], gracePeriodSeconds: grace }) }),
  );
  const events: OperationEvent[] = [];
  const done = (async () => {
    for await (const e of stream) events.push(e);
  })();
  // Wait until the second agent runs.
  let name = "";
  for (let i = 0; i < 600 && !name; i++) {
    await new Promise((r) => setTimeout(r, 200));
    name = (await engine.ps()).find((c) => /^piccolo-task-.*-2$/.test(c["Names"] ?? "") && c["State"] === "running")?.["Names"] ?? "";
  }
  expect(name).not.toBe("");
  // The secret is a file on a read-only tmpfs bind mount: not in the container's config.
  const inspectText = await engine.dockerOk(["inspect", name]);
  expect(inspectText).not.toContain(SECRET);
  const info = (JSON.parse(inspectText) as { Mounts: { Source: string; Destination: string; RW: boolean }[]; Config: { Env: string[]; Cmd: string[] } }[])[0]!;
  const secretMount = info.Mounts.find((m) => m.Destination === "/run/secrets")!;
  expect(secretMount.RW).toBe(false);
  expect(secretMount.Source.startsWith(secretsDir)).toBe(true);
  expect(info.Config.Cmd).toEqual(["agent", "exec", "You are a coding agent. Task: sleep 600"]);
  expect(await engine.dockerOk(["exec", name, "sh", "-c", "sha256sum < /run/secrets/openai_key | cut -d' ' -f1"])).toBe(createHash("sha256").update(SECRET).digest("hex") + "\n");

  const id = events.find((e) => e.attached)!.attached!.id;
  // One run per repository at a time.
  const second = await failure(api.tasks.createTaskRun(request({ repository: repo, request: "create z.txt z" })));
  expect([second.code, second.field]).toEqual([grpc.status.FAILED_PRECONDITION, "repository"]);
  expect(second.message).toContain(id);
  const since = Math.floor(Date.now() / 1000) - 1;
  const cancelledAt = Date.now();
  const cancelled = await run(process.execPath, [CLI_JS, "--endpoint", `unix://${d.endpoints.socket}`, "tasks", "cancel", id]);
  expect(cancelled.stdout).toContain(`cancelling ${id}`);
  expect(cancelled.code).toBe(0);
  await done;
  expect(outcome(events).state).toBe(S.OPERATION_STATE_CANCELLED);
  // The engine's own record: the container died within the grace period (plus slack for a busy machine).
  const ev = await engine.dockerOk(["events", "--since", String(since), "--until", String(Math.ceil(Date.now() / 1000) + 1), "--filter", `container=${name}`, "--filter", "event=die", "--format", "{{.TimeNano}}"]);
  const diedAt = Number(BigInt(ev.trim().split("\n")[0]!) / 1_000_000n);
  expect(diedAt - cancelledAt).toBeLessThan((grace + 15) * 1000);
  expect((await engine.ps()).filter((c) => (c["Names"] ?? "").startsWith("piccolo-task-"))).toEqual([]);

  const run2 = await api.tasks.getTaskRun({ id });
  expect(run2.state).toBe(TaskRunState.TASK_RUN_STATE_CANCELLED);
  expect(run2.tasks.map((t) => t.status)).toEqual([TaskStatus.TASK_STATUS_MERGED, TaskStatus.TASK_STATUS_CANCELLED, TaskStatus.TASK_STATUS_CANCELLED]);
  const refs = (await g(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/")).split("\n");
  expect(run2.branches.length).toBe(4);
  for (const b of run2.branches) expect(refs).toContain(b);
  expect(await g(repo, "show", `${run2.serviceBranch}:c1.txt`)).toBe("first");
  expect(await readdir(secretsDir)).toEqual([]);
  expect((await g(repo, "worktree", "list")).split("\n")).toHaveLength(1);
  const again = await failure((async function* () {
    yield await api.tasks.cancelTaskRun({ id });
  })());
  expect(again.code).toBe(grpc.status.FAILED_PRECONDITION);
  await expectNoSecretLeak(repo);
}, 300_000);

describe("agent services", () => {
  const unitDir = (): string => join(work, "units");
  const req = (writeOnly: boolean) => ({
    name: "helper",
    profile: profile({ secrets: ["openai_key"], cpus: 1, memoryBytes: 256 * 1024 * 1024 }),
    repository: dataRoot,
    prompt: "Keep the docs tidy. 100% of them.",
    writeOnly,
  });

  test("the generated unit loads the sealed key, is hardened, and passes systemd-analyze verify", async () => {
    const svc = await api.tasks.createAgentService(req(true));
    expect(svc.unit).toBe("piccolo-agent-helper.service");
    expect(svc.started).toBe(false);
    const text = await readFile(join(unitDir(), svc.unit), "utf8");
    expect(text).toBe(svc.unitText);
    // systemd and `systemctl cat` read it whatever the daemon's umask.
    expect((await stat(join(unitDir(), svc.unit))).mode & 0o777).toBe(0o644);
    for (const line of ["DynamicUser=yes", "PrivateUsers=yes", "PrivateNetwork=yes", "DeviceAllow=", "DevicePolicy=closed"]) expect(text.split("\n")).toContain(line);
    expect(text).toContain(`LoadCredentialEncrypted=piccolod_openai_key:${join(d.stateDir, "secrets", "openai_key")}`);
    expect(text).toContain("source=%d/piccolod_openai_key,target=/run/secrets/openai_key,readonly");
    expect(text).toContain('"Keep the docs tidy. 100%% of them."');
    expect(text).not.toContain(SECRET);
    const verify = await run("systemd-analyze", ["verify", "--man=no", join(unitDir(), svc.unit)]);
    expect(verify.stderr).toBe("");
    expect(verify.code).toBe(0);
    expect((await api.tasks.createAgentService(req(true))).replaced).toBe(true);
  });

  test("without systemd on the bus it is UNAVAILABLE naming systemd, and the unit folder stays as it was", async () => {
    const before = await readFile(join(unitDir(), "piccolo-agent-helper.service"), "utf8");
    const changed = { ...req(false), prompt: "another prompt" };
    const f = await failure((async function* () {
      yield await api.tasks.createAgentService(changed);
    })());
    expect(f.code).toBe(grpc.status.UNAVAILABLE);
    expect(f.message).toContain("org.freedesktop.systemd1");
    expect(await readFile(join(unitDir(), "piccolo-agent-helper.service"), "utf8")).toBe(before);
    const fresh = await failure((async function* () {
      yield await api.tasks.createAgentService({ ...changed, name: "other" });
    })());
    expect(fresh.code).toBe(grpc.status.UNAVAILABLE);
    expect((await readdir(unitDir())).sort()).toEqual(["piccolo-agent-helper.service"]);
  });

  test("a bad request names its field", async () => {
    const f = await failure((async function* () {
      yield await api.tasks.createAgentService({ ...req(true), name: "Bad Name" });
    })());
    expect([f.code, f.field]).toEqual([grpc.status.INVALID_ARGUMENT, "name"]);
    const s = await failure((async function* () {
      yield await api.tasks.createAgentService({ ...req(true), profile: profile({ secrets: ["missing_key"] }) });
    })());
    expect([s.code, s.field]).toEqual([grpc.status.FAILED_PRECONDITION, "profile.secrets[0]"]);
  });
});

describe("piccoloctl tasks", () => {
  const cli = (args: readonly string[]) => run(process.execPath, [CLI_JS, "--endpoint", `unix://${d.endpoints.socket}`, ...args], { timeoutMs: 240_000 });

  test("run follows each task's phase and ends with the per-task table; list, get and bad flags", async () => {
    const { repo } = await makeRepo("cli");
    const r = await cli(["tasks", "run", "--repo", repo, "--request", "- create x.txt ex\n- fail", "--prompt", "Task: {task}", "--image", AGENT_IMAGE, "--command", 'agent exec "{prompt}"', "--network", "none"]);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    for (const phase of ["plan", "sync", "branches", "task_1", "task_2", "result"]) expect(r.stdout).toContain(phase);
    expect(r.stdout).toMatch(/1\s+merged\s+[0-9a-f]{12}\s+piccolo\/op-\S+-task-1\s+create x.txt ex\s+merged/);
    expect(r.stdout).toMatch(/2\s+failed\s+-\s+piccolo\/op-\S+-task-2\s+fail\s+not merged: the agent exited with 3/);
    expect(r.stdout).toContain("agent: failing on purpose");
    const id = /^id:\s+(op-\S+)$/m.exec(r.stdout)![1]!;
    const list = await cli(["tasks", "list"]);
    expect(list.stdout).toMatch(new RegExp(`${id}\\s+SUCCEEDED\\s+2\\s+1\\s+0\\s+1`));
    const got = await cli(["-o", "json", "tasks", "get", id]);
    expect((JSON.parse(got.stdout) as { tasks: { status: string }[] }).tasks.map((t) => t.status)).toEqual(["TASK_STATUS_MERGED", "TASK_STATUS_FAILED"]);
    const usage = await cli(["tasks", "run", "--repo", repo, "--request", "x", "--command", "agent"]);
    expect(usage.code).toBe(2);
    expect(usage.stderr).toContain("--image");
    const missing = await cli(["tasks", "get", "op-nope"]);
    expect(missing.code).not.toBe(0);
    expect(missing.stderr).toContain("NOT_FOUND");
  }, 300_000);
});

test("a daemon killed mid-run: the next start removes the agent container and marks the run INTERRUPTED, branches kept", async () => {
  const { repo } = await makeRepo("crash");
  const stream = api.tasks.createTaskRun(request({ repository: repo, request: "- create k1.txt one\n- sleep 600", profile: profile({ secrets: ["openai_key"] }) }));
  const events: OperationEvent[] = [];
  const done = (async () => {
    for await (const e of stream) events.push(e);
  })().catch(() => undefined);
  let name = "";
  for (let i = 0; i < 600 && !name; i++) {
    await new Promise((r) => setTimeout(r, 200));
    name = (await engine.ps()).find((c) => /^piccolo-task-.*-2$/.test(c["Names"] ?? "") && c["State"] === "running")?.["Names"] ?? "";
  }
  expect(name).not.toBe("");
  const id = events.find((e) => e.attached)!.attached!.id;
  await d.kill9();
  await done;
  // The secret file of the run is still in memory until the next start cleans up.
  await d.restart();
  api = d.grpcUnix();
  const rec = await api.tasks.getTaskRun({ id });
  expect(rec.state).toBe(TaskRunState.TASK_RUN_STATE_INTERRUPTED);
  expect(rec.tasks.map((t) => t.status)).toEqual([TaskStatus.TASK_STATUS_MERGED, TaskStatus.TASK_STATUS_CANCELLED]);
  const op = await api.operations.getOperation({ id });
  expect(op.error!.message).toContain(`removed container ${name}`);
  expect(op.error!.message).toContain("branches kept");
  expect((await engine.ps()).filter((c) => c["Names"] === name)).toEqual([]);
  expect(await readdir(secretsDir)).toEqual([]);
  const refs = (await g(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/")).split("\n");
  for (const b of rec.branches) expect(refs).toContain(b);
  expect((await g(repo, "worktree", "list")).split("\n")).toHaveLength(1);
  await expectNoSecretLeak(repo);
}, 300_000);
