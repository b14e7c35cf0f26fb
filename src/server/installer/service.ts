/** InstallerService: the RPC layer over the installer. */
import { Any } from "../../../gen/google/protobuf/any.js";
import { InstallResult, type InstallerServiceService } from "../../../gen/piccolo/installer/v1/installer.js";
import { OperationState } from "../../../gen/piccolo/operations/v1/operations.js";
import { invalidArgument, PiccoloError } from "../errors.js";
import type { OperationManager } from "../operations/manager.js";
import type { ServiceImpl } from "../rpc.js";
import { INSTALL_KIND, type Installer } from "./manager.js";

/** What InstallerService needs. */
export interface InstallerServiceDeps {
  readonly installer: Installer;
  readonly ops: OperationManager;
}

/** Creates the InstallerService implementation. */
export function createInstallerService(deps: InstallerServiceDeps): ServiceImpl<typeof InstallerServiceService> {
  const { installer, ops } = deps;
  return {
    getInstallEnvironment(_req, ctx) {
      return installer.environment(ctx.signal);
    },
    async listTargetDisks(_req, ctx) {
      return { disks: await installer.listDisks(ctx.signal) };
    },
    async planInstall(req, ctx) {
      return (await installer.plan(req.spec, ctx.signal)).plan;
    },
    async install(req, ctx, sink) {
      const prepared = await installer.confirm(req, ctx.signal);
      const op = await ops.start(INSTALL_KIND, prepared, ctx.actor);
      ctx.startedOperation = { id: op.id };
      installer.recoveryKeys.open(op.id);
      try {
        for await (const ev of ops.watch(op.id, 0, ctx.signal)) {
          if (ev.outcome?.state === OperationState.OPERATION_STATE_SUCCEEDED && ev.outcome.result) {
            const key = installer.recoveryKeys.take(op.id);
            if (key) {
              // Only this stream's copy carries the key; the journaled event keeps it empty.
              const result = InstallResult.decode(ev.outcome.result.value);
              result.recoveryKey = key;
              const withKey = Any.fromPartial({ typeUrl: ev.outcome.result.typeUrl, value: InstallResult.encode(result).finish() });
              await sink.send({ ...ev, outcome: { ...ev.outcome, result: withKey } });
              continue;
            }
          }
          await sink.send(ev);
        }
      } finally {
        installer.recoveryKeys.close(op.id);
      }
    },
    async cancelInstall(req, ctx) {
      let id = req.operationId;
      if (id && !/^op-[0-9A-Za-z-]{1,64}$/.test(id)) throw invalidArgument("operation_id", "not an operation id");
      if (!id) {
        const running = ops.list({ kind: INSTALL_KIND, state: OperationState.OPERATION_STATE_RUNNING, pageSize: 1 }).operations[0];
        if (!running) throw new PiccoloError("failed_precondition", "no install is running", { reason: "NO_INSTALL_RUNNING" });
        id = running.id;
      } else if (ops.get(id).kind !== INSTALL_KIND) {
        throw invalidArgument("operation_id", `${id} is not an install`);
      }
      return { operation: ops.cancel(id, ctx.actor) };
    },
  };
}
