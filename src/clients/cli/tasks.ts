/**
 * piccoloctl's `tasks …` commands: run (a task run followed phase by phase, one phase per task,
 * then the per-task table), list, get, cancel, and `tasks service create` for agent services.
 */
import { readFileSync } from "node:fs";
import { AgentService, ListTaskRunsResponse, TaskRun, TaskRunState, TaskStatus, type AgentProfile } from "../../../gen/piccolo/tasks/v1/tasks.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { parseMemory } from "./containers.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatTime, jsonDocument, table } from "./format.js";

const T = "piccolo.tasks.v1.";

/** The agent profile flags shared by `tasks run` and `tasks service create`. */
export interface ProfileOptions {
  readonly image?: string;
  readonly command?: string;
  readonly secret?: readonly string[];
  readonly cpus?: string;
  readonly memory?: string;
  readonly mountPath?: string;
  readonly secretMountPath?: string;
  readonly network?: string;
  readonly timeout?: number;
  readonly grace?: number;
  readonly plannerUrl?: string;
  readonly plannerModel?: string;
  readonly plannerSecret?: string;
}

/** Builds an AgentProfile from the flags. */
export function profileFromOptions(o: ProfileOptions): AgentProfile {
  if (!o.image) throw new UsageError("--image: required (the agent image, already on the host)");
  if (!o.command) throw new UsageError('--command: required (a command template such as \'agent exec "{prompt}"\')');
  const cpus = o.cpus === undefined ? 0 : Number(o.cpus);
  if (!Number.isFinite(cpus) || cpus < 0) throw new UsageError(`--cpus ${JSON.stringify(o.cpus)}: expected a number of CPUs, e.g. 1.5`);
  return {
    image: o.image,
    commandTemplate: o.command,
    secrets: [...(o.secret ?? [])],
    cpus,
    memoryBytes: o.memory === undefined ? 0 : parseMemory(o.memory, "--memory"),
    mountPath: o.mountPath ?? "",
    secretMountPath: o.secretMountPath ?? "",
    network: o.network ?? "",
    timeoutSeconds: o.timeout ?? 0,
    gracePeriodSeconds: o.grace ?? 0,
    plannerUrl: o.plannerUrl ?? "",
    plannerModel: o.plannerModel ?? "",
    plannerSecret: o.plannerSecret ?? "",
  };
}

const status = (s: TaskStatus): string => (TaskStatus[s] ?? String(s)).replace(/^TASK_STATUS_/, "").toLowerCase();
const runState = (s: TaskRunState): string => (TaskRunState[s] ?? String(s)).replace(/^TASK_RUN_STATE_/, "");

/** One run in detail: its branches and a row per task. */
export function formatTaskRun(r: TaskRun): string {
  let text = [
    `id:              ${r.id}`,
    `state:           ${runState(r.state)}`,
    `repository:      ${r.repository}`,
    `base branch:     ${r.baseBranch}`,
    `service branch:  ${r.serviceBranch || "-"}`,
    `image:           ${r.image}`,
    `created:         ${formatTime(r.createTime)}`,
    `ended:           ${formatTime(r.endTime)}`,
    ...(r.syncCommit ? [`sync commit:     ${r.syncCommit.slice(0, 12)}`] : []),
    ...(r.error ? [`error:           ${r.error}`] : []),
    `branches:        ${r.branches.join(", ") || "-"}`,
  ].join("\n");
  text += "\n\n";
  if (r.tasks.length === 0) return `${text}no tasks\n`;
  text += table([
    ["#", "STATUS", "COMMIT", "BRANCH", "TASK", "OUTCOME"],
    ...r.tasks.map((t) => [String(t.index), status(t.status), t.commit ? t.commit.slice(0, 12) : "-", t.branch || "-", t.text.slice(0, 60), t.mergeOutcome || "-"]),
  ]);
  for (const t of r.tasks.filter((x) => x.logTail.length > 0)) {
    text += `\ntask ${t.index} log (last ${t.logTail.length} lines, exit ${t.exitCode}):\n${t.logTail.map((l) => `  ${l}`).join("\n")}\n`;
  }
  return text;
}

