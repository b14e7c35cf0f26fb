/**
 * Installing a version from the update server: the reference update server (test/sim) publishes
 * Flatcar-shaped install images signed with a throwaway key, and the real daemon plans, downloads
 * (resuming cut downloads with HTTP Range), checks and installs them onto loop devices and image
 * files. Refusals — a signature by an unknown key, a flipped byte, downloads that keep breaking —
 * leave the target's bytes as they were; a partial download is kept and resumed by the next install.
 */
import { spawn } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { InstallRequest, InstallResult, PlanInstallRequest, type InstallSpec } from "../gen/piccolo/installer/v1/installer.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import type { PiccoloGrpcClients } from "../src/clients/grpc-client.js";
import { CLI_JS, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { collect, outcome } from "./helpers/events.js";
import { attachLoop, buildFlatcarImage, compress, detachLoops, makeSigningKey, readPartitions, sha256Of, sparseTarget, type FlatcarImage, type SigningKey } from "./helpers/flatcar-image.js";
import { installImageFile, startUpdateServer, type Release, type UpdateServer } from "./sim/update-server.js";

const MiB = 1024 * 1024;
let work: string;
let targets: string;
let key: SigningKey;
let image: FlatcarImage;
let gz: string;
let server: UpdateServer;
let r123: Release;
let d: TestDaemon;
let api: PiccoloGrpcClients;
const loops: string[] = [];

/** A release of `version` whose install image is `file` (signed beside it as file.asc). */
async function release(version: string, file: string): Promise<Release> {
  const img = await installImageFile(file, `${file}.asc`);
  // The update payload is not what these tests are about; the image stands in for it.
  return { version, channel: "stable", payload: file, signature: `${file}.asc`, size: img.size, sha256: img.sha256, notes: `Piccolo OS ${version}`, image: Buffer.alloc(0), installImage: img };
}

const resultOf = (evs: OperationEvent[]): InstallResult => InstallResult.decode(outcome(evs).result!.value);
const downloads = (): string => join(d.stateDir, "installer", "downloads");
const imageRequests = (): { url: string; range: string }[] => server.requests.filter((q) => q.url.includes("type=install") && !q.url.includes("signature"));
const clearFaults = (): void => {
  for (const k of Object.keys(server.faults)) delete (server.faults as Record<string, unknown>)[k];
};

async function planAndInstall(spec: Partial<InstallSpec>): Promise<OperationEvent[]> {
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  return collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken })));
}

/** The image's bytes landed on the target: all but the first MiB, OEM (config.ign) and the backup GPT. */
function expectImageOn(target: string): void {
  const oem = image.partitions.find((p) => p.name === "OEM")!;
  const pre = oem.firstLba * 512 - MiB;
  expect(sha256Of(target, MiB, pre)).toBe(sha256Of(image.raw, MiB, pre));
  const post = (oem.lastLba + 1) * 512;
  expect(sha256Of(target, post, image.bytes - post - 33 * 512)).toBe(sha256Of(image.raw, post, image.bytes - post - 33 * 512));
  expect(readPartitions(target).find((p) => p.name === "ROOT")).toBeDefined();
}

/** With the faults cleared, the next plan finds `kept` bytes downloaded and the install resumes from there and succeeds. */
async function expectResumedInstall(spec: { target: string; version: string }, kept: number): Promise<void> {
  const next = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  expect(next.download?.cachedBytes).toBe(kept);
  const before = imageRequests().length;
  const ok = await collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: next.confirmationToken })));
  expect(outcome(ok).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  expect(imageRequests().slice(before).map((q) => q.range)).toContain(`bytes=${kept}-`);
  expectImageOn(spec.target);
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-install-version-"));
  targets = join(work, "targets");
  const images = join(work, "images");
  await import("node:fs/promises").then((f) => Promise.all([f.mkdir(targets), f.mkdir(images)]));
  key = makeSigningKey();
  image = buildFlatcarImage(join(images, "piccolo-os-1.2.3.img"), 64);
  gz = compress(image.raw, "gzip");
  key.sign(gz);
  r123 = await release("1.2.3", gz);
  server = await startUpdateServer([r123]);
  d = await startTestDaemon({
    extraArgs: [
      "--update-server", server.url,
      "--signing-key-files", key.keyring,
      "--update-download-retries", "2",
      "--installer-image-dirs", join(work, "live"),
      "--installer-file-target-dirs", targets,
      "--installer-min-disk-bytes", "0",
    ],
  });
  api = d.grpcUnix();
}, 120_000);

