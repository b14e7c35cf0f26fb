/**
 * piccoloctl's storage, backup and network commands against the real daemon (private dockerd,
 * swtpm, restic): text and JSON output, live progress of a backup, exit codes and usage errors.
 */
import { jest } from "@jest/globals";
import { spawn } from "node:child_process";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CLI_JS, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { run, startDockerd, type TestDockerd } from "./helpers/dockerd.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";

jest.setTimeout(300_000);

let engine: TestDockerd;
let tpm: Swtpm;
let d: TestDaemon;
let work: string;

function cli(args: readonly string[], input?: string): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const k of ["PICCOLO_ENDPOINT", "PICCOLO_TOKEN", "NODE_OPTIONS"]) delete env[k];
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI_JS, "--endpoint", `unix://${d.endpoints.socket}`, ...args], { env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, stdout, stderr }));
    p.stdin.end(input ?? "");
  });
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-cli-storage-"));
  [engine, tpm] = await Promise.all([startDockerd(), startSwtpm()]);
  await engine.makeImage("piccolo-test/cli:1");
  d = await startTestDaemon({ extraArgs: ["--docker-socket", engine.socket, "--tpm2-device", tpm.tcti, "--backup-repository-roots", work] });
});

afterAll(async () => {
  await d?.cleanup();
  await engine?.cleanup();
  await tpm?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

test("storage disks, filesystems and volumes", async () => {
  const disks = await cli(["storage", "disks"]);
  expect(disks.code).toBe(0);
  expect(disks.stdout.split("\n")[0]).toMatch(/^NAME\s+TYPE\s+SIZE/);
  const df = await cli(["-o", "json", "storage", "df"]);
  expect(df.code).toBe(0);
  expect((JSON.parse(df.stdout) as { filesystems: { mountPoint: string }[] }).filesystems.map((f) => f.mountPoint)).toContain("/");

  expect((await cli(["storage", "volumes", "create", "cli-vol", "-l", "app=cli"])).code).toBe(0);
  await engine.dockerOk(["run", "-d", "--name", "cli-app", "--network", "none", "-v", "cli-vol:/data", "piccolo-test/cli:1", "sleep", "3600"]);
  const ls = await cli(["storage", "volumes", "ls"]);
  expect(ls.stdout).toMatch(/cli-vol\s+yes\s+\S+\s+cli-app/);
  const rmInUse = await cli(["storage", "volumes", "rm", "cli-vol"]);
  expect(rmInUse.code).not.toBe(0);
  expect(rmInUse.stderr).toContain("cli-app");
  expect((await cli(["storage", "volumes", "create", "-bad"])).code).not.toBe(0);
});

test("backup init, create with progress, snapshots, verify, restore", async () => {
  const repo = join(work, "repo");
  const init = await cli(["backup", "init", repo]);
  expect(init.code).toBe(0);
  expect(init.stdout).toContain("sealed with tpm2");
  const mount = (await engine.dockerOk(["volume", "inspect", "-f", "{{.Mountpoint}}", "cli-vol"])).trim();
  await writeFile(join(mount, "hello.txt"), "hello\n");

  const usage = await cli(["backup", "create"]);
  expect(usage.code).toBe(2);
  expect(usage.stderr).toContain("--volume");

  const create = await cli(["backup", "create", "--volume", "cli-vol", "--quiesce", "pause"]);
  expect(create.stderr + create.stdout).toContain("backup");
  expect(create.code).toBe(0);
  expect(create.stdout).toContain("snapshotId");

  const snaps = await cli(["-o", "json", "backup", "snapshots"]);
  const list = (JSON.parse(snaps.stdout) as { snapshots: { id: string; scope: { volumes: string[] } }[] }).snapshots;
  expect(list).toHaveLength(1);
  expect(list[0]!.scope.volumes).toEqual(["cli-vol"]);
  const text = await cli(["backup", "snapshots"]);
  expect(text.stdout).toContain("volume:cli-vol");

  expect((await cli(["backup", "verify"])).code).toBe(0);

  await writeFile(join(mount, "hello.txt"), "changed\n");
  const restore = await cli(["backup", "restore", list[0]!.id.slice(0, 12), "--volume", "cli-vol"]);
  expect(restore.code).toBe(0);
  expect(await readFile(join(mount, "hello.txt"), "utf8")).toBe("hello\n");
  expect((await engine.dockerOk(["inspect", "-f", "{{.State.Running}}", "cli-app"])).trim()).toBe("true");

  const repoText = await cli(["backup", "repo"]);
  expect(repoText.stdout).toContain(repo);
  const forget = await cli(["backup", "forget"]);
  expect(forget.code).toBe(2);
  // restic agrees there is one snapshot.
  expect((await run("ls", [join(repo, "snapshots")])).stdout.trim().split("\n")).toHaveLength(1);
});

test("network interfaces and config, and a usage error for apply", async () => {
  const ifs = await cli(["network", "interfaces"]);
  expect(ifs.code).toBe(0);
  expect(ifs.stdout).toMatch(/^lo\s+UNKNOWN/m);
  const cfg = await cli(["-o", "json", "network", "config"]);
  expect(cfg.code).toBe(0);
  expect(JSON.parse(cfg.stdout)).toMatchObject({ configDir: join(d.dir, "systemd-network") });
  const bad = await cli(["network", "apply", "lo"]);
  expect(bad.code).toBe(2);
  expect(bad.stderr).toContain("--dhcp");
});
