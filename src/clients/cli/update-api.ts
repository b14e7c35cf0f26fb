/** The UpdateService calls piccoloctl makes, over gRPC or REST (api.ts picks the transport). */
import type { OperationEvent } from "../../../gen/piccolo/operations/v1/operations.js";
import type {
  ApplyUpdateRequest,
  CheckForUpdateRequest,
  CheckForUpdateResponse,
  GetUpdateStatusResponse,
  RebootRequest,
  RebootResponse,
  RollbackUpdateRequest,
  SetUpdateConfigRequest,
  UpdateConfig,
} from "../../../gen/piccolo/update/v1/update.js";
import type { PiccoloGrpcClients } from "../grpc-client.js";
import type { PiccoloRestClients } from "../rest-clients.js";

/** UpdateService for the CLI; streams end when `signal` aborts. */
export interface UpdateApi {
  getUpdateStatus(): Promise<GetUpdateStatusResponse>;
  checkForUpdate(request: CheckForUpdateRequest): Promise<CheckForUpdateResponse>;
  /** Starts an update.apply operation and streams its events. */
  applyUpdate(request: ApplyUpdateRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  /** Starts an update.rollback operation and streams its events. */
  rollbackUpdate(request: RollbackUpdateRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  reboot(request: RebootRequest): Promise<RebootResponse>;
  setUpdateConfig(request: SetUpdateConfigRequest): Promise<UpdateConfig>;
}

/** UpdateApi over the REST clients; `unary()` gives each unary call its deadline. */
export function restUpdateApi(
  c: PiccoloRestClients,
  unary: () => { signal?: AbortSignal },
  stream: (signal: AbortSignal) => { signal?: AbortSignal },
): UpdateApi {
  return {
    getUpdateStatus: () => c.update.getUpdateStatus({}, unary()),
    checkForUpdate: (r) => c.update.checkForUpdate(r, unary()),
    applyUpdate: (r, signal) => c.update.applyUpdate(r, stream(signal)),
    rollbackUpdate: (r, signal) => c.update.rollbackUpdate(r, stream(signal)),
    reboot: (r) => c.update.reboot(r, unary()),
    setUpdateConfig: (r) => c.update.setUpdateConfig(r, unary()),
  };
}

/** UpdateApi over the gRPC clients. */
export function grpcUpdateApi(c: PiccoloGrpcClients, streamMs: number): UpdateApi {
  return {
    getUpdateStatus: () => c.update.getUpdateStatus({}),
    checkForUpdate: (r) => c.update.checkForUpdate(r),
    applyUpdate: (r, signal) => c.update.applyUpdate(r, { signal, timeoutMs: streamMs }),
    rollbackUpdate: (r, signal) => c.update.rollbackUpdate(r, { signal, timeoutMs: streamMs }),
    reboot: (r) => c.update.reboot(r),
    setUpdateConfig: (r) => c.update.setUpdateConfig(r),
  };
}
