/** UpdateService: the RPC layer over the update manager and its operations. */
import type { UpdateServiceService } from "../../../gen/piccolo/update/v1/update.js";
import { invalidArgument } from "../errors.js";
import type { OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import type { ServiceImpl } from "../rpc.js";
import { APPLY_KIND, ROLLBACK_KIND, type UpdateManager } from "./manager.js";

/** What UpdateService needs. */
export interface UpdateServiceDeps {
  readonly update: UpdateManager;
  readonly ops: OperationManager;
}

const CHANNEL_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Creates the UpdateService implementation. */
export function createUpdateService(deps: UpdateServiceDeps): ServiceImpl<typeof UpdateServiceService> {
  const { update, ops } = deps;
  return {
    getUpdateStatus() {
      return update.status();
    },
    checkForUpdate(req) {
      if (req.channel !== "" && !CHANNEL_RE.test(req.channel)) throw invalidArgument("channel", 'letters, digits, ".", "_" and "-", 1 to 64 characters');
      return update.check(req.channel);
    },
    async applyUpdate(req, ctx, sink) {
      const op = await ops.start(APPLY_KIND, await update.prepareApply(req), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async rollbackUpdate(req, ctx, sink) {
      const op = await ops.start(ROLLBACK_KIND, await update.prepareRollback(req), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async reboot(req) {
      const reason = req.reason.trim();
      if (reason === "") throw invalidArgument("reason", "is required");
      if (reason.length > 200 || /[\0-\x1f]/.test(reason)) throw invalidArgument("reason", "must be one line of at most 200 characters");
      const delay = Number(req.delay?.seconds ?? 0) + (req.delay?.nanos ?? 0) / 1e9;
      if (delay < 0 || delay > 86_400) throw invalidArgument("delay", "must be from 0 to 24 hours");
      return { scheduledTime: await update.reboot(reason, Math.round(delay * 1000)) };
    },
    setUpdateConfig(req) {
      return update.setConfig(req);
    },
  };
}
