/**
 * piccoloctl containers/images end to end: the built CLI run as a child process against the real
 * daemon and a real dockerd (test/helpers/dockerd.ts), each change checked with the docker CLI as
 * an independent client. Life cycle over the unix socket and the REST gateway, `run` twice,
 * `logs -f` until Ctrl-C, `events`, an import with NDJSON progress, `images ls`, and the errors.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CLI_JS, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { startDockerd, type TestDockerd } from "./helpers/dockerd.js";

let engine: TestDockerd;
let d: TestDaemon;
let work: string;
let dataRoot: string;

const IMAGE = "piccolo-test/cli:1";

beforeAll(async () => {
  engine = await startDockerd();
  await engine.makeImage(IMAGE);
  work = await mkdtemp(join(tmpdir(), "piccolod-cli-ctr-"));
  dataRoot = join(work, "data");
  await mkdir(dataRoot, { recursive: true });
  d = await startTestDaemon({ extraArgs: ["--docker-socket", engine.socket, "--container-data-roots", dataRoot] });
});

afterAll(async () => {
  await d?.cleanup();
  await engine?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** None of the caller's PICCOLO_* or NODE_OPTIONS; the test daemon's token and TLS fingerprint for TCP endpoints. */
function cliEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of Object.keys(env)) if (k.startsWith("PICCOLO_") || k === "NODE_OPTIONS") delete env[k];
  return { ...env, ...d.cliEnv() };
}

/** Runs piccoloctl; `onOutput` sees stdout and stderr as they grow, with the child (to signal it). */
function cli(args: readonly string[], onOutput?: (out: { stdout: string; stderr: string }, p: ChildProcess) => void): Promise<Run> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI_JS, ...args], { env: cliEnv(), stdio: ["ignore", "pipe", "pipe"] });
    const out = { stdout: "", stderr: "" };
    p.stdout.on("data", (b: Buffer) => {
      out.stdout += b.toString();
      onOutput?.(out, p);
    });
    p.stderr.on("data", (b: Buffer) => {
      out.stderr += b.toString();
      onOutput?.(out, p);
    });
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, ...out }));
  });
}

const unix = (): string => `unix://${d.endpoints.socket}`;
const ndjson = (text: string): Record<string, any>[] =>
  text
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Record<string, any>);

async function inspect(name: string): Promise<any> {
  return (JSON.parse(await engine.dockerOk(["inspect", "--type", "container", name])) as any[])[0];
}