afterEach(async () => {
  clearFaults();
  await rm(downloads(), { recursive: true, force: true });
});

afterAll(async () => {
  if (process.env["INSTALLER_TEST_DEBUG"]) console.log(d?.output().slice(-20000));
  await d?.cleanup();
  await server?.close();
  detachLoops(loops);
  key?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

test("install a version onto a loop device: the plan says what it downloads, the bytes match, the result names the version; a second plan finds it downloaded", async () => {
  const target = attachLoop(sparseTarget(join(targets, "v1.img"), 160 * MiB, true));
  loops.push(target);
  const spec = { target, version: "1.2.3", ignitionSettings: { hostname: "from-the-server" } };
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  expect(plan).toMatchObject({
    imageVersion: "1.2.3",
    imageBytes: image.bytes,
    compression: "gzip",
    imageFileBytes: r123.size,
    download: { url: `${server.url}/api/v1/images/download/1.2.3?type=install`, sizeBytes: r123.size, sha256: r123.sha256, cachedBytes: 0 },
  });
  expect(plan.imagePath.startsWith(downloads())).toBe(true);
  const events = await collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken })));
  expect(outcome(events).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  expect(resultOf(events)).toMatchObject({ target, imageVersion: "1.2.3", imagePath: plan.imagePath, bytesWritten: image.bytes, ignitionWritten: true });
  expectImageOn(target);
  // The download showed in the verify phase with its bytes; progress never went backwards.
  const progress = events.filter((e) => e.progress).map((e) => e.progress!);
  expect(progress.some((p) => p.phase === "verify" && p.bytesTotal === r123.size && /download/.test(p.message))).toBe(true);
  for (let i = 1; i < progress.length; i++) expect(progress[i]!.percent).toBeGreaterThanOrEqual(progress[i - 1]!.percent);
  // The image stays downloaded: the next plan says so and needs no download.
  const again = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  expect(again.download?.cachedBytes).toBe(r123.size);
  const before = imageRequests().length;
  const second = await collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: again.confirmationToken })));
  expect(outcome(second).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  expect(imageRequests().length).toBe(before);
}, 120_000);

test("a download cut mid-way is resumed with an HTTP Range request", async () => {
  const target = sparseTarget(join(targets, "cut.img"), 128 * MiB);
  const cut = Math.floor(r123.size / 2);
  const spec = { target, version: "1.2.3" };
  // The plan reads the image's first MiB; the cut hits the install's download.
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  const before = imageRequests().length;
  server.faults.cutOnceAt = cut;
  const events = await collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken })));
  expect(outcome(events).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  const ranges = imageRequests()
    .slice(before)
    .map((q) => q.range)
    .filter((r) => r !== "" && !r.startsWith("bytes=0-"));
  expect(ranges.length).toBe(1);
  const from = Number(/^bytes=(\d+)-$/.exec(ranges[0]!)![1]);
  expect(from).toBeGreaterThan(0);
  expect(from).toBeLessThanOrEqual(cut);
  expectImageOn(target);
}, 120_000);

