/**
 * The task runner: checks a CreateTaskRunRequest completely before anything changes, then runs
 * it as a `tasks.run` operation: plan, sync (commit local changes, pull from origin), branches
 * (a service branch and one per task), one agent container per task (through the containers
 * area) on a worktree of the task's branch, commit and merge into the service branch, result.
 * The user's own working tree is only touched by the sync step; tasks run in worktrees below the
 * repository's git folder that are removed at the end, so the branches are what stays.
 */
import { randomBytes } from "node:crypto";
import { chmod, mkdir, realpath, rm, stat, statfs, writeFile } from "node:fs/promises";
import { dirname, isAbsolute, join, posix } from "node:path";
import type { Logger } from "pino";
import { Any } from "../../../gen/google/protobuf/any.js";
import { ContainerState, ContainerSpec, MountType, type Mount } from "../../../gen/piccolo/containers/v1/containers.js";
import type { Operation } from "../../../gen/piccolo/operations/v1/operations.js";
import {
  CreateTaskRunRequest,
  TaskRun,
  TaskRunState,
  TaskStatus,
  type AgentProfile,
  type Task,
} from "../../../gen/piccolo/tasks/v1/tasks.js";
import type { ContainerManager } from "../containers/manager.js";
import { checkHostPath, checkImageReference, checkSpec } from "../containers/spec.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";
import type { OperationKind, WorkerContext } from "../operations/manager.js";
import { checkSecretName, type CredentialStore } from "../trust/credentials.js";
import { branchExists, git, gitOk, validBranchName } from "./git.js";
import { agentCommand, builtinPlan, modelPlan, splitCommand, TASK_PLACEHOLDER, type Plan } from "./planner.js";
import type { TaskRunStore } from "./store.js";

/** Operation kind of CreateTaskRun. */
export const RUN_KIND = "tasks.run";

/** What the runner needs. */
export interface TaskRunnerDeps {
  readonly containers: ContainerManager;
  readonly credentials: Pick<CredentialStore, "has" | "unseal">;
  readonly store: TaskRunStore;
  /** A tmpfs folder the per-run secret folders are made in. */
  readonly secretsDir: string;
  readonly log: Logger;
}

/** A checked request, as the worker takes it (journaled as the CreateTaskRunRequest it came from). */
export interface CheckedRun {
  readonly request: CreateTaskRunRequest;
  /** The repository's top folder, symlinks resolved. */
  readonly repository: string;
  /** Its common git folder (where run worktrees go). */
  readonly gitDir: string;
  /** Who asked for the run. */
  readonly actor: string;
  readonly baseBranch: string;
  readonly command: readonly string[];
  readonly mountPath: string;
  readonly secretMountPath: string;
  readonly timeoutSeconds: number;
  readonly graceSeconds: number;
  readonly network: string;
}

const DEFAULT_MOUNT = "/workspace";
const DEFAULT_SECRET_MOUNT = "/run/secrets";
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;
const LOG_TAIL_LINES = 20;

const pack = (run: TaskRun): Any =>
  Any.fromPartial({ typeUrl: "type.googleapis.com/piccolo.tasks.v1.TaskRun", value: TaskRun.encode(run).finish() });

/** Checks a container path field; returns it normalised. */
function containerPath(value: string, dflt: string, field: string): string {
  if (value === "") return dflt;
  if (!posix.isAbsolute(value) || value.includes("\0")) throw invalidArgument(field, "must be an absolute path inside the container");
  const p = posix.normalize(value).replace(/(.)\/+$/, "$1");
  if (p === "/") throw invalidArgument(field, 'must not be "/"');
  return p;
}

/** Whether `dir` is on a memory filesystem (tmpfs or ramfs), so secret files never reach a disk. */
export async function onMemoryFilesystem(dir: string): Promise<boolean> {
  // A folder not made yet will be on its nearest existing parent's filesystem.
  for (let d = dir; ; d = dirname(d)) {
    try {
      const s = await statfs(d);
      return s.type === TMPFS_MAGIC || s.type === RAMFS_MAGIC;
    } catch {
      if (d === dirname(d)) return false;
    }
  }
}