test("create → start → logs → stats → stop → rm through the CLI, each step checked with docker", async () => {
  const name = "cli-life";
  const create = await cli([
    "--endpoint", unix(), "containers", "create", name, "--image", IMAGE, "--network", "none",
    "--cmd", `sh -c "echo hello-out; echo hello-err >&2; exec sleep 3600"`,
    "-e", "GREETING=hi there", "-l", "tier=test", "--memory", "64m", "--restart", "on-failure:3",
  ]);
  expect({ code: create.code, stderr: create.stderr }).toEqual({ code: 0, stderr: "" });
  expect(create.stdout).toMatch(new RegExp(`^created ${name} \\([0-9a-f]{12}\\)$`, "m"));
  let i = await inspect(name);
  expect(i.State.Status).toBe("created");
  expect(i.Config.Env).toContain("GREETING=hi there");
  expect(i.Config.Labels).toMatchObject({ tier: "test", "space.piccolo.managed": "true" });
  expect(i.Config.Cmd).toEqual(["sh", "-c", "echo hello-out; echo hello-err >&2; exec sleep 3600"]);
  expect(i.HostConfig.Memory).toBe(64 * 1024 * 1024);
  expect(i.HostConfig.RestartPolicy).toEqual({ Name: "on-failure", MaximumRetryCount: 3 });

  const ls = await cli(["--endpoint", d.endpoints.rest, "containers", "ls"]);
  expect(ls.code).toBe(0);
  expect(ls.stdout).toMatch(/^NAME\s+IMAGE\s+STATE\s+STATUS\s+PORTS$/m);
  expect(ls.stdout).toMatch(new RegExp(`^${name}\\s+${IMAGE.replace(/[/.]/g, "\\$&")}\\s+created\\s`, "m"));

  const start = await cli(["--endpoint", d.endpoints.rest, "containers", "start", name]);
  expect({ code: start.code, stderr: start.stderr }).toEqual({ code: 0, stderr: "" });
  expect(start.stdout).toMatch(new RegExp(`^started ${name}: running`));
  i = await inspect(name);
  expect(i.State.Running).toBe(true);

  const get = await cli(["--endpoint", unix(), "containers", "get", name, "-o", "json"]);
  expect(get.code).toBe(0);
  const got = JSON.parse(get.stdout) as Record<string, any>;
  expect(got).toMatchObject({ name, id: i.Id, state: "CONTAINER_STATE_RUNNING", managed: true });
  expect(got["spec"]["restartPolicy"]).toBe("RESTART_POLICY_ON_FAILURE");

  // Logs: stdout lines to stdout, stderr lines to stderr (wait for the shell to have written both).
  let logs: Run = { code: null, stdout: "", stderr: "" };
  for (let t = 0; t < 50; t++) {
    logs = await cli(["--endpoint", unix(), "containers", "logs", name]);
    if (logs.stdout.includes("hello-out") && logs.stderr.includes("hello-err")) break;
    await new Promise((r) => setTimeout(r, 200));
  }
  expect(logs.code).toBe(0);
  expect(logs.stdout).toBe("hello-out\n");
  expect(logs.stderr).toBe("hello-err\n");
  const stamped = await cli(["--endpoint", d.endpoints.rest, "containers", "logs", name, "-t", "--tail", "1", "-o", "json"]);
  expect(stamped.code).toBe(0);
  const entries = ndjson(stamped.stdout);
  expect(entries).toHaveLength(1);
  expect(entries[0]!["time"]).toMatch(/^\d{4}-\d{2}-\d{2}T/);

  const stats = await cli(["--endpoint", unix(), "containers", "stats", name, "-o", "json"]);
  expect({ code: stats.code, stderr: stats.stderr }).toEqual({ code: 0, stderr: "" });
  const s = JSON.parse(stats.stdout) as Record<string, any>;
  expect(s).toMatchObject({ id: i.Id, name });
  expect(s["pids"]).toBeGreaterThanOrEqual(1);
  expect(Number(s["memoryLimitBytes"])).toBe(64 * 1024 * 1024);
  const statsText = await cli(["--endpoint", unix(), "containers", "stats", name]);
  expect(statsText.stdout).toMatch(/^NAME\s+CPU %\s+MEM USAGE \/ LIMIT/);
  expect(statsText.stdout).toMatch(new RegExp(`^${name}\\s+[\\d.]+%\\s+[\\d.]+ \\S+ / 64\\.0 MiB`, "m"));

  const stop = await cli(["--endpoint", unix(), "containers", "stop", name, "-t", "1"]);
  expect({ code: stop.code, stderr: stop.stderr }).toEqual({ code: 0, stderr: "" });
  expect(stop.stdout).toMatch(new RegExp(`^stopped ${name}: exited`));
  i = await inspect(name);
  expect(i.State.Status).toBe("exited");

  const removed = await cli(["--endpoint", d.endpoints.rest, "containers", "rm", name]);
  expect({ code: removed.code, stderr: removed.stderr }).toEqual({ code: 0, stderr: "" });
  expect(removed.stdout).toBe(`removed ${name} (${(i.Id as string).slice(0, 12)})\n`);
  expect((await engine.ps()).map((c) => c["Names"])).not.toContain(name);
});