test("a download that breaks on every attempt fails with the target unchanged; the next install resumes it", async () => {
  const target = sparseTarget(join(targets, "broken.img"), 128 * MiB, true);
  const hash = sha256Of(target);
  const stop = Math.floor(r123.size * 0.6);
  // The plan reads the image's first MiB; the cuts hit the install's download.
  const spec = { target, version: "1.2.3" };
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  server.faults.truncateAt = stop;
  const failed = await collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken })));
  expect(outcome(failed).state).toBe(OperationState.OPERATION_STATE_FAILED);
  expect(outcome(failed).error).toMatchObject({ code: 14, message: expect.stringMatching(/failed after 3 attempts at byte \d+ of \d+.*kept in .*\.part and resumed next time/) });
  expect(sha256Of(target)).toBe(hash);
  const [part] = (await readdir(downloads())).filter((f) => f.endsWith(".part"));
  const kept = statSync(join(downloads(), part!)).size;
  expect(kept).toBeGreaterThan(0);
  expect(kept).toBeLessThanOrEqual(stop);

  clearFaults();
  await expectResumedInstall(spec, kept);
}, 180_000);

test("CancelInstall during the download: CANCELLED with the target untouched; the partial download is kept and the next install resumes it", async () => {
  const target = sparseTarget(join(targets, "cancel.img"), 128 * MiB, true);
  const hash = sha256Of(target);
  const spec = { target, version: "1.2.3" };
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  // A slow link: the whole image would take about 8 s.
  server.faults.bytesPerSecond = Math.max(32 * 1024, Math.floor(r123.size / 8));
  const events: OperationEvent[] = [];
  let cancelledAt = -1;
  for await (const ev of api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }))) {
    events.push(ev);
    const p = ev.progress;
    if (cancelledAt < 0 && p?.phase === "verify" && /download/.test(p.message) && p.bytesDone > 0 && p.bytesDone < r123.size) {
      cancelledAt = p.bytesDone;
      await api.installer.cancelInstall({ operationId: "" });
    }
  }
  expect(cancelledAt).toBeGreaterThan(0);
  expect(outcome(events).state).toBe(OperationState.OPERATION_STATE_CANCELLED);
  expect(events.some((e) => e.progress?.phase === "write")).toBe(false);
  expect(sha256Of(target)).toBe(hash);
  const [part] = (await readdir(downloads())).filter((f) => f.endsWith(".part"));
  const kept = statSync(join(downloads(), part!)).size;
  expect(kept).toBeGreaterThanOrEqual(cancelledAt);
  expect(kept).toBeLessThan(r123.size);

  clearFaults();
  await expectResumedInstall(spec, kept);
}, 120_000);

test("a signature by an unknown key, and an image with one flipped byte, are refused with the target unchanged", async () => {
  const target = sparseTarget(join(targets, "refused.img"), 128 * MiB, true);
  const hash = sha256Of(target);
  const other = makeSigningKey("Not Trusted");
  try {
    server.faults.signature = other.signature(gz);
    const forged = await planAndInstall({ target, version: "1.2.3" });
    expect(outcome(forged)).toMatchObject({ state: OperationState.OPERATION_STATE_FAILED, error: { code: 3, message: expect.stringMatching(/^spec.signature: .*unknown key/) } });
    expect(sha256Of(target)).toBe(hash);
  } finally {
    other.cleanup();
  }
  clearFaults();
  await rm(downloads(), { recursive: true, force: true });
  server.faults.flipByteAt = r123.size - 5000;
  const flipped = await planAndInstall({ target, version: "1.2.3" });
  expect(outcome(flipped)).toMatchObject({ state: OperationState.OPERATION_STATE_FAILED, error: { code: 3, message: expect.stringMatching(/^spec.(signature: bad signature|version: the image's SHA-256)/) } });
  expect(sha256Of(target)).toBe(hash);
  // The bad download is not kept: the next install fetches it anew.
  expect((await readdir(downloads())).filter((f) => !f.endsWith(".part") && existsSync(join(downloads(), f)))).toEqual([]);
}, 120_000);

test("an unknown version is NOT_FOUND naming spec.version over gRPC and 404 over REST; a bad one is INVALID_ARGUMENT; one without an install image FAILED_PRECONDITION", async () => {
  const target = sparseTarget(join(targets, "nf.img"), 128 * MiB);
  await expect(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, version: "7.7.7" } }))).rejects.toMatchObject({
    code: 5,
    details: expect.stringMatching(/^spec.version: the update server .* has no version "7.7.7" on channel "stable"/),
  });
  const res = await d.fetch("/api/v1/installer:plan", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ spec: { target, version: "7.7.7" } }) });
  expect(res.status).toBe(404);
  expect(JSON.stringify(await res.json())).toContain("spec.version");
  await expect(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, version: "../x" } }))).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^spec.version/) });
  // A release with only an update payload cannot be installed from the server.
  const { installImage: _none, ...updateOnly } = r123;
  server.add({ ...updateOnly, version: "1.0.0" });
  await expect(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, version: "1.0.0" } }))).rejects.toMatchObject({
    code: 9,
    details: expect.stringMatching(/^spec.version: the update server .* publishes no install image for version 1.0.0/),
  });
});