/** `tasks run --repo PATH (--request TEXT | --request-file FILE) --image I --command T …`. */
export async function tasksRunCommand(
  c: CommandContext,
  opts: ProfileOptions & {
    readonly repo?: string;
    readonly base?: string;
    readonly request?: string;
    readonly requestFile?: string;
    readonly prompt?: string;
    readonly serviceBranch?: string;
    readonly detach?: boolean;
  },
): Promise<number> {
  if (!opts.repo) throw new UsageError("--repo: required (the git working tree on the daemon's host)");
  if (!opts.repo.startsWith("/")) throw new UsageError(`--repo ${JSON.stringify(opts.repo)}: must be an absolute path on the daemon's host`);
  if ((opts.request === undefined) === (opts.requestFile === undefined)) throw new UsageError("give the request with exactly one of --request and --request-file");
  let requestText = opts.request ?? "";
  if (opts.requestFile !== undefined) {
    try {
      requestText = readFileSync(opts.requestFile === "-" ? 0 : opts.requestFile, "utf8");
    } catch (e) {
      throw new UsageError(`--request-file ${JSON.stringify(opts.requestFile)}: ${(e as Error).message}`);
    }
  }
  const request = {
    repository: opts.repo,
    baseBranch: opts.base ?? "",
    request: requestText,
    promptTemplate: opts.prompt ?? "",
    profile: profileFromOptions(opts),
    serviceBranch: opts.serviceBranch ?? "",
  };
  let id = "";
  const code = await followOperation({
    ...followOptionsFrom(c),
    first: (signal) => {
      const events = c.api.tasks.createTaskRun(request, signal);
      return (async function* () {
        for await (const e of events) {
          if (e.attached) id = e.attached.id;
          yield e;
        }
      })();
    },
    detach: opts.detach === true,
  });
  // The per-task picture at the end, also after a failure or cancel (branches made are listed).
  if (!opts.detach && id && c.global.output === "text") {
    const run = await c.api.tasks.getTaskRun({ id }).catch(() => undefined);
    if (run) c.stdout.write(`\n${formatTaskRun(run)}`);
  }
  return code;
}

/** `tasks list [--limit N]`. */
export async function tasksListCommand(c: CommandContext, opts: { readonly limit?: number }): Promise<number> {
  const r = await c.api.tasks.listTaskRuns({ pageSize: opts.limit ?? 0 });
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument(`${T}ListTaskRunsResponse`, ListTaskRunsResponse, r));
    return 0;
  }
  if (r.runs.length === 0) {
    c.stdout.write("no task runs\n");
    return 0;
  }
  const count = (run: TaskRun, s: TaskStatus): number => run.tasks.filter((t) => t.status === s).length;
  c.stdout.write(
    table([
      ["ID", "STATE", "TASKS", "MERGED", "CONFLICTED", "FAILED", "SERVICE BRANCH", "CREATED"],
      ...r.runs.map((run) => [
        run.id,
        runState(run.state),
        String(run.tasks.length),
        String(count(run, TaskStatus.TASK_STATUS_MERGED)),
        String(count(run, TaskStatus.TASK_STATUS_CONFLICTED)),
        String(count(run, TaskStatus.TASK_STATUS_FAILED)),
        run.serviceBranch || "-",
        formatTime(run.createTime),
      ]),
    ]),
  );
  return 0;
}

/** `tasks get ID`. */
export async function tasksGetCommand(c: CommandContext, id: string): Promise<number> {
  const run = await c.api.tasks.getTaskRun({ id });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}TaskRun`, TaskRun, run) : formatTaskRun(run));
  return 0;
}

/** `tasks cancel ID`. */
export async function tasksCancelCommand(c: CommandContext, id: string): Promise<number> {
  const run = await c.api.tasks.cancelTaskRun({ id });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}TaskRun`, TaskRun, run) : `cancelling ${run.id}; its agent gets the grace period to stop (follow with: piccoloctl ops watch ${run.id})\n`);
  return 0;
}

/** `tasks service create NAME --image I --command T [--repo PATH] [--prompt P] [--write-only] …`. */
export async function tasksServiceCreateCommand(
  c: CommandContext,
  name: string,
  opts: ProfileOptions & { readonly repo?: string; readonly prompt?: string; readonly writeOnly?: boolean },
): Promise<number> {
  const svc = await c.api.tasks.createAgentService({
    name,
    profile: profileFromOptions(opts),
    repository: opts.repo ?? "",
    prompt: opts.prompt ?? "",
    writeOnly: opts.writeOnly === true,
  });
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}AgentService`, AgentService, svc));
  else c.stdout.write(`${svc.replaced ? "replaced" : "wrote"} ${svc.unitPath}${svc.started ? `; ${svc.unit} enabled and started` : ""}\n`);
  return 0;
}
