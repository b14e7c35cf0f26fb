/**
 * Backup end to end on real restic, a private dockerd and swtpm: the repository password sealed
 * to the TPM, a backup of two app volumes and the state folder with the apps stopped around it,
 * a wipe and a restore checked byte for byte with sha256sum, ListSnapshots and VerifyBackup
 * checked against restic run independently (with the password unsealed by systemd-creds itself),
 * a snapshot holding a path outside the scope refused, forget with a keep policy, and piccolod
 * killed mid-backup: the repository stays valid and the apps run again after the restart.
 */
import * as grpc from "@grpc/grpc-js";
import { jest } from "@jest/globals";
import { randomBytes } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  CreateBackupResult,
  ForgetSnapshotsResult,
  QuiesceMode,
  RestoreBackupResult,
  VerifyBackupResult,
} from "../gen/piccolo/backup/v1/backup.js";
import { ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { flushTpmContexts } from "../src/server/trust/credentials.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { run, startDockerd, type TestDockerd } from "./helpers/dockerd.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";

jest.setTimeout(600_000);

let engine: TestDockerd;
let tpm: Swtpm;
let d: TestDaemon;
let work: string;
let repo: string;
let password = "";
const IMAGE = "piccolo-test/backup:1";
const APPS = ["notes", "photos"];
const VOLS = ["notes-data", "photos-data"];
const mounts: Record<string, string> = {};

const ok = async (cmd: string, args: string[], input?: string, env?: NodeJS.ProcessEnv): Promise<string> => {
  const r = await run(cmd, args, { input, env, timeoutMs: 300_000 });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
};

/** restic run independently of piccolod, with the password unsealed by systemd-creds. */
const restic = async (args: string[]) => {
  const r = await run("restic", ["-r", repo, "--no-cache", ...args], { input: password + "\n", timeoutMs: 300_000 });
  // restic says where it read the password from on stdout, before any JSON.
  return { ...r, stdout: r.stdout.replace(/^reading repository password from stdin\n/, "") };
};

async function failure(p: Promise<unknown> | AsyncIterable<unknown>): Promise<{ code: number; message: string; field: string; reason: string }> {
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
  for (const any of status.details) {
    if (any.typeUrl.endsWith("google.rpc.ErrorInfo")) {
      const info = ErrorInfo.decode(any.value);
      field = info.metadata["field"] ?? "";
      reason = info.reason;
    }
  }
  return { code: err.code, message: err.details, field, reason };
}

async function all(it: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}
const outcome = (events: OperationEvent[]) => events[events.length - 1]!.outcome!;
const succeeded = (events: OperationEvent[]) => {
  const o = outcome(events);
  expect(o.error?.message ?? "").toBe("");
  expect(o.state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  return o.result!.value;
};

/** sha256sum over every file below the folders (paths relative to each), sorted. */
async function checksums(dirs: Record<string, string>, exclude: string[] = []): Promise<string> {
  const lines: string[] = [];
  for (const [label, dir] of Object.entries(dirs)) {
    const prune = exclude.flatMap((e) => ["-path", join(dir, e), "-prune", "-o"]);
    const files = (await ok("find", [dir, ...prune, "-type", "f", "-print"])).split("\n").filter(Boolean).sort();
    if (files.length === 0) continue;
    for (const l of (await ok("sha256sum", files)).split("\n").filter(Boolean)) lines.push(`${label}:${l.replace(dir, "")}`);
    // Modes and symlinks count too.
    lines.push(...(await ok("find", [dir, ...prune, "-printf", `${label}:%P %m %y %l\n`])).split("\n").filter(Boolean).sort());
  }
  return lines.join("\n");
}

async function containerState(name: string): Promise<{ running: boolean; startedAt: number }> {
  const out = (await engine.dockerOk(["inspect", "-f", "{{.State.Running}} {{.State.StartedAt}}", name])).trim().split(" ");
  return { running: out[0] === "true", startedAt: Date.parse(out[1]!) };
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-backup-"));
  repo = join(work, "repo");
  [engine, tpm] = await Promise.all([startDockerd(), startSwtpm()]);
  await engine.makeImage(IMAGE);
  d = await startTestDaemon({ extraArgs: ["--docker-socket", engine.socket, "--tpm2-device", tpm.tcti, "--backup-repository-roots", work] });
  const storage = d.grpcUnix().storage;
  for (const [i, v] of VOLS.entries()) {
    mounts[v] = (await storage.createVolume({ name: v, labels: {} })).mountPoint;
    await engine.dockerOk(["run", "-d", "--name", APPS[i]!, "--network", "none", "-v", `${v}:/data`, IMAGE, "sleep", "3600"]);
  }
  // App data: nested folders, a few MiB of random bytes, a symlink, a private file.
  for (const v of VOLS) {
    const m = mounts[v]!;
    await mkdir(join(m, "db/2026"), { recursive: true });
    await writeFile(join(m, "db/2026/blob.bin"), randomBytes(3 * 1024 * 1024));
    await writeFile(join(m, "README"), `volume ${v}\n`);
    await writeFile(join(m, "secret.key"), randomBytes(64), { mode: 0o600 });
    await symlink("db/2026/blob.bin", join(m, "latest"));
  }
  await mkdir(join(d.stateDir, "apps"), { recursive: true });
  await writeFile(join(d.stateDir, "apps/notes.json"), JSON.stringify({ app: "notes", port: 8081 }));
});

afterAll(async () => {
  await d?.cleanup();
  await engine?.cleanup();
  await tpm?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

test("InitRepository creates the repository with a random password sealed to the TPM", async () => {
  const api = d.grpcUnix().backup;
  expect(await api.getRepository({})).toMatchObject({ configured: false });
  expect((await failure(api.createBackup({ scope: { state: true, credentials: false, volumes: [], allVolumes: false }, quiesce: 0, tags: [] }))).reason).toBe(
    "NO_REPOSITORY",
  );
  expect(await failure(api.initRepository({ location: "relative/repo", existing: false, password: "" }))).toMatchObject({ field: "location" });
  const r = await api.initRepository({ location: repo, existing: false, password: "" });
  expect(r).toMatchObject({ configured: true, location: repo, sealedWith: "tpm2" });
  // Unseal it as systemd would, without piccolod.
  const sealed = join(d.stateDir, "secrets", r.passwordCredential);
  password = (await ok("systemd-creds", ["decrypt", `--name=piccolod_${r.passwordCredential}`, `--tpm2-device=${tpm.tcti}`, sealed, "-"])).trim();
  await flushTpmContexts(tpm.tcti);
  expect(password.length).toBeGreaterThanOrEqual(32);
  const cfg = JSON.parse((await restic(["cat", "config"])).stdout.replace(/^[^{]*/, "")) as { id: string };
  expect(cfg.id).toBe(r.id);
  expect(d.output()).not.toContain(password);
  expect((await failure(api.initRepository({ location: repo, existing: false, password: "" }))).code).toBe(grpc.status.ALREADY_EXISTS);
  expect((await failure(api.initRepository({ location: repo, existing: true, password: "wrong" }))).field).toBe("password");
});

let snapshotId = "";
let before = "";
const STATE_EXCLUDES = ["operations", "backup", "audit.log", "secrets", "secrets.meta", "credstore"];

test("CreateBackup of two volumes and the state folder stops the apps around it, with restic's progress, and starts them again", async () => {
  const api = d.grpcUnix().backup;
  const started = Date.now();
  const events = await all(
    api.createBackup({ scope: { state: true, credentials: false, volumes: VOLS, allVolumes: false }, quiesce: QuiesceMode.QUIESCE_MODE_STOP, tags: ["nightly"] }),
  );
  const result = CreateBackupResult.decode(succeeded(events));
  snapshotId = result.snapshotId;
  expect(result.quiescedContainers.sort()).toEqual(APPS);
  expect(result.filesNew).toBeGreaterThanOrEqual(6);
  expect(result.paths.sort()).toEqual([d.stateDir, ...VOLS.map((v) => mounts[v]!)].sort());
  const phases = events.filter((e) => e.progress).map((e) => e.progress!.phase);
  expect(phases).toEqual(expect.arrayContaining(["quiesce", "backup", "resume"]));
  const backupProgress = events.filter((e) => e.progress?.phase === "backup" && e.progress.bytesTotal > 0);
  expect(backupProgress.length).toBeGreaterThan(0);
  for (const app of APPS) {
    const s = await containerState(app);
    expect(s.running).toBe(true);
    expect(s.startedAt).toBeGreaterThanOrEqual(started - 1000); // it was stopped and started again
  }
  before = await checksums({ ...Object.fromEntries(VOLS.map((v) => [v, mounts[v]!])), state: d.stateDir }, STATE_EXCLUDES);
  expect(before).toContain("db/2026/blob.bin");
  expect(before).toContain("apps/notes.json");
});

test("ListSnapshots and VerifyBackup agree with restic snapshots --json and restic check", async () => {
  const api = d.grpcUnix().backup;
  const listed = (await api.listSnapshots({})).snapshots;
  const raw = JSON.parse((await restic(["snapshots", "--json"])).stdout) as { id: string; short_id: string; paths: string[]; tags: string[]; time: string }[];
  expect(listed.map((s) => [s.id, s.shortId, [...s.paths].sort(), [...s.tags].sort(), s.time!.getTime()])).toEqual(
    raw.map((s) => [s.id, s.short_id, [...s.paths].sort(), [...s.tags].sort(), new Date(s.time).getTime()]),
  );
  expect(listed[0]!.scope).toMatchObject({ state: true, credentials: false, volumes: VOLS });
  const check = await restic(["check"]);
  expect(check.code).toBe(0);
  const v = VerifyBackupResult.decode(succeeded(await all(api.verifyBackup({ readDataPercent: 100 }))));
  expect(v).toMatchObject({ ok: true, errors: [] });
});

test("wipe and restore: every file is byte-identical and the apps run again", async () => {
  const api = d.grpcUnix().backup;
  for (const v of VOLS) await ok("sh", ["-c", `rm -rf "${mounts[v]}"/* && echo junk > "${mounts[v]}/junk"`]);
  await rm(join(d.stateDir, "apps"), { recursive: true, force: true });
  await writeFile(join(d.stateDir, "stray.txt"), "not in the snapshot\n");
  expect(await checksums({ ...Object.fromEntries(VOLS.map((v) => [v, mounts[v]!])), state: d.stateDir }, STATE_EXCLUDES)).not.toEqual(before);
  const started = Date.now();
  const events = await all(api.restoreBackup({ snapshotId: snapshotId.slice(0, 8), scope: { state: true, credentials: false, volumes: [], allVolumes: true } }));
  const result = RestoreBackupResult.decode(succeeded(events));
  expect(result.snapshotId).toBe(snapshotId);
  expect(result.restartedContainers.sort()).toEqual(APPS);
  expect(await checksums({ ...Object.fromEntries(VOLS.map((v) => [v, mounts[v]!])), state: d.stateDir }, STATE_EXCLUDES)).toEqual(before);
  for (const app of APPS) {
    const s = await containerState(app);
    expect(s.running).toBe(true);
    expect(s.startedAt).toBeGreaterThanOrEqual(started - 1000);
  }
  // The daemon's own operation journals were not rolled back.
  expect(events[0]!.operationId).toBeTruthy();
  expect((await d.grpcUnix().operations.getOperation({ id: events[0]!.operationId })).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
});

test("a snapshot that would write outside its scope is refused, and nothing is written", async () => {
  const api = d.grpcUnix().backup;
  const outside = join(work, "outside");
  await mkdir(outside);
  await writeFile(join(outside, "passwd"), "root:x:0:0\n");
  // Made with restic directly, tagged to look like piccolod's own.
  const made = await restic(["backup", "--json", "--tag", "piccolod", "--tag", "scope:state", "--tag", "volume:notes-data", d.stateDir, outside]);
  expect(made.code).toBe(0);
  const id = (JSON.parse(made.stdout.trim().split("\n").pop()!) as { snapshot_id: string }).snapshot_id;
  await writeFile(join(outside, "passwd"), "changed since\n");
  const f = await failure(api.restoreBackup({ snapshotId: id, scope: { state: true, credentials: false, volumes: [], allVolumes: false } }));
  expect(f).toMatchObject({ code: grpc.status.FAILED_PRECONDITION, reason: "SNAPSHOT_OUTSIDE_SCOPE" });
  expect(f.message).toContain(outside);
  expect(await readFile(join(outside, "passwd"), "utf8")).toBe("changed since\n");
  // A scope the snapshot does not hold, and a bad id, are refused too.
  expect((await failure(api.restoreBackup({ snapshotId, scope: { state: false, credentials: true, volumes: [], allVolumes: false } }))).reason).toBe("NOT_IN_SNAPSHOT");
  expect((await failure(api.restoreBackup({ snapshotId: "xyz", scope: { state: true, credentials: false, volumes: [], allVolumes: false } }))).field).toBe("snapshot_id");
  await restic(["forget", id]);
});

test("ForgetSnapshots applies a keep policy, as restic snapshots then shows", async () => {
  const api = d.grpcUnix().backup;
  CreateBackupResult.decode(succeeded(await all(api.createBackup({ scope: { state: true, credentials: false, volumes: VOLS, allVolumes: false }, quiesce: QuiesceMode.QUIESCE_MODE_PAUSE, tags: [] }))));
  expect((await failure(api.forgetSnapshots({ keepLast: 0, keepDaily: 0, keepWeekly: 0, keepMonthly: 0, prune: false }))).field).toBe("keep_last");
  const res = ForgetSnapshotsResult.decode(succeeded(await all(api.forgetSnapshots({ keepLast: 1, keepDaily: 0, keepWeekly: 0, keepMonthly: 0, prune: true }))));
  expect(res.removed).toEqual([snapshotId]);
  expect(res.pruned).toBe(true);
  const raw = JSON.parse((await restic(["snapshots", "--json"])).stdout) as { id: string }[];
  expect(raw.map((s) => s.id)).toEqual(res.kept);
  expect((await restic(["check"])).code).toBe(0);
  for (const app of APPS) expect((await containerState(app)).running).toBe(true);
});

test("killing piccolod mid-backup leaves the repository valid and the apps running after the restart", async () => {
  // Enough data that restic is still reading when piccolod dies.
  const big = join(mounts[VOLS[0]!]!, "big");
  await mkdir(big);
  for (let i = 0; i < 8; i++) await writeFile(join(big, `chunk-${i}`), randomBytes(32 * 1024 * 1024));
  const api = d.grpcUnix().backup;
  let opId = "";
  let killedAt = "";
  try {
    for await (const e of api.createBackup({ scope: { state: true, credentials: false, volumes: VOLS, allVolumes: false }, quiesce: QuiesceMode.QUIESCE_MODE_STOP, tags: [] })) {
      opId = e.operationId;
      if (e.progress?.phase === "backup" && e.progress.bytesDone > 0) {
        killedAt = `${e.progress.bytesDone}/${e.progress.bytesTotal}`;
        await d.kill9();
        break;
      }
      if (e.outcome) throw new Error(`the backup ended before it could be interrupted: ${JSON.stringify(e.outcome)}`);
    }
  } catch (e) {
    if (!killedAt) throw e;
  }
  expect(killedAt).not.toBe("");
  // piccolod is gone; at least one app is still stopped.
  const states = await Promise.all(APPS.map(containerState));
  expect(states.some((s) => !s.running)).toBe(true);
  await d.restart();
  const op = await d.grpcUnix().operations.getOperation({ id: opId });
  expect(op.state).toBe(OperationState.OPERATION_STATE_INTERRUPTED);
  expect(op.error?.message).toContain("started the app container(s) it had quiesced again");
  // The lock of the restic it killed is gone, also when that restic is a zombie nobody reaps
  // (a container whose init does not reap, as in CI), which a plain `restic unlock` keeps.
  expect(op.error?.message).not.toContain("could not remove");
  for (const app of APPS) expect((await containerState(app)).running).toBe(true);
  // restic check wants the repository to itself; a restic the restarted daemon runs for a moment
  // (its recovery's unlock, a listing) may hold a lock briefly, so wait for it, not for ever.
  let check = await restic(["check"]);
  for (let i = 0; i < 30 && /already locked/.test(check.stderr); i++) {
    await new Promise((r) => setTimeout(r, 1000));
    check = await restic(["check"]);
  }
  expect(check.stderr + check.stdout).toContain("no errors were found");
  expect(check.code).toBe(0);
  // And the next backup works.
  CreateBackupResult.decode(succeeded(await all(api.createBackup({ scope: { state: false, credentials: true, volumes: [], allVolumes: false }, quiesce: 0, tags: [] }))));
  await rm(big, { recursive: true, force: true });
});