test('"latest" resolves to the newest version; a release re-published after the plan makes its token stale', async () => {
  const target = sparseTarget(join(targets, "latest.img"), 128 * MiB, true);
  const hash = sha256Of(target);
  server.add(await release("1.3.0", gz));
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, version: "latest" } }));
  expect(plan.imageVersion).toBe("1.3.0");
  // 1.3.0 is published again with another image (the uncompressed one) before the install.
  key.sign(image.raw);
  server.add(await release("1.3.0", image.raw));
  await expect(collect(api.installer.install(InstallRequest.fromPartial({ spec: { target, version: "latest" }, confirmationToken: plan.confirmationToken })))).rejects.toMatchObject({
    code: 9,
    details: expect.stringMatching(/^confirmation_token: stale: the update server's release changed since the plan/),
  });
  expect(sha256Of(target)).toBe(hash);
  // Planned again, the new image installs.
  const events = await planAndInstall({ target, version: "latest" });
  expect(outcome(events).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  expect(resultOf(events)).toMatchObject({ imageVersion: "1.3.0", bytesWritten: image.bytes });
  expectImageOn(target);
}, 120_000);

test("piccoloctl install plan|run --version: the plan shows the download; run installs it", async () => {
  const target = sparseTarget(join(targets, "cli.img"), 128 * MiB);
  const cli = (args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    new Promise((resolve) => {
      const p = spawn(process.execPath, [CLI_JS, ...args], {
        env: { ...process.env, ...d.cliEnv(), PICCOLO_ENDPOINT: `unix://${d.endpoints.socket}` },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stdout = "";
      let stderr = "";
      p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
      p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
      p.on("close", (code) => resolve({ code, stdout, stderr }));
    });
  const plan = await cli(["install", "plan", target, "--version", "1.2.3"]);
  expect({ code: plan.code, stderr: plan.code === 0 ? "" : plan.stderr }).toEqual({ code: 0, stderr: "" });
  expect(plan.stdout).toMatch(/version 1\.2\.3/);
  expect(plan.stdout).toContain(`download: ${server.url}/api/v1/images/download/1.2.3?type=install`);
  expect(plan.stdout).toContain(r123.sha256);
  const run = await cli(["install", "run", target, "--version", "1.2.3", "--yes"]);
  expect({ code: run.code, stderr: run.code === 0 ? "" : run.stderr }).toEqual({ code: 0, stderr: "" });
  expect(run.stdout).toMatch(/SUCCEEDED/);
  expectImageOn(target);
  const missing = await cli(["install", "plan", target, "--version", "7.7.7"]);
  expect(missing.code).not.toBe(0);
  expect(missing.stderr).toMatch(/spec.version: the update server .* has no version "7.7.7"/);
}, 120_000);
