/** TaskService: the RPC layer over the task runner, its records and agent services. */
import { OperationState } from "../../../gen/piccolo/operations/v1/operations.js";
import type { TaskServiceService } from "../../../gen/piccolo/tasks/v1/tasks.js";
import { PiccoloError } from "../errors.js";
import type { OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import { validate, type ServiceImpl } from "../rpc.js";
import { createAgentService, type AgentServiceDeps, type SystemdManager } from "./agent-service.js";
import { getRun, prepareRun, RUN_KIND, type TaskRunner, type TaskRunnerDeps } from "./runner.js";

/** What TaskService needs. */
export interface TaskServiceDeps {
  readonly ops: OperationManager;
  readonly runner: TaskRunner;
  readonly runnerDeps: TaskRunnerDeps;
  readonly agentServices: AgentServiceDeps;
  readonly systemd: SystemdManager;
}

/** Creates the TaskService implementation. */
export function createTaskService(deps: TaskServiceDeps): ServiceImpl<typeof TaskServiceService> {
  const { ops, runner, runnerDeps } = deps;
  const store = runnerDeps.store;
  return {
    async createTaskRun(req, ctx, sink) {
      const checked = await prepareRun(req, runnerDeps, runner.busy, ctx.actor, ctx.signal);
      // Claim the repository before the operation starts, so two calls cannot both pass the check.
      const other = runner.busy.get(checked.repository);
      if (other) {
        throw new PiccoloError("failed_precondition", `repository: task run ${other} is running on ${checked.repository}; wait for it or cancel it`, {
          field: "repository",
          reason: "OPERATION_RUNNING",
        });
      }
      runner.busy.set(checked.repository, "(starting)");
      let op;
      try {
        op = await ops.start(RUN_KIND, checked, ctx.actor);
      } catch (e) {
        runner.busy.delete(checked.repository);
        throw e;
      }
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async listTaskRuns(req) {
      const size = validate.range(req.pageSize, "page_size", 1, 1000, 100);
      return { runs: (await store.list()).slice(0, size) };
    },
    getTaskRun(req) {
      return getRun(store, validate.id(req.id, "id"));
    },
    async cancelTaskRun(req, ctx) {
      const id = validate.id(req.id, "id");
      const run = await getRun(store, id);
      // The operation of an old run may have been pruned from the journal: then it has ended too.
      const op = (() => {
        try {
          return ops.get(id);
        } catch {
          return undefined;
        }
      })();
      if (!op || (op.state !== OperationState.OPERATION_STATE_RUNNING && op.state !== OperationState.OPERATION_STATE_PENDING)) {
        throw new PiccoloError("failed_precondition", `task run ${id} has already ended`, { metadata: { operation_id: id } });
      }
      ops.cancel(id, ctx.actor);
      return run;
    },
    createAgentService(req, ctx) {
      return createAgentService(req, deps.agentServices, deps.systemd, ctx.signal);
    },
  };
}