/** Checks the profile fields every use of a profile shares; returns the argv template. */
export async function checkProfile(
  profile: AgentProfile | undefined,
  containers: ContainerManager,
  credentials: Pick<CredentialStore, "has">,
  signal: AbortSignal,
): Promise<{ command: string[]; mountPath: string; secretMountPath: string; network: string; timeoutSeconds: number; graceSeconds: number }> {
  if (!profile) throw invalidArgument("profile", "is required");
  const image = checkImageReference(profile.image, "profile.image");
  if (profile.commandTemplate.trim() === "") throw invalidArgument("profile.command_template", "is required");
  if (profile.commandTemplate.includes("\0")) throw invalidArgument("profile.command_template", "must not contain NUL characters");
  const command = splitCommand(profile.commandTemplate);
  if (command.length === 0) throw invalidArgument("profile.command_template", "is required");
  const mountPath = containerPath(profile.mountPath, DEFAULT_MOUNT, "profile.mount_path");
  const secretMountPath = containerPath(profile.secretMountPath, DEFAULT_SECRET_MOUNT, "profile.secret_mount_path");
  if (mountPath === secretMountPath) throw invalidArgument("profile.secret_mount_path", `must differ from the mount path ${mountPath}`);
  const timeoutSeconds = profile.timeoutSeconds === 0 ? 3600 : profile.timeoutSeconds;
  if (timeoutSeconds > 7 * 24 * 3600) throw invalidArgument("profile.timeout_seconds", "must be at most 604800 (7 days)");
  const graceSeconds = profile.gracePeriodSeconds === 0 ? 10 : profile.gracePeriodSeconds;
  if (graceSeconds > 3600) throw invalidArgument("profile.grace_period_seconds", "must be at most 3600");
  const network = profile.network.trim() === "" ? "none" : profile.network.trim();
  // The rest of the container (limits, network name) is checked as the containers area checks
  // any spec, on a sample without mounts.
  await checkSpec(
    ContainerSpec.fromPartial({
      name: "piccolo-task-check",
      image,
      command,
      network,
      resources: { cpus: profile.cpus, memoryBytes: profile.memoryBytes },
    }),
    "profile",
    containers.policy,
  );
  const seen = new Set<string>();
  for (const [i, s] of profile.secrets.entries()) {
    checkSecretName(s, `profile.secrets[${i}]`);
    if (seen.has(s)) throw invalidArgument(`profile.secrets[${i}]`, `${s} is listed twice`);
    seen.add(s);
    if (!(await credentials.has(s))) {
      throw new PiccoloError("failed_precondition", `profile.secrets[${i}]: there is no sealed secret named ${JSON.stringify(s)}; seal it first`, {
        field: `profile.secrets[${i}]`,
        reason: "SECRET_NOT_FOUND",
      });
    }
  }
  if ((await containers.listImages(image, signal)).length === 0) {
    throw new PiccoloError("failed_precondition", `profile.image: image ${JSON.stringify(image)} is not on this host; import or build it first`, {
      field: "profile.image",
      reason: "IMAGE_NOT_FOUND",
    });
  }
  return { command, mountPath, secretMountPath, network, timeoutSeconds, graceSeconds };
}

