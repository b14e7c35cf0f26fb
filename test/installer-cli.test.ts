/**
 * piccoloctl install against the real daemon: disks as a table, a plan that changes nothing,
 * a run that is refused without confirmation and one that installs with --yes (over gRPC and
 * through the REST gateway), with the progress bar on stderr-free stdout and the result at the end.
 */
import { spawn } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CLI_JS, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { buildFlatcarImage, compress, makeSigningKey, readPartitions, sha256Of, sparseTarget, type SigningKey } from "./helpers/flatcar-image.js";

const MiB = 1024 * 1024;
let work: string;
let d: TestDaemon;
let key: SigningKey;
let image: string;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}
function cli(args: readonly string[], input?: string): Promise<Run> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI_JS, ...args], { env: { ...process.env, ...d.cliEnv(), PICCOLO_ENDPOINT: `unix://${d.endpoints.socket}` }, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.stdin.end(input ?? "");
    p.on("close", (code) => resolve({ code, stdout, stderr }));
  });
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-install-cli-"));
  const images = join(work, "images");
  const targets = join(work, "targets");
  await import("node:fs/promises").then((f) => Promise.all([f.mkdir(images), f.mkdir(targets)]));
  key = makeSigningKey();
  const raw = buildFlatcarImage(join(images, "piccolo-os-4.5.6.img"), 64);
  image = compress(raw.raw, "gzip");
  key.sign(image);
  await rm(raw.raw); // the live medium carries only the signed, compressed image
  d = await startTestDaemon({
    extraArgs: ["--installer-image-dirs", images, "--installer-file-target-dirs", targets, "--installer-keyrings", key.keyring, "--installer-min-disk-bytes", "0"],
  });
}, 120_000);

afterAll(async () => {
  await d?.cleanup();
  key?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

test("the old key --installer-keyrings still works (the installs below check against it) and is logged as deprecated", () => {
  const line = d.output().split("\n").find((l) => l.includes('"msg":"deprecated configuration key"'));
  expect(line).toMatch(/installerKeyrings \(from flag --installer-keyrings\) is deprecated: use signingKeyFiles/);
});

test("install env, disks and plan; plan changes nothing", async () => {
  const env = await cli(["install", "env"]);
  expect(env.code).toBe(0);
  expect(env.stdout).toMatch(/piccolo-os-4\.5\.6\.img\.gz\s+4\.5\.6/);
  const disks = await cli(["install", "disks"]);
  expect(disks.code).toBe(0);
  expect(disks.stdout).toMatch(/^DISK\s+SIZE\s+TRANSPORT\s+MODEL\s+PARTITIONS\s+INSTALL/m);
  const target = sparseTarget(join(work, "targets", "plan.img"), 128 * MiB, true);
  const before = sha256Of(target);
  const plan = await cli(["install", "plan", target, "--image", image, "--hostname", "box"]);
  expect(plan.code).toBe(0);
  expect(plan.stdout).toMatch(/erased:\n {2}\S+#1 OLD-DATA/);
  expect(plan.stdout).toMatch(/written last/);
  expect(plan.stdout).toMatch(/confirmation token: \S+\.\S+/);
  expect(sha256Of(target)).toBe(before);
  const json = await cli(["-o", "json", "install", "plan", target, "--live"]);
  expect(JSON.parse(json.stdout)).toMatchObject({ imageVersion: "4.5.6", compression: "gzip" });
});

test("install run: refused unless confirmed; with --yes it installs with progress, over gRPC and REST", async () => {
  const target = sparseTarget(join(work, "targets", "run.img"), 128 * MiB, true);
  const before = sha256Of(target);
  const no = await cli(["install", "run", target, "--image", image], "no\n");
  expect(no.code).toBe(1);
  expect(no.stderr).toMatch(/not confirmed; nothing was written/);
  expect(sha256Of(target)).toBe(before);

  const typed = await cli(["install", "run", target, "--image", image], `${target}\n`);
  expect(typed.stderr).toMatch(/Erase .* and install\?/);
  expect(typed.code).toBe(0);
  expect(typed.stdout).toMatch(/SUCCEEDED/);
  expect(readPartitions(target).find((p) => p.name === "ROOT")!.lastLba).toBe((128 * MiB) / 512 - 34);

  const target2 = sparseTarget(join(work, "targets", "run2.img"), 160 * MiB);
  const rest = await cli(["--endpoint", d.endpoints.rest, "install", "run", target2, "--live", "--yes", "--hostname", "box"]);
  expect({ code: rest.code, stderr: rest.code === 0 ? "" : rest.stderr }).toEqual({ code: 0, stderr: "" });
  expect(rest.stdout).toMatch(/SUCCEEDED/);
  expect(rest.stdout).toMatch(/ignitionWritten/);
  expect(readPartitions(target2).map((p) => p.name)).toEqual(["EFI-SYSTEM", "BIOS-BOOT", "USR-A", "USR-B", "OEM", "ROOT"]);
  const bad = await cli(["install", "run", target2, "--image", image, "--live"]);
  expect(bad.code).toBe(2);
  expect(bad.stderr).toMatch(/exactly one of --image PATH, --live and --version V/);
  const both = await cli(["install", "plan", target2, "--version", "1.2.3", "--live"]);
  expect(both.code).toBe(2);
});
