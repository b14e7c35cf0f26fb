/**
 * The backup manager: the one repository piccolod backs up to (its location in the state folder,
 * its password sealed in the credential store), and the four operation kinds on restic — create,
 * restore, verify, forget. Containers using the volumes in a backup or restore are stopped (or
 * paused) around it; which ones is journaled first, so that a piccolod killed mid-way starts them
 * again at its next start (recover()), also killing a restic it left running and removing restic's
 * stale lock.
 */
import { randomBytes, createHash } from "node:crypto";
import { lstat, mkdir, readdir, readFile, rename, rm, stat, writeFile, chmod } from "node:fs/promises";
import { hostname } from "node:os";
import { isAbsolute, join, posix } from "node:path";
import type { Logger } from "pino";
import { Any } from "../../../gen/google/protobuf/any.js";
import {
  CreateBackupRequest,
  CreateBackupResult,
  ForgetSnapshotsRequest,
  ForgetSnapshotsResult,
  QuiesceMode,
  RestoreBackupRequest,
  RestoreBackupResult,
  VerifyBackupRequest,
  VerifyBackupResult,
  type BackupScope,
  type Repository,
  type Snapshot,
} from "../../../gen/piccolo/backup/v1/backup.js";
import type { Operation } from "../../../gen/piccolo/operations/v1/operations.js";
import { DockerApiError, type DockerEngine } from "../containers/docker.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";
import type { OperationKind, WorkerContext } from "../operations/manager.js";
import { checkVolumeName, type VolumeManager } from "../storage/volumes.js";
import type { CredentialStore } from "../trust/credentials.js";
import { createRestic, resticError, type BackupStatus, type BackupSummary, type ForgetGroup, type Restic, type ResticSnapshot } from "./restic.js";
import {
  classifySnapshotPaths,
  PICCOLOD_TAG,
  scopeFromTags,
  stagingDir,
  stateExcludedNames,
  tagsFor,
  within,
  type ScopeItem,
  type ScopeRoots,
} from "./scope.js";

/** Operation kinds. */
export const CREATE_KIND = "backup.create";
export const RESTORE_KIND = "backup.restore";
export const VERIFY_KIND = "backup.verify";
export const FORGET_KIND = "backup.forget";

/** What the backup manager needs. */
export interface BackupManagerDeps {
  readonly stateDir: string;
  readonly credentials: CredentialStore;
  readonly engine: DockerEngine;
  readonly volumes: VolumeManager;
  readonly log: Logger;
  readonly resticBin?: string;
  /** Folders a local repository may be in. */
  readonly repositoryRoots: readonly string[];
}

interface RepoConfig {
  location: string;
  id: string;
  credential: string;
}

/** A container stopped or paused around a backup or restore. */
interface Quiesced {
  id: string;
  name: string;
  action: "stop" | "pause";
}

/** The journal of what an operation changed that must be undone after a crash. */
interface QuiesceJournal {
  op: string;
  containers: Quiesced[];
  resticPid?: number;
  staging?: string[];
}

const pack = (typeName: string, value: Uint8Array): Any => Any.fromPartial({ typeUrl: `type.googleapis.com/${typeName}`, value });

const TAG = /^[A-Za-z0-9_.-]{1,64}$/;