test("containers run twice: created and started, then already running; events sees the start", async () => {
  const name = "cli-run";
  let started = false;
  const events = cli(["--endpoint", unix(), "containers", "events", "--name", name], (out, p) => {
    if (!started && /\sstart\s+cli-run\s/.test(out.stdout)) {
      started = true;
      p.kill("SIGINT");
    }
  });
  await new Promise((r) => setTimeout(r, 1000)); // let the event stream attach

  const args = ["containers", "run", name, "--image", IMAGE, "--network", "none", "-p", "127.0.0.1:0:80/tcp", "--", "sleep", "3600"];
  const first = await cli(["--endpoint", unix(), ...args]);
  expect({ code: first.code, stderr: first.stderr }).toEqual({ code: 0, stderr: "" });
  expect(first.stdout).toMatch(new RegExp(`^${name} \\([0-9a-f]{12}\\): created and started\\n$`));
  const i = await inspect(name);
  expect(i.State.Running).toBe(true);
  expect(i.Config.Cmd).toEqual(["sleep", "3600"]);

  const second = await cli(["--endpoint", d.endpoints.rest, ...args]);
  expect({ code: second.code, stderr: second.stderr }).toEqual({ code: 0, stderr: "" });
  expect(second.stdout).toMatch(/: already running; nothing changed$/m);
  expect((await engine.ps()).filter((c) => c["Names"] === name)).toHaveLength(1);

  const ev = await events;
  expect(started).toBe(true);
  expect(ev.code).toBe(130);
  expect(ev.stdout).toMatch(/^\d{4}-\d{2}-\d{2}T\S+Z\s+create\s+cli-run\s+piccolo-test\/cli:1$/m);

  const rmRunning = await cli(["--endpoint", unix(), "containers", "rm", name]);
  expect(rmRunning.code).toBe(1);
  expect(rmRunning.stderr).toMatch(/^piccoloctl: FAILED_PRECONDITION: /);
  const forced = await cli(["--endpoint", unix(), "containers", "rm", "-f", name]);
  expect(forced.code).toBe(0);
  expect((await engine.ps()).map((c) => c["Names"])).not.toContain(name);
});

test("logs -f receives a line printed after the follow started and stops on SIGINT with 130", async () => {
  const name = "cli-follow";
  const script = 'echo ready; while [ ! -f /tmp/go ]; do sleep 0.1; done; echo late-line; echo late-err >&2; exec sleep 3600';
  const run = await cli(["--endpoint", unix(), "containers", "run", name, "--image", IMAGE, "--network", "none", "--", "sh", "-c", script]);
  expect(run.code).toBe(0);

  let poked = false;
  let interrupted = false;
  const follow = await cli(["--endpoint", unix(), "containers", "logs", "-f", name], (out, p) => {
    if (!poked && out.stdout.includes("ready\n")) {
      poked = true;
      void engine.dockerOk(["exec", name, "touch", "/tmp/go"]);
    }
    if (!interrupted && out.stdout.includes("late-line\n") && out.stderr.includes("late-err\n")) {
      interrupted = true;
      p.kill("SIGINT");
    }
  });
  expect(interrupted).toBe(true);
  expect(follow.code).toBe(130);
  expect(follow.stdout).toBe("ready\nlate-line\n");
  expect(follow.stderr).toBe("late-err\n");
  await engine.dockerOk(["rm", "-f", name]);
});

