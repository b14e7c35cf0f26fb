/** OperationsService: the RPC layer over the operation manager. */
import {
  OperationState,
  type OperationEvent,
  type OperationsServiceService,
} from "../../../gen/piccolo/operations/v1/operations.js";
import { invalidArgument } from "../errors.js";
import { validate, type CallContext, type ServiceImpl, type StreamSink } from "../rpc.js";
import type { OperationManager } from "./manager.js";

/** Streams an operation's events to a sink until the outcome, the client leaving, or an error. */
export async function streamOperation(
  ops: OperationManager,
  id: string,
  afterSequence: number,
  ctx: CallContext,
  sink: StreamSink<OperationEvent>,
): Promise<void> {
  for await (const ev of ops.watch(id, afterSequence, ctx.signal)) {
    await sink.send(ev);
  }
}

/** Creates the OperationsService implementation. */
export function createOperationsService(ops: OperationManager): ServiceImpl<typeof OperationsServiceService> {
  return {
    async getOperation(req) {
      return ops.get(validate.id(req.id, "id"));
    },
    async listOperations(req) {
      if (!(req.state in OperationState) || req.state < 0) throw invalidArgument("state", `unknown state ${req.state}`);
      const pageSize = validate.range(req.pageSize, "page_size", 1, 1000, 50);
      if (req.kind !== "" && !/^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$/.test(req.kind)) {
        throw invalidArgument("kind", `${JSON.stringify(req.kind.slice(0, 64))} is not an operation kind such as "system.diagnostics"`);
      }
      return ops.list({ kind: req.kind, state: req.state, pageSize, pageToken: req.pageToken });
    },
    async watchOperation(req, ctx, sink) {
      const id = validate.id(req.id, "id");
      const op = ops.get(id);
      if (req.afterSequence > op.lastSequence && op.state !== OperationState.OPERATION_STATE_RUNNING && op.state !== OperationState.OPERATION_STATE_PENDING) {
        throw invalidArgument("after_sequence", `operation ${id} ended at sequence ${op.lastSequence}; got ${req.afterSequence}`);
      }
      await streamOperation(ops, id, req.afterSequence, ctx, sink);
    },
    async cancelOperation(req, ctx) {
      return ops.cancel(validate.id(req.id, "id"), ctx.actor);
    },
  };
}