/** Checks a request completely; nothing on the host changes. Throws PiccoloError naming the field. */
export async function prepareRun(req: CreateTaskRunRequest, deps: TaskRunnerDeps, busyRepos: ReadonlyMap<string, string>, actor: string, signal: AbortSignal): Promise<CheckedRun> {
  if (req.repository === "") throw invalidArgument("repository", "is required");
  if (req.request.trim() === "") throw invalidArgument("request", "is required");
  if (req.request.length > 256 * 1024) throw invalidArgument("request", "is longer than 256 KiB");
  if (req.request.includes("\0")) throw invalidArgument("request", "must not contain NUL characters");
  if (req.promptTemplate !== "" && !req.promptTemplate.includes(TASK_PLACEHOLDER)) {
    throw invalidArgument("prompt_template", `must contain the placeholder ${TASK_PLACEHOLDER}`);
  }
  const repoPath = await checkHostPath(req.repository, "repository", deps.containers.policy, "task repositories");
  const top = await git(repoPath, ["rev-parse", "--show-toplevel"], signal);
  if (top.code !== 0 || (await realpath(top.stdout.trim()).catch(() => "")) !== repoPath) {
    throw new PiccoloError(
      "failed_precondition",
      top.code !== 0 ? `repository: ${repoPath} is not a git repository` : `repository: ${repoPath} is inside the git repository ${top.stdout.trim()}; give its top folder`,
      { field: "repository", reason: "NOT_A_GIT_REPOSITORY" },
    );
  }
  const gitDir = await gitOk(repoPath, ["rev-parse", "--absolute-git-dir"], signal);
  for (const [marker, what] of [
    ["MERGE_HEAD", "a merge"],
    ["rebase-merge", "a rebase"],
    ["rebase-apply", "a rebase or git am"],
    ["CHERRY_PICK_HEAD", "a cherry-pick"],
    ["REVERT_HEAD", "a revert"],
  ] as const) {
    if ((await git(repoPath, ["rev-parse", "--verify", "--quiet", marker], signal)).code === 0 || (await stat(join(gitDir, marker)).then(() => true, () => false))) {
      throw new PiccoloError("failed_precondition", `repository: ${repoPath} is in the middle of ${what}; finish or abort it first`, { field: "repository", reason: "TREE_NOT_COMMITTABLE" });
    }
  }
  const unmerged = (await gitOk(repoPath, ["ls-files", "--unmerged"], signal)).split("\n").filter(Boolean);
  if (unmerged.length > 0) {
    const files = [...new Set(unmerged.map((l) => l.split("\t")[1]))].slice(0, 5).join(", ");
    throw new PiccoloError("failed_precondition", `repository: the working tree has unmerged files (${files}) and cannot be committed; resolve them first`, {
      field: "repository",
      reason: "TREE_NOT_COMMITTABLE",
    });
  }
  const other = busyRepos.get(repoPath);
  if (other) {
    throw new PiccoloError("failed_precondition", `repository: task run ${other} is running on ${repoPath}; wait for it or cancel it`, {
      field: "repository",
      reason: "OPERATION_RUNNING",
      metadata: { operation_id: other },
    });
  }
  let baseBranch = req.baseBranch;
  if (baseBranch === "") {
    const head = await git(repoPath, ["symbolic-ref", "--quiet", "--short", "HEAD"], signal);
    if (head.code !== 0) throw invalidArgument("base_branch", "is required: the working tree has no branch checked out");
    baseBranch = head.stdout.trim();
  }
  if (!(await validBranchName(baseBranch))) throw invalidArgument("base_branch", `${JSON.stringify(baseBranch.slice(0, 80))} is not a branch name`);
  if (!(await branchExists(repoPath, baseBranch, signal))) {
    throw new PiccoloError("failed_precondition", `base_branch: there is no branch ${JSON.stringify(baseBranch)} in ${repoPath}`, { field: "base_branch" });
  }
  if (req.serviceBranch !== "") {
    if (!(await validBranchName(req.serviceBranch))) throw invalidArgument("service_branch", `${JSON.stringify(req.serviceBranch.slice(0, 80))} is not a branch name`);
    if (await branchExists(repoPath, req.serviceBranch, signal)) {
      throw new PiccoloError("already_exists", `service_branch: branch ${JSON.stringify(req.serviceBranch)} already exists in ${repoPath}`, { field: "service_branch" });
    }
  }
  const p = await checkProfile(req.profile, deps.containers, deps.credentials, signal);
  const profile = req.profile!;
  if (profile.secrets.length > 0 && !(await onMemoryFilesystem(deps.secretsDir))) {
    throw new PiccoloError("unavailable", `the folder for agent secrets ${deps.secretsDir} (tasksSecretsDir) is not on a tmpfs; secrets are only written to memory`, {
      reason: "HOST_PART_UNAVAILABLE",
    });
  }
  if (profile.plannerUrl !== "") {
    let u: URL;
    try {
      u = new URL(profile.plannerUrl);
    } catch {
      throw invalidArgument("profile.planner_url", `${JSON.stringify(profile.plannerUrl.slice(0, 80))} is not a URL`);
    }
    if (u.protocol !== "http:" && u.protocol !== "https:") throw invalidArgument("profile.planner_url", "must be an http or https URL");
    if (u.username || u.password) throw invalidArgument("profile.planner_url", "must not carry credentials; use planner_secret");
    if (profile.plannerModel.trim() === "") throw invalidArgument("profile.planner_model", "is required with planner_url");
    if (profile.plannerSecret !== "") {
      checkSecretName(profile.plannerSecret, "profile.planner_secret");
      if (!(await deps.credentials.has(profile.plannerSecret))) {
        throw new PiccoloError("failed_precondition", `profile.planner_secret: there is no sealed secret named ${JSON.stringify(profile.plannerSecret)}; seal it first`, {
          field: "profile.planner_secret",
          reason: "SECRET_NOT_FOUND",
        });
      }
    }
  } else {
    // The built-in planner is cheap: check its answer now, so a request without tasks is an RPC error.
    builtinPlan(req.request, req.promptTemplate);
  }
  return {
    request: CreateTaskRunRequest.fromPartial({ ...req, repository: repoPath, baseBranch }),
    repository: repoPath,
    gitDir: await gitOk(repoPath, ["rev-parse", "--git-common-dir"], signal).then((d) => (isAbsolute(d) ? d : join(repoPath, d))),
    actor,
    baseBranch,
    command: p.command,
    mountPath: p.mountPath,
    secretMountPath: p.secretMountPath,
    timeoutSeconds: p.timeoutSeconds,
    graceSeconds: p.graceSeconds,
    network: p.network,
  };
}