test("images import of a busybox rootfs: NDJSON ending SUCCEEDED, then images ls shows it", async () => {
  const tar = join(dataRoot, "rootfs.tar");
  await engine.writeRootfsTar(tar, { files: { "etc/motd": "imported\n" } });
  const r = await cli(["--endpoint", unix(), "images", "import", tar, "--rootfs", "--tag", "piccolo-test/imported:1", "-o", "json"]);
  expect({ code: r.code, stderr: r.stderr }).toEqual({ code: 0, stderr: "" });
  const events = ndjson(r.stdout);
  expect(events[0]!["attached"]["kind"]).toBe("containers.image_import");
  const last = events.at(-1)!;
  expect(last["outcome"]["state"]).toBe("OPERATION_STATE_SUCCEEDED");
  expect(last["outcome"]["result"]["@type"]).toBe("type.googleapis.com/piccolo.containers.v1.ImportImageResult");
  const images = last["outcome"]["result"]["images"] as { id: string; repoTags: string[] }[];
  expect(images[0]!.repoTags).toContain("piccolo-test/imported:1");
  const dockerImages = await engine.images();
  expect(dockerImages.find((i) => `${i["Repository"]}:${i["Tag"]}` === "piccolo-test/imported:1")?.["ID"]).toBe(images[0]!.id);

  // Text form over REST: plain progress lines, the outcome and the result.
  const text = await cli(["--endpoint", d.endpoints.rest, "images", "import", tar, "--rootfs", "--tag", "piccolo-test/imported:2"]);
  expect({ code: text.code, stderr: text.stderr }).toEqual({ code: 0, stderr: "" });
  expect(text.stdout).toMatch(/^\[0\] attached op-\S+ containers\.image_import /);
  expect(text.stdout).toMatch(/^op-\S+ SUCCEEDED$/m);
  expect(text.stdout).toMatch(/^read:\s+[\d.]+ \w+ \(\d+ bytes\)$/m);
  expect(text.stdout).toMatch(/^tags:\s+.*piccolo-test\/imported:2/m);

  const ls = await cli(["--endpoint", unix(), "images", "ls"]);
  expect(ls.code).toBe(0);
  expect(ls.stdout).toMatch(/^ID\s+TAGS\s+SIZE\s+CREATED$/m);
  expect(ls.stdout).toMatch(new RegExp(`^${images[0]!.id.replace("sha256:", "").slice(0, 12)}\\s+.*piccolo-test/imported:1`, "m"));

  const untag = await cli(["--endpoint", unix(), "images", "rm", "piccolo-test/imported:2"]);
  expect(untag.code).toBe(0);
  expect(untag.stdout).toContain("untagged: piccolo-test/imported:2");
  expect((await engine.images()).map((i) => `${i["Repository"]}:${i["Tag"]}`)).not.toContain("piccolo-test/imported:2");
});

test("rm of a missing container exits 1 with NOT_FOUND over gRPC and REST", async () => {
  for (const endpoint of [unix(), d.endpoints.rest]) {
    const r = await cli(["--endpoint", endpoint, "containers", "rm", "no-such-container"]);
    expect({ endpoint, code: r.code, stdout: r.stdout }).toEqual({ endpoint, code: 1, stdout: "" });
    expect(r.stderr).toMatch(/^piccoloctl: NOT_FOUND: .*no-such-container/);
  }
});

test("malformed flags exit 2 naming the flag, and nothing reaches the engine", async () => {
  const before = (await engine.ps()).length;
  const base = ["--endpoint", unix(), "containers", "create", "bad", "--image", IMAGE];
  const cases: [string[], string][] = [
    [[...base, "-p", "99999:80"], "-p"],
    [[...base, "-p", "8080:80/icmp"], "-p"],
    [[...base, "-e", "=x"], "-e"],
    [[...base, "-l", "novalue"], "-l"],
    [[...base, "--memory", "lots"], "--memory"],
    [[...base, "--cpus", "-1"], "--cpus"],
    [[...base, "--restart", "sometimes"], "--restart"],
    [[...base, "-v", "relative:/x"], "-v"],
    [[...base, "--volume-name", "vol"], "--volume-name"],
    [[...base, "--cmd", "sh -c 'unterminated"], "--cmd"],
    [["--endpoint", unix(), "containers", "logs", "x", "--since", "yesterday"], "--since"],
    [["--endpoint", unix(), "containers", "stop", "x", "-t", "5000"], "--time"],
    [["--endpoint", unix(), "containers", "create", "x"], "--image"],
  ];
  for (const [args, flag] of cases) {
    const r = await cli(args);
    expect({ args, code: r.code }).toEqual({ args, code: 2 });
    expect(r.stderr).toMatch(/^piccoloctl: /);
    expect(r.stderr).toContain(flag);
  }
  expect((await engine.ps()).length).toBe(before);
});