/** Checks a repository location from a request; a local one must be below one of `roots`. */
export function checkLocation(location: string, roots: readonly string[]): string {
  if (location === "") throw invalidArgument("location", "is required");
  if (location.startsWith("rest:")) {
    let u: URL;
    try {
      u = new URL(location.slice("rest:".length));
    } catch {
      throw invalidArgument("location", `${JSON.stringify(location.slice(0, 200))} is not rest:http(s)://host:port/path`);
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") throw invalidArgument("location", "a REST server must be http:// or https://");
    return location;
  }
  if (!isAbsolute(location) || location.includes("\0") || location.split("/").includes("..") || /[\n\r]/.test(location)) {
    throw invalidArgument("location", `${JSON.stringify(location.slice(0, 200))} must be an absolute path without "..", or rest:http(s)://host:port/path`);
  }
  const loc = posix.normalize(location).replace(/(.)\/+$/, "$1");
  if (!roots.some((r) => within(loc, r))) {
    throw invalidArgument("location", `${loc} is not below a folder backup repositories may be in (${roots.join(", ")}; see backupRepositoryRoots)`);
  }
  return loc;
}

/** The backup manager. */
export interface BackupManager {
  getRepository(): Promise<Repository>;
  initRepository(location: string, existing: boolean, password: string, signal: AbortSignal): Promise<Repository>;
  listSnapshots(signal: AbortSignal): Promise<Snapshot[]>;
  /** Checks a backup request before its operation starts. */
  prepareCreate(req: CreateBackupRequest, signal: AbortSignal): Promise<CreateBackupRequest>;
  /** Checks a restore request (the snapshot exists, holds the scope, holds nothing outside it). */
  prepareRestore(req: RestoreBackupRequest, signal: AbortSignal): Promise<RestoreBackupRequest>;
  /** Checks a forget request. */
  prepareForget(req: ForgetSnapshotsRequest): Promise<ForgetSnapshotsRequest>;
  /** Checks a verify request. */
  prepareVerify(req: VerifyBackupRequest): Promise<VerifyBackupRequest>;
  readonly kinds: {
    create: OperationKind<CreateBackupRequest>;
    restore: OperationKind<RestoreBackupRequest>;
    verify: OperationKind<VerifyBackupRequest>;
    forget: OperationKind<ForgetSnapshotsRequest>;
  };
}

const snapshotFrom = (s: ResticSnapshot): Snapshot => {
  const tags = s.tags ?? [];
  const piccolod = tags.includes(PICCOLOD_TAG);
  return {
    id: s.id,
    shortId: s.short_id,
    time: new Date(s.time),
    hostname: s.hostname,
    paths: s.paths,
    tags,
    scope: piccolod ? scopeFromTags(tags) : undefined,
    parent: s.parent ?? "",
  };
};

/** Sum of the sizes of the regular files below `dir` (0 when it is missing). */
async function treeBytes(dir: string): Promise<number> {
  let total = 0;
  let entries;
  try {
    entries = await readdir(dir, { withFileTypes: true });
  } catch {
    return 0;
  }
  for (const e of entries) {
    const p = join(dir, e.name);
    if (e.isDirectory()) total += await treeBytes(p);
    else if (e.isFile()) total += (await lstat(p).catch(() => ({ size: 0 }))).size;
  }
  return total;
}

/** Whether a process is running (a zombie, exited but not reaped, is not). */
async function processAlive(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/** Creates the backup manager. */
export function createBackupManager(deps: BackupManagerDeps): BackupManager {
  const stateDir = posix.normalize(deps.stateDir).replace(/(.)\/+$/, "$1");
  const dir = join(stateDir, "backup");
  const repoFile = join(dir, "repository.json");
  const credDir = posix.normalize(deps.credentials.dir).replace(/(.)\/+$/, "$1");
  // The API's sealed secrets, and the credstore piccolod.service loads (keys placed with place-keys.sh).
  const roots: ScopeRoots = { stateDir, credentialDirs: [credDir, `${credDir}.meta`, join(stateDir, "credstore")] };
  const { engine, volumes, log } = deps;

  const writeJson = async (path: string, value: unknown): Promise<void> => {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const tmp = `${path}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(value) + "\n", { mode: 0o600 });
    await rename(tmp, path);
  };
  const readRepo = async (): Promise<RepoConfig | undefined> => {
    try {
      return JSON.parse(await readFile(repoFile, "utf8")) as RepoConfig;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  };
  const resticFor = (location: string, password: () => Promise<Buffer>): Restic =>
    createRestic({ location, password, cacheDir: join(dir, "cache"), bin: deps.resticBin });
  const restic = async (): Promise<Restic> => {
    const repo = await readRepo();
    if (!repo) {
      throw new PiccoloError("failed_precondition", "no backup repository is set up; call InitRepository first", { reason: "NO_REPOSITORY" });
    }
    return resticFor(repo.location, () => deps.credentials.unseal(repo.credential));
  };

  const journalPath = (opId: string): string => join(dir, `quiesce-${opId}.json`);
  const saveJournal = (j: QuiesceJournal): Promise<void> => writeJson(journalPath(j.op), j);

  /** Stops or pauses the running containers that use `volumeNames`; journaled before each change. */
  const quiesce = async (j: QuiesceJournal, volumeNames: readonly string[], mode: QuiesceMode, signal: AbortSignal): Promise<void> => {
    if (mode === QuiesceMode.QUIESCE_MODE_NONE) return;
    const action = mode === QuiesceMode.QUIESCE_MODE_PAUSE ? "pause" : "stop";
    const seen = new Set<string>();
    for (const v of volumeNames) {
      for (const u of await volumes.users(v, signal)) {
        if (seen.has(u.id) || u.state !== "running") continue;
        seen.add(u.id);
        j.containers.push({ id: u.id, name: u.name, action });
        await saveJournal(j);
        if (action === "pause") await engine.pauseContainer(u.id, signal);
        else await engine.stopContainer(u.id, 10, signal);
      }
    }
  };

  /** Starts (or unpauses) what quiesce() stopped; never aborted; returns the failures. */
  const resume = async (j: QuiesceJournal): Promise<string[]> => {
    const failures: string[] = [];
    const signal = new AbortController().signal;
    for (const c of j.containers) {
      try {
        if (c.action === "pause") await engine.unpauseContainer(c.id, signal);
        else await engine.startContainer(c.id, signal);
      } catch (e) {
        // Already running (e.g. a restart policy brought it back) is fine.
        if (e instanceof DockerApiError && (e.statusCode === 304 || /not paused|already/i.test(e.dockerMessage))) continue;
        failures.push(`${c.name}: ${(e as Error).message}`);
      }
    }
    return failures;
  };

  const finishJournal = async (j: QuiesceJournal, failures: string[]): Promise<void> => {
    if (failures.length === 0) await rm(journalPath(j.op), { force: true });
  };

  /** The scope folders of a backup request as they are now. */
  const resolveScope = async (scope: BackupScope, signal: AbortSignal): Promise<ScopeItem[]> => {
    const items: ScopeItem[] = [];
    if (scope.state) items.push({ part: "state", path: stateDir });
    if (scope.credentials && !scope.state) for (const d of roots.credentialDirs) items.push({ part: "credentials", path: d });
    if (scope.credentials && scope.state) {
      // Inside the state folder: recorded by tag, backed up with it.
    }
    const names = scope.allVolumes ? (await volumes.list(false, signal)).map((v) => v.name) : scope.volumes;
    for (const name of [...new Set(names)]) {
      const v = await volumes.get(name, signal);
      items.push({ part: "volume", volume: name, path: v.mountPoint });
    }
    return items;
  };

  const checkScope = (scope: BackupScope | undefined, field: string): BackupScope => {
    if (!scope || (!scope.state && !scope.credentials && !scope.allVolumes && scope.volumes.length === 0)) {
      throw invalidArgument(field, "name at least one part: state, credentials, volumes or all_volumes");
    }
    if (scope.volumes.length > 256) throw invalidArgument(`${field}.volumes`, "at most 256");
    scope.volumes.forEach((v, i) => checkVolumeName(v, `${field}.volumes[${i}]`));
    return scope;
  };

  const findSnapshot = async (r: Restic, id: string, signal: AbortSignal): Promise<ResticSnapshot> => {
    const all = await r.snapshots(signal);
    const matches = all.filter((s) => s.id.startsWith(id));
    if (matches.length === 0) throw notFound("snapshot", id);
    if (matches.length > 1) throw invalidArgument("snapshot_id", `${id} matches ${matches.length} snapshots; give more digits`);
    return matches[0]!;
  };

  /** The items of a snapshot to restore for `scope`; refuses snapshots with paths outside piccolod's scope folders. */
  const restorePlan = async (snap: ResticSnapshot, scope: BackupScope, signal: AbortSignal): Promise<ScopeItem[]> => {
    const tags = snap.tags ?? [];
    const tagged = scopeFromTags(tags);
    const mountPoints = new Map<string, string>();
    for (const v of tagged.volumes) {
      try {
        mountPoints.set(v, (await volumes.get(v, signal)).mountPoint);
      } catch (e) {
        if (!(e instanceof PiccoloError && e.kind === "not_found")) throw e;
      }
    }
    const { items, outside } = classifySnapshotPaths(snap.paths, tags, roots, mountPoints);
    if (outside.length > 0) {
      throw new PiccoloError(
        "failed_precondition",
        `snapshot ${snap.short_id} holds ${outside.map((p) => JSON.stringify(p)).join(", ")}, outside piccolod's scope folders (state ${stateDir}, sealed secrets ${credDir}, app volumes); refusing to restore it`,
        { reason: "SNAPSHOT_OUTSIDE_SCOPE" },
      );
    }
    const want: ScopeItem[] = [];
    if (scope.state) {
      const s = items.filter((i) => i.part === "state");
      if (s.length === 0) throw new PiccoloError("failed_precondition", `snapshot ${snap.short_id} holds no state folder`, { reason: "NOT_IN_SNAPSHOT" });
      want.push(...s);
    }
    if (scope.credentials) {
      const c = items.filter((i) => i.part === "credentials");
      const inState = tagged.credentials && items.some((i) => i.part === "state");
      if (c.length === 0 && !inState) {
        throw new PiccoloError("failed_precondition", `snapshot ${snap.short_id} holds no sealed secrets`, { reason: "NOT_IN_SNAPSHOT" });
      }
      want.push(...c);
      // Backed up inside the state folder: restored with it, or on their own from it.
      if (c.length === 0 && !scope.state) {
        for (const d of roots.credentialDirs) if (within(d, stateDir)) want.push({ part: "credentials", path: d });
      }
    }
    const vols = scope.allVolumes ? tagged.volumes : scope.volumes;
    for (const v of vols) {
      const it = items.find((i) => i.part === "volume" && i.volume === v);
      if (!it) throw new PiccoloError("failed_precondition", `snapshot ${snap.short_id} holds no volume ${JSON.stringify(v)}`, { reason: "NOT_IN_SNAPSHOT" });
      want.push(it);
    }
    return want;
  };

  /** Replaces the content of `dest` (except `keep` names) with the content of `src`. */
  const replaceContent = async (dest: string, src: string, keep: ReadonlySet<string>): Promise<void> => {
    for (const name of await readdir(dest)) {
      if (!keep.has(name)) await rm(join(dest, name), { recursive: true, force: true });
    }
    for (const name of await readdir(src)) {
      if (!keep.has(name)) await rename(join(src, name), join(dest, name));
    }
    const s = await stat(src);
    await chmod(dest, s.mode & 0o7777);
  };

  const progressOf = (ctx: WorkerContext, phase: string, base: number, span: number) => (s: BackupStatus) => {
    const total = s.total_bytes ?? 0;
    const done = s.bytes_done ?? 0;
    ctx.progress({
      phase,
      percent: base + span * Math.min(1, s.percent_done ?? 0),
      bytesDone: done,
      bytesTotal: total,
      message: `${s.files_done ?? 0}/${s.total_files ?? 0} files`,
      items: [],
    });
  };

  const createKind: OperationKind<CreateBackupRequest> = {
    kind: CREATE_KIND,
    requestType: "piccolo.backup.v1.CreateBackupRequest",
    encodeRequest: (r) => CreateBackupRequest.encode(r).finish(),
    exclusive: false,
    single: true,
    cancellable: true,
    async run(req, ctx) {
      const r = await restic();
      const scope = req.scope!;
      ctx.progress({ phase: "prepare", phaseIndex: 1, phaseCount: 4, percent: 1, message: "resolving the scope" });
      const items = await resolveScope(scope, ctx.signal);
      const volumeNames = items.filter((i) => i.part === "volume").map((i) => i.volume!);
      const j: QuiesceJournal = { op: ctx.id, containers: [] };
      await saveJournal(j);
      let summary: BackupSummary | undefined;
      let failure: unknown;
      let resumeFailures: string[] = [];
      try {
        ctx.progress({ phase: "quiesce", phaseIndex: 2, phaseCount: 4, percent: 2, message: `quiescing the apps using ${volumeNames.length} volume(s)` });
        await quiesce(j, volumeNames, req.quiesce, ctx.signal);
        const paths = items.map((i) => i.path);
        const excludes = scope.state ? stateExcludedNames(roots, scope.credentials).map((n) => join(stateDir, n)) : [];
        const args = ["backup", "--json", ...tagsFor(items, req.tags).flatMap((t) => ["--tag", t]), ...excludes.flatMap((e) => ["--exclude", e]), ...paths];
        ctx.progress({ phase: "backup", phaseIndex: 3, phaseCount: 4, percent: 3, message: `backing up ${paths.length} folder(s)` });
        const onStatus = progressOf(ctx, "backup", 3, 94);
        const res = await r.run(args, {
          signal: ctx.signal,
          onSpawn: (child) => {
            j.resticPid = child.pid;
            void saveJournal(j);
          },
          onJson: (m) => {
            if (m["message_type"] === "status") onStatus(m as unknown as BackupStatus);
            else if (m["message_type"] === "summary") summary = m as unknown as BackupSummary;
          },
        });
        if (res.code !== 0 || !summary) {
          // Exit 3: some files could not be read, but a snapshot was made.
          if (!(res.code === 3 && summary)) throw resticError(args, res);
        }
      } catch (e) {
        failure = e;
      } finally {
        j.resticPid = undefined;
        ctx.progress({ phase: "resume", phaseIndex: 4, phaseCount: 4, percent: 98, message: `starting ${j.containers.length} app container(s) again` });
        resumeFailures = await resume(j);
        await finishJournal(j, resumeFailures);
      }
      const left = resumeFailures.length > 0 ? `; these containers could not be started again: ${resumeFailures.join("; ")}` : "";
      if (failure) {
        if (failure instanceof PiccoloError && left) throw new PiccoloError(failure.kind, failure.message + left, { reason: failure.reason });
        throw failure;
      }
      if (left) throw new PiccoloError("internal", `backup ${summary!.snapshot_id.slice(0, 8)} made${left}`);
      const s = summary!;
      // restic 0.14 reports the short id in its summary: name the snapshot by its full id.
      let fullId = s.snapshot_id;
      try {
        // A local repository names each snapshot file by its id; ask restic only for a REST one.
        const local = r.location.startsWith("/") ? (await readdir(join(r.location, "snapshots"))).find((f) => f.startsWith(s.snapshot_id)) : undefined;
        fullId = local ?? (await r.snapshots(ctx.signal)).find((x) => x.id.startsWith(s.snapshot_id))?.id ?? fullId;
      } catch {
        // keep the short id
      }
      const result: CreateBackupResult = {
        snapshotId: fullId,
        filesNew: s.files_new,
        filesChanged: s.files_changed,
        filesUnmodified: s.files_unmodified,
        bytesAdded: s.data_added,
        bytesProcessed: s.total_bytes_processed,
        filesProcessed: s.total_files_processed,
        quiescedContainers: j.containers.map((c) => c.name),
        paths: items.map((i) => i.path),
      };
      return pack("piccolo.backup.v1.CreateBackupResult", CreateBackupResult.encode(result).finish());
    },
    recover: (op, l) => recoverOp(op, l),
  };

  const restoreKind: OperationKind<RestoreBackupRequest> = {
    kind: RESTORE_KIND,
    requestType: "piccolo.backup.v1.RestoreBackupRequest",
    encodeRequest: (r) => RestoreBackupRequest.encode(r).finish(),
    exclusive: true,
    single: true,
    cancellable: false,
    async run(req, ctx) {
      const r = await restic();
      ctx.progress({ phase: "prepare", phaseIndex: 1, phaseCount: 4, percent: 1, message: `reading snapshot ${req.snapshotId}` });
      const snap = await findSnapshot(r, req.snapshotId, ctx.signal);
      const plan = await restorePlan(snap, req.scope!, ctx.signal);
      const created: string[] = [];
      const dests: { item: ScopeItem; dest: string; keep: Set<string> }[] = [];
      for (const item of plan) {
        if (item.part === "volume") {
          let mount: string;
          try {
            mount = (await volumes.get(item.volume!, ctx.signal)).mountPoint;
          } catch (e) {
            if (!(e instanceof PiccoloError && e.kind === "not_found")) throw e;
            mount = (await volumes.create(item.volume!, {}, ctx.signal)).mountPoint;
            created.push(item.volume!);
          }
          dests.push({ item, dest: mount, keep: new Set() });
        } else if (item.part === "state") {
          dests.push({ item, dest: stateDir, keep: new Set(stateExcludedNames(roots, req.scope!.credentials)) });
        } else {
          await mkdir(item.path, { recursive: true, mode: 0o700 });
          dests.push({ item, dest: item.path, keep: new Set() });
        }
      }
      for (const d of dests) d.keep.add(posix.basename(stagingDir(d.dest, ctx.id)));
      let total = 0;
      try {
        const stats = JSON.parse(await r.ok(["stats", "--json", "--mode", "restore-size", snap.id], { signal: ctx.signal })) as { total_size?: number };
        total = stats.total_size ?? 0;
      } catch {
        total = 0;
      }
      const j: QuiesceJournal = { op: ctx.id, containers: [], staging: dests.map((d) => stagingDir(d.dest, ctx.id)) };
      await saveJournal(j);
      let failure: unknown;
      let resumeFailures: string[] = [];
      let done = 0;
      try {
        const volumeNames = plan.filter((i) => i.part === "volume").map((i) => i.volume!);
        ctx.progress({ phase: "quiesce", phaseIndex: 2, phaseCount: 4, percent: 2, message: `stopping the apps using ${volumeNames.length} volume(s)` });
        await quiesce(j, volumeNames, QuiesceMode.QUIESCE_MODE_STOP, ctx.signal);
        for (const d of dests) {
          const staging = stagingDir(d.dest, ctx.id);
          await rm(staging, { recursive: true, force: true });
          await mkdir(staging, { mode: 0o700 });
          ctx.progress({ phase: "restore", phaseIndex: 3, phaseCount: 4, percent: 3 + (94 * done) / Math.max(1, total), bytesDone: done, bytesTotal: total, message: `restoring ${d.item.path}` });
          const timer = setInterval(() => {
            void treeBytes(staging).then((b) =>
              ctx.progress({ phase: "restore", percent: 3 + (94 * Math.min(total, done + b)) / Math.max(1, total), bytesDone: done + b, bytesTotal: total, message: `restoring ${d.item.path}` }),
            );
          }, 1000);
          let res;
          try {
            res = await r.run(["restore", snap.id, "--target", staging, "--include", d.item.path], {
              signal: ctx.signal,
              onSpawn: (child) => {
                j.resticPid = child.pid;
                void saveJournal(j);
              },
            });
          } finally {
            clearInterval(timer);
          }
          if (res.code !== 0) throw resticError(["restore"], res);
          const src = join(staging, d.item.path);
          // Every component below the staging folder must be a real folder: a snapshot whose
          // folder is a symlink must not make the renames below reach outside the scope.
          let at = staging;
          for (const part of d.item.path.split("/").filter(Boolean)) {
            at = join(at, part);
            const s = await lstat(at).catch(() => undefined);
            if (!s?.isDirectory()) {
              throw new PiccoloError(
                s ? "failed_precondition" : "internal",
                s ? `snapshot ${snap.short_id} has ${at.slice(staging.length)} as a ${s.isSymbolicLink() ? "symlink" : "file"}, not a folder; refusing to restore it` : `restic restored nothing for ${d.item.path} from snapshot ${snap.short_id}`,
                { reason: s ? "SNAPSHOT_OUTSIDE_SCOPE" : undefined },
              );
            }
          }
          done += await treeBytes(src);
          await replaceContent(d.dest, src, d.keep);
          await rm(staging, { recursive: true, force: true });
        }
      } catch (e) {
        failure = e;
      } finally {
        ctx.progress({ phase: "resume", phaseIndex: 4, phaseCount: 4, percent: 98, message: `starting ${j.containers.length} app container(s) again` });
        for (const s of j.staging ?? []) await rm(s, { recursive: true, force: true }).catch(() => undefined);
        resumeFailures = await resume(j);
        await finishJournal(j, resumeFailures);
      }
      const left = resumeFailures.length > 0 ? `; these containers could not be started again: ${resumeFailures.join("; ")}` : "";
      if (failure) {
        const m = failure instanceof Error ? failure.message : String(failure);
        throw new PiccoloError(failure instanceof PiccoloError ? failure.kind : "internal", `${m}; the folders restored before the failure hold the snapshot's content, the others are unchanged${left}`, {
          reason: failure instanceof PiccoloError ? failure.reason : undefined,
        });
      }
      if (left) throw new PiccoloError("internal", `restored${left}`);
      const result: RestoreBackupResult = {
        snapshotId: snap.id,
        paths: dests.map((d) => d.dest),
        createdVolumes: created,
        restartedContainers: j.containers.map((c) => c.name),
      };
      return pack("piccolo.backup.v1.RestoreBackupResult", RestoreBackupResult.encode(result).finish());
    },
    recover: (op, l) => recoverOp(op, l),
  };

  const verifyKind: OperationKind<VerifyBackupRequest> = {
    kind: VERIFY_KIND,
    requestType: "piccolo.backup.v1.VerifyBackupRequest",
    encodeRequest: (r) => VerifyBackupRequest.encode(r).finish(),
    exclusive: false,
    single: true,
    cancellable: true,
    async run(req, ctx) {
      const r = await restic();
      const started = Date.now();
      ctx.progress({ phase: "check", phaseIndex: 1, phaseCount: 1, percent: 5, message: "restic check" });
      const args = ["check", ...(req.readDataPercent > 0 ? [`--read-data-subset=${req.readDataPercent}%`] : [])];
      const res = await r.run(args, { signal: ctx.signal });
      const text = `${res.stdout}\n${res.stderr}`;
      if (res.code !== 0 && /already locked|wrong password|no key found|unable to open config|Is there a repository/i.test(text)) throw resticError(args, res);
      const errors = res.code === 0 ? [] : text.split("\n").map((l) => l.trim()).filter((l) => /error|fatal|invalid|missing|damaged/i.test(l) && !/^no errors were found$/i.test(l));
      if (res.code !== 0 && errors.length === 0) errors.push(`restic check exited with ${res.code}`);
      const ms = Date.now() - started;
      const result: VerifyBackupResult = { ok: res.code === 0, errors, duration: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1e6 } };
      return pack("piccolo.backup.v1.VerifyBackupResult", VerifyBackupResult.encode(result).finish());
    },
    recover: async () => "",
  };

  const forgetKind: OperationKind<ForgetSnapshotsRequest> = {
    kind: FORGET_KIND,
    requestType: "piccolo.backup.v1.ForgetSnapshotsRequest",
    encodeRequest: (r) => ForgetSnapshotsRequest.encode(r).finish(),
    exclusive: false,
    single: true,
    cancellable: false,
    async run(req, ctx) {
      const r = await restic();
      ctx.progress({ phase: "forget", phaseIndex: 1, phaseCount: req.prune ? 2 : 1, percent: 5, message: "restic forget" });
      const keep: string[] = [];
      if (req.keepLast) keep.push("--keep-last", String(req.keepLast));
      if (req.keepDaily) keep.push("--keep-daily", String(req.keepDaily));
      if (req.keepWeekly) keep.push("--keep-weekly", String(req.keepWeekly));
      if (req.keepMonthly) keep.push("--keep-monthly", String(req.keepMonthly));
      const out = await r.ok(["forget", "--json", "--tag", PICCOLOD_TAG, ...keep], { signal: ctx.signal });
      const start = out.indexOf("[");
      const groups = JSON.parse(start >= 0 ? out.slice(start, out.lastIndexOf("]") + 1) : "[]") as ForgetGroup[];
      const result: ForgetSnapshotsResult = {
        kept: groups.flatMap((g) => (g.keep ?? []).map((s) => s.id)),
        removed: groups.flatMap((g) => (g.remove ?? []).map((s) => s.id)),
        pruned: false,
      };
      if (req.prune) {
        ctx.progress({ phase: "prune", phaseIndex: 2, phaseCount: 2, percent: 50, message: "restic prune" });
        await r.ok(["prune"], { signal: ctx.signal });
        result.pruned = true;
      }
      return pack("piccolo.backup.v1.ForgetSnapshotsResult", ForgetSnapshotsResult.encode(result).finish());
    },
    recover: async () => "",
  };

  /** After a crash: stop a restic the operation left running, drop its lock, start the apps again. */
  const recoverOp = async (op: Operation, l: Logger): Promise<string> => {
    let j: QuiesceJournal;
    try {
      j = JSON.parse(await readFile(journalPath(op.id), "utf8")) as QuiesceJournal;
    } catch {
      return "";
    }
    const said: string[] = [];
    if (j.resticPid) {
      try {
        const cmd = await readFile(`/proc/${j.resticPid}/cmdline`, "utf8");
        if (cmd.split("\0")[0]?.endsWith("restic")) {
          process.kill(j.resticPid, "SIGINT");
          for (let i = 0; i < 100 && (await processAlive(j.resticPid)); i++) await new Promise((res) => setTimeout(res, 100));
          if (await processAlive(j.resticPid)) process.kill(j.resticPid, "SIGKILL");
          said.push(`stopped the restic it had started (pid ${j.resticPid})`);
        }
      } catch {
        // gone already
      }
    }
    try {
      const r = await restic();
      await r.ok(["unlock"]);
      // restic keeps a lock whose process still exists; a killed restic that nobody has reaped
      // (a zombie) does, so its lock survives a plain unlock. When every lock left is that
      // restic's own, remove them all.
      if (j.resticPid && !(await processAlive(j.resticPid))) {
        // --quiet: restic otherwise says on stdout that it reads the password from stdin.
        const ids = (await r.ok(["list", "locks", "--no-lock", "--quiet"])).split("\n").filter((l) => /^[0-9a-f]{64}$/.test(l.trim()));
        const owners = await Promise.all(
          ids.map(async (id) => {
            const text = await r.ok(["cat", "lock", id.trim(), "--no-lock", "--quiet"]);
            return JSON.parse(text.slice(text.indexOf("{"))) as { pid?: number; hostname?: string };
          }),
        );
        if (owners.length > 0 && owners.every((o) => o.pid === j.resticPid && o.hostname === hostname())) {
          await r.ok(["unlock", "--remove-all"]);
          said.push(`removed the lock restic (pid ${j.resticPid}) left in the repository`);
        }
      }
    } catch (e) {
      said.push(`could not remove restic's stale lock: ${(e as Error).message}`);
    }
    for (const s of j.staging ?? []) {
      await rm(s, { recursive: true, force: true }).catch(() => undefined);
    }
    if ((j.staging ?? []).length > 0) said.push("removed the restore's staging folders; folders it had not reached are unchanged, the one it was replacing may be partly restored");
    const failures = await resume(j);
    if (j.containers.length > 0) {
      said.push(
        failures.length === 0
          ? `started the app container(s) it had quiesced again: ${j.containers.map((c) => c.name).join(", ")}`
          : `could not start again: ${failures.join("; ")}`,
      );
    }
    await finishJournal(j, failures);
    l.warn({ op: op.id, recovered: said }, "backup operation recovered");
    return said.join("; ");
  };

  return {
    async getRepository() {
      const repo = await readRepo();
      if (!repo) return { configured: false, location: "", id: "", passwordCredential: "", sealedWith: "" };
      const info = (await deps.credentials.list()).find((c) => c.name === repo.credential);
      return { configured: true, location: repo.location, id: repo.id, passwordCredential: repo.credential, sealedWith: info?.sealedWith ?? "" };
    },
    async initRepository(location, existing, password, signal) {
      const loc = checkLocation(location, deps.repositoryRoots);
      if (!existing && password !== "") throw invalidArgument("password", "only with existing; a new repository gets a random password");
      if (existing && password === "") throw invalidArgument("password", "is required with existing");
      if (password.length > 4096) throw invalidArgument("password", "longer than 4096 characters");
      const secret = existing ? Buffer.from(password, "utf8") : Buffer.from(randomBytes(32).toString("base64url"));
      const r = resticFor(loc, async () => secret);
      if (!existing) {
        if (!loc.startsWith("rest:")) {
          if (await stat(join(loc, "config")).catch(() => undefined)) {
            throw new PiccoloError("already_exists", `${loc} already holds a restic repository; connect to it with existing and its password`, { reason: "ALREADY_EXISTS" });
          }
          const s = await stat(loc).catch(() => undefined);
          if (s && !s.isDirectory()) throw invalidArgument("location", `${loc} exists and is not a folder`);
          if (s && (await readdir(loc)).length > 0) throw invalidArgument("location", `${loc} is a folder that is not empty`);
        }
        const res = await r.run(["init"], { signal });
        if (res.code !== 0) {
          if (/already exists|config file already exists/i.test(res.stderr)) throw new PiccoloError("already_exists", `${loc} already holds a restic repository`, { reason: "ALREADY_EXISTS" });
          throw resticError(["init"], res);
        }
      }
      const cfgRes = await r.run(["cat", "config"], { signal });
      if (cfgRes.code !== 0) {
        const err = resticError(["cat"], cfgRes);
        if (err.reason === "WRONG_PASSWORD") throw invalidArgument("password", `does not open the repository at ${loc}`);
        throw err;
      }
      const cfgText = cfgRes.stdout.slice(cfgRes.stdout.indexOf("{"));
      const id = (JSON.parse(cfgText) as { id?: string }).id ?? "";
      const credential = `backup-repository-${createHash("sha256").update(loc).digest("hex").slice(0, 12)}`;
      await deps.credentials.seal(credential, secret);
      const cfg: RepoConfig = { location: loc, id, credential };
      await writeJson(repoFile, cfg);
      log.info({ location: loc, id, existing }, "backup repository set up");
      const info = (await deps.credentials.list()).find((c) => c.name === credential);
      return { configured: true, location: loc, id, passwordCredential: credential, sealedWith: info?.sealedWith ?? "" };
    },
    async listSnapshots(signal) {
      return (await (await restic()).snapshots(signal)).map(snapshotFrom).sort((a, b) => (a.time?.getTime() ?? 0) - (b.time?.getTime() ?? 0));
    },
    async prepareCreate(req, signal) {
      const scope = checkScope(req.scope, "scope");
      if (!(req.quiesce in QuiesceMode) || req.quiesce < 0) throw invalidArgument("quiesce", `unknown mode ${req.quiesce}`);
      if (req.tags.length > 16) throw invalidArgument("tags", "at most 16");
      req.tags.forEach((t, i) => {
        if (!TAG.test(t) || t === PICCOLOD_TAG || t.includes(":")) throw invalidArgument(`tags[${i}]`, `${JSON.stringify(t.slice(0, 80))} is not a tag (letters, digits, "_", "." and "-", up to 64)`);
      });
      await restic();
      for (const [i, v] of scope.volumes.entries()) {
        try {
          await volumes.get(v, signal);
        } catch (e) {
          if (e instanceof PiccoloError && e.kind === "not_found") throw invalidArgument(`scope.volumes[${i}]`, `there is no volume ${JSON.stringify(v)}`);
          throw e;
        }
      }
      return { ...req, scope, quiesce: req.quiesce === QuiesceMode.QUIESCE_MODE_UNSPECIFIED ? QuiesceMode.QUIESCE_MODE_STOP : req.quiesce };
    },
    async prepareRestore(req, signal) {
      if (!/^[0-9a-f]{8,64}$/.test(req.snapshotId)) throw invalidArgument("snapshot_id", `${JSON.stringify(req.snapshotId.slice(0, 80))} is not a snapshot id (8 to 64 hex digits)`);
      const scope = checkScope(req.scope, "scope");
      const r = await restic();
      const snap = await findSnapshot(r, req.snapshotId, signal);
      await restorePlan(snap, scope, signal);
      return { snapshotId: snap.id, scope };
    },
    async prepareForget(req) {
      for (const k of ["keepLast", "keepDaily", "keepWeekly", "keepMonthly"] as const) {
        if (req[k] > 100_000) throw invalidArgument(k.replace(/[A-Z]/g, (c) => "_" + c.toLowerCase()), "at most 100000");
      }
      if (!req.keepLast && !req.keepDaily && !req.keepWeekly && !req.keepMonthly) {
        throw invalidArgument("keep_last", "the policy keeps nothing: set at least one of keep_last, keep_daily, keep_weekly, keep_monthly");
      }
      await restic();
      return req;
    },
    async prepareVerify(req) {
      if (!(req.readDataPercent >= 0 && req.readDataPercent <= 100)) throw invalidArgument("read_data_percent", `must be from 0 to 100 (got ${req.readDataPercent})`);
      await restic();
      return req;
    },
    kinds: { create: createKind, restore: restoreKind, verify: verifyKind, forget: forgetKind },
  };
}
