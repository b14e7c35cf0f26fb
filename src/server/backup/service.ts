/** BackupService: the RPC layer over the backup manager. */
import type { BackupServiceService } from "../../../gen/piccolo/backup/v1/backup.js";
import type { OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import type { ServiceImpl } from "../rpc.js";
import { CREATE_KIND, FORGET_KIND, RESTORE_KIND, VERIFY_KIND, type BackupManager } from "./manager.js";

/** What BackupService needs. */
export interface BackupServiceDeps {
  readonly backup: BackupManager;
  readonly ops: OperationManager;
}

/** Creates the BackupService implementation. */
export function createBackupService(deps: BackupServiceDeps): ServiceImpl<typeof BackupServiceService> {
  const { backup, ops } = deps;
  return {
    getRepository() {
      return backup.getRepository();
    },
    initRepository(req, ctx) {
      return backup.initRepository(req.location, req.existing, req.password, ctx.signal);
    },
    async createBackup(req, ctx, sink) {
      const op = await ops.start(CREATE_KIND, await backup.prepareCreate(req, ctx.signal), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async listSnapshots(_req, ctx) {
      return { snapshots: await backup.listSnapshots(ctx.signal) };
    },
    async restoreBackup(req, ctx, sink) {
      const op = await ops.start(RESTORE_KIND, await backup.prepareRestore(req, ctx.signal), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async verifyBackup(req, ctx, sink) {
      const op = await ops.start(VERIFY_KIND, await backup.prepareVerify(req), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async forgetSnapshots(req, ctx, sink) {
      const op = await ops.start(FORGET_KIND, await backup.prepareForget(req), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
  };
}