const sleep = (ms: number, signal: AbortSignal): Promise<void> =>
  new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const t = setTimeout(done, ms);
    function done(): void {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });

/** Short container-safe id of a run for names. */
const shortId = (id: string): string => id.replace(/^op-/, "").replace(/[^A-Za-z0-9_.-]/g, "");

/** The task runner: the operation kind plus the records. */
export interface TaskRunner {
  readonly kind: OperationKind<CheckedRun>;
  /** Repositories with a run going (or starting), and the run's id. */
  readonly busy: Map<string, string>;
}

/** Creates the runner. */
export function createTaskRunner(deps: TaskRunnerDeps): TaskRunner {
  const { containers, store, credentials } = deps;
  const busy = new Map<string, string>();

  const run = async (c: CheckedRun, ctx: WorkerContext): Promise<Any> => {
    const req = c.request;
    const profile = req.profile!;
    const repo = c.repository;
    const id = ctx.id;
    const record: TaskRun = TaskRun.fromPartial({
      id,
      state: TaskRunState.TASK_RUN_STATE_RUNNING,
      repository: repo,
      baseBranch: c.baseBranch,
      image: profile.image,
      actor: c.actor,
      createTime: new Date(),
    });
    busy.set(repo, id);
    const save = (): Promise<void> => store.save(record);
    const log = ctx.log;
    const workRoot = join(c.gitDir, "piccolo-runs", shortId(id));
    const secretDir = join(deps.secretsDir, shortId(id));
    const worktrees: string[] = [];
    let running: string | undefined;
    let phaseCount = 3;
    const items = (): { id: string; status: string; bytesDone: number; bytesTotal: number }[] =>
      record.tasks.map((t) => ({ id: `task_${t.index}`, status: TaskStatus[t.status].replace("TASK_STATUS_", "").toLowerCase(), bytesDone: 0, bytesTotal: 0 }));
    const phase = (name: string, index: number, percent: number, message: string): void =>
      ctx.progress({ phase: name, phaseIndex: index, phaseCount, percent, message, items: items() });

    try {
      await save();
      // 1. Plan; unseal what the agents get, so a secret that cannot be unsealed fails here too.
      phase("plan", 1, 0, profile.plannerUrl ? `asking the planner model ${profile.plannerModel}` : "splitting the request into tasks");
      let plan: Plan;
      if (profile.plannerUrl) {
        const apiKey = profile.plannerSecret ? await credentials.unseal(profile.plannerSecret) : undefined;
        try {
          plan = await modelPlan({ url: profile.plannerUrl, model: profile.plannerModel, apiKey, request: req.request, signal: ctx.signal });
        } finally {
          apiKey?.fill(0);
        }
      } else {
        plan = builtinPlan(req.request, req.promptTemplate);
      }
      const secrets = new Map<string, Buffer>();
      for (const s of profile.secrets) secrets.set(s, await credentials.unseal(s));
      record.promptTemplate = plan.promptTemplate;
      record.tasks = plan.tasks.map((text, i) => ({
        index: i + 1,
        text,
        branch: "",
        status: TaskStatus.TASK_STATUS_PENDING,
        commit: "",
        mergeCommit: "",
        mergeOutcome: "",
        exitCode: 0,
        logTail: [],
        container: "",
      }));
      phaseCount = 4 + plan.tasks.length;
      await save();
      log.info({ tasks: plan.tasks.length }, "planned");

      // 2. Sync: commit local changes, then pull from origin.
      phase("sync", 2, 5, "committing local changes and pulling from origin");
      if ((await gitOk(repo, ["status", "--porcelain"], ctx.signal)) !== "") {
        // The index as the user left it, to put back when the commit is refused (e.g. by a hook).
        const savedIndex = await gitOk(repo, ["write-tree"], ctx.signal);
        await gitOk(repo, ["add", "-A"], ctx.signal);
        const commit = await git(repo, ["commit", "-q", "-m", `piccolod: local changes before task run ${id}`], ctx.signal);
        if (commit.code !== 0) {
          await git(repo, ["read-tree", savedIndex]);
          throw new PiccoloError("failed_precondition", `repository: the local changes could not be committed (nothing was changed): ${(commit.stderr || commit.stdout).trim().slice(0, 300)}`, {
            field: "repository",
            reason: "TREE_NOT_COMMITTABLE",
          });
        }
        record.syncCommit = await gitOk(repo, ["rev-parse", "HEAD"], ctx.signal);
        await save();
      }
      if ((await git(repo, ["remote", "get-url", "origin"], ctx.signal)).code === 0) {
        const fetch = await git(repo, ["fetch", "--quiet", "origin"], ctx.signal);
        if (fetch.code !== 0) throw new PiccoloError("unavailable", `the repository's origin could not be fetched: ${fetch.stderr.trim().slice(0, 300)}`);
        if ((await git(repo, ["show-ref", "--verify", "--quiet", `refs/remotes/origin/${c.baseBranch}`], ctx.signal)).code === 0) {
          const current = (await git(repo, ["symbolic-ref", "--quiet", "--short", "HEAD"], ctx.signal)).stdout.trim();
          if (current === c.baseBranch) {
            const m = await git(repo, ["merge", "--no-edit", `origin/${c.baseBranch}`], ctx.signal);
            if (m.code !== 0) {
              await git(repo, ["merge", "--abort"]);
              throw new PiccoloError("failed_precondition", `pulling origin/${c.baseBranch} into ${c.baseBranch} conflicted; the merge was aborted${record.syncCommit ? ` (local changes stay committed as ${record.syncCommit.slice(0, 12)})` : ""}`);
            }
          } else {
            const ff = await git(repo, ["fetch", "--quiet", "origin", `${c.baseBranch}:${c.baseBranch}`], ctx.signal);
            if (ff.code !== 0) {
              throw new PiccoloError("failed_precondition", `${c.baseBranch} cannot be fast-forwarded to origin/${c.baseBranch}: ${ff.stderr.trim().slice(0, 300)}`);
            }
          }
        }
      }

      // 3. Branches.
      const service = req.serviceBranch || `piccolo/${id}`;
      phase("branches", 3, 10, `making ${service} and ${record.tasks.length} task branches`);
      for (const b of [service, ...record.tasks.map((t) => `${service}-task-${t.index}`)]) {
        if (await branchExists(repo, b, ctx.signal)) throw new PiccoloError("already_exists", `branch ${b} already exists in ${repo}`);
      }
      await gitOk(repo, ["branch", service, c.baseBranch], ctx.signal);
      record.serviceBranch = service;
      record.branches.push(service);
      for (const t of record.tasks) {
        t.branch = `${service}-task-${t.index}`;
        await gitOk(repo, ["branch", t.branch, service], ctx.signal);
        record.branches.push(t.branch);
      }
      await save();
      await mkdir(workRoot, { recursive: true, mode: 0o700 });
      const serviceTree = join(workRoot, "service");
      await gitOk(repo, ["worktree", "add", "--quiet", serviceTree, service], ctx.signal);
      worktrees.push(serviceTree);
      if (secrets.size > 0) {
        await mkdir(secretDir, { recursive: true, mode: 0o700 });
        await chmod(secretDir, 0o700);
        for (const [name, value] of secrets) {
          await writeFile(join(secretDir, name), value, { mode: 0o400 });
          value.fill(0);
        }
      }

      // 4. One agent per task.
      for (const t of record.tasks) {
        const base = 10 + (85 * (t.index - 1)) / record.tasks.length;
        const taskPhase = `task_${t.index}`;
        t.status = TaskStatus.TASK_STATUS_RUNNING;
        phase(taskPhase, 3 + t.index, base, `task ${t.index}/${record.tasks.length}: ${t.text.slice(0, 120)}`);
        const tree = join(workRoot, `task-${t.index}`);
        await gitOk(repo, ["worktree", "add", "--quiet", tree, t.branch], ctx.signal);
        worktrees.push(tree);
        const name = `piccolo-task-${shortId(id)}-${t.index}`.slice(0, 128);
        t.container = name;
        await save();
        const mounts: Mount[] = [{ type: MountType.MOUNT_TYPE_BIND, source: tree, target: c.mountPath, readOnly: false }];
        if (secrets.size > 0) mounts.push({ type: MountType.MOUNT_TYPE_BIND, source: secretDir, target: c.secretMountPath, readOnly: true });
        const prompt = plan.promptTemplate.split(TASK_PLACEHOLDER).join(t.text);
        const spec = ContainerSpec.fromPartial({
          name,
          image: profile.image,
          command: agentCommand(c.command, prompt),
          env: {
            PICCOLO_WORKSPACE: c.mountPath,
            PICCOLO_SECRETS_DIR: c.secretMountPath,
            PICCOLO_TASK_INDEX: String(t.index),
            PICCOLO_TASK_RUN: id,
          },
          mounts,
          network: c.network,
          resources: { cpus: profile.cpus, memoryBytes: profile.memoryBytes },
          labels: { "piccolo.task-run": id, "piccolo.task": String(t.index) },
        });
        await containers.create(spec, ctx.signal, { extraDataRoots: [deps.secretsDir] });
        running = name;
        await containers.start(name, ctx.signal);
        // Wait for the agent to end, its timeout, or a cancel.
        const deadline = Date.now() + c.timeoutSeconds * 1000;
        let state = await containers.get(name, AbortSignal.timeout(30_000));
        let timedOut = false;
        while (state.state !== ContainerState.CONTAINER_STATE_EXITED && state.state !== ContainerState.CONTAINER_STATE_DEAD) {
          if (ctx.signal.aborted) break;
          if (Date.now() > deadline) {
            timedOut = true;
            break;
          }
          await sleep(300, ctx.signal);
          state = await containers.get(name, AbortSignal.timeout(30_000));
        }
        if (ctx.signal.aborted || timedOut) {
          // Stop it within the grace period even though the operation's own signal is aborted.
          await containers.stop(name, c.graceSeconds, AbortSignal.timeout((c.graceSeconds + 60) * 1000));
          state = await containers.get(name, AbortSignal.timeout(30_000));
        }
        const tail: string[] = [];
        for await (const e of containers.logs(name, { follow: false, tail: LOG_TAIL_LINES, timestamps: false }, AbortSignal.timeout(30_000))) tail.push(e.line);
        t.logTail = tail.slice(-LOG_TAIL_LINES);
        t.exitCode = state.exitCode;
        await containers.remove(name, { force: true, volumes: true }, AbortSignal.timeout(60_000));
        running = undefined;
        if (ctx.signal.aborted) {
          t.status = TaskStatus.TASK_STATUS_CANCELLED;
          throw ctx.signal.reason instanceof Error ? ctx.signal.reason : new Error("cancelled");
        }
        // Commit what the agent changed to the task's branch.
        await gitOk(tree, ["add", "-A"], ctx.signal);
        if ((await git(tree, ["diff", "--cached", "--quiet"], ctx.signal)).code !== 0) {
          // piccolod's own commits skip the repository's hooks: the agent's work is recorded as it is.
          await gitOk(tree, ["commit", "-q", "--no-verify", "-m", `task ${t.index}: ${t.text.slice(0, 200)}\n\nPiccolo task run ${id}`], ctx.signal);
          t.commit = await gitOk(tree, ["rev-parse", "HEAD"], ctx.signal);
        }
        if (timedOut || state.exitCode !== 0) {
          t.status = TaskStatus.TASK_STATUS_FAILED;
          t.mergeOutcome = timedOut ? `not merged: the agent ran past ${c.timeoutSeconds} s and was stopped` : `not merged: the agent exited with ${state.exitCode}`;
        } else if (!t.commit) {
          t.status = TaskStatus.TASK_STATUS_NO_CHANGES;
          t.mergeOutcome = "nothing to merge: the agent changed nothing";
        } else {
          const m = await git(serviceTree, ["merge", "--no-ff", "--no-edit", "--no-verify", "-m", `Merge task ${t.index} into ${service}: ${t.text.slice(0, 120)}`, t.branch], ctx.signal);
          if (m.code === 0) {
            t.status = TaskStatus.TASK_STATUS_MERGED;
            t.mergeCommit = await gitOk(serviceTree, ["rev-parse", "HEAD"], ctx.signal);
            t.mergeOutcome = "merged";
          } else {
            const conflicts = (await git(serviceTree, ["diff", "--name-only", "--diff-filter=U"])).stdout.split("\n").filter(Boolean);
            await git(serviceTree, ["merge", "--abort"]);
            t.status = TaskStatus.TASK_STATUS_CONFLICTED;
            t.mergeOutcome = conflicts.length > 0 ? `conflict in ${conflicts.join(", ")}; the task branch is kept unmerged` : `merge failed: ${(m.stderr || m.stdout).trim().slice(0, 300)}`;
          }
        }
        log.info({ task: t.index, status: TaskStatus[t.status], exit: t.exitCode }, "task done");
        await save();
        phase(taskPhase, 3 + t.index, 10 + (85 * t.index) / record.tasks.length, `task ${t.index}: ${t.mergeOutcome}`);
      }

      // 5. Result.
      record.state = TaskRunState.TASK_RUN_STATE_SUCCEEDED;
      record.endTime = new Date();
      const count = (s: TaskStatus): number => record.tasks.filter((t) => t.status === s).length;
      phase(
        "result",
        phaseCount,
        100,
        `${count(TaskStatus.TASK_STATUS_MERGED)} merged, ${count(TaskStatus.TASK_STATUS_CONFLICTED)} conflicted, ${count(TaskStatus.TASK_STATUS_FAILED)} failed, ${count(TaskStatus.TASK_STATUS_NO_CHANGES)} without changes into ${service}`,
      );
      await save();
      return pack(record);
    } catch (e) {
      const cancelled = ctx.signal.aborted;
      for (const t of record.tasks) {
        if (t.status === TaskStatus.TASK_STATUS_PENDING || t.status === TaskStatus.TASK_STATUS_RUNNING) t.status = TaskStatus.TASK_STATUS_CANCELLED;
      }
      const reason: unknown = ctx.signal.reason;
      const shutdown = cancelled && (reason as { why?: string } | undefined)?.why === "shutdown";
      record.state = !cancelled ? TaskRunState.TASK_RUN_STATE_FAILED : shutdown ? TaskRunState.TASK_RUN_STATE_INTERRUPTED : TaskRunState.TASK_RUN_STATE_CANCELLED;
      record.error = cancelled ? (reason instanceof Error ? reason.message : "cancelled") : (e as Error).message;
      if (record.branches.length > 0) record.error += `; branches kept: ${record.branches.join(", ")}`;
      record.endTime = new Date();
      await save();
      if (!cancelled && e instanceof PiccoloError && record.branches.length > 0) {
        throw new PiccoloError(e.kind, `${e.message}; branches kept: ${record.branches.join(", ")}`, { cause: e, field: e.field, reason: e.reason });
      }
      throw e;
    } finally {
      if (running) await containers.remove(running, { force: true, volumes: true }, AbortSignal.timeout(60_000)).catch(() => undefined);
      await rm(secretDir, { recursive: true, force: true });
      for (const w of worktrees.reverse()) await git(repo, ["worktree", "remove", "--force", w]);
      await rm(workRoot, { recursive: true, force: true });
      await git(repo, ["worktree", "prune"]);
      busy.delete(repo);
    }
  };

  const kind: OperationKind<CheckedRun> = {
    kind: RUN_KIND,
    requestType: "piccolo.tasks.v1.CreateTaskRunRequest",
    encodeRequest: (c) => CreateTaskRunRequest.encode(c.request).finish(),
    exclusive: false,
    single: false,
    cancellable: true,
    run,
    async recover(op: Operation, log: Logger): Promise<string> {
      const rec = await store.get(op.id);
      if (!rec) return "";
      const left: string[] = [];
      for (const t of rec.tasks) {
        if (t.container) await containers.remove(t.container, { force: true, volumes: true }, AbortSignal.timeout(60_000)).then(() => left.push(`removed container ${t.container}`), () => undefined);
        if (t.status === TaskStatus.TASK_STATUS_PENDING || t.status === TaskStatus.TASK_STATUS_RUNNING) t.status = TaskStatus.TASK_STATUS_CANCELLED;
      }
      await rm(join(deps.secretsDir, shortId(op.id)), { recursive: true, force: true });
      const gitDir = await gitOk(rec.repository, ["rev-parse", "--git-common-dir"]).then((d) => (isAbsolute(d) ? d : join(rec.repository, d))).catch(() => "");
      if (gitDir) {
        await rm(join(gitDir, "piccolo-runs", shortId(op.id)), { recursive: true, force: true });
        await git(rec.repository, ["worktree", "prune"]);
      }
      rec.state = TaskRunState.TASK_RUN_STATE_INTERRUPTED;
      rec.endTime = new Date();
      rec.error = `piccolod stopped while the run was going${rec.branches.length > 0 ? `; branches kept: ${rec.branches.join(", ")}` : ""}`;
      await store.save(rec);
      log.warn({ run: op.id }, "task run interrupted");
      return [...left, rec.branches.length > 0 ? `branches kept: ${rec.branches.join(", ")}` : "no branch was made"].join("; ");
    },
  };
  return { kind, busy };
}

/** Reads a run; NOT_FOUND when unknown. */
export async function getRun(store: TaskRunStore, id: string): Promise<TaskRun> {
  const r = await store.get(id);
  if (!r) throw notFound("task run", id);
  return r;
}

/** A random suffix for names made here. */
export const nonce = (): string => randomBytes(3).toString("hex");

/** Re-exported for the service: the task type. */
export type { Task };
