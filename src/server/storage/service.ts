/** StorageService: disks, filesystems, volumes, encryption and low-space alerts. */
import { Any } from "../../../gen/google/protobuf/any.js";
import {
  ResealEncryptionRequest,
  ResealEncryptionResult,
  type StorageServiceService,
} from "../../../gen/piccolo/storage/v1/storage.js";
import { flattenTree, type DiskInventory } from "../disks/inventory.js";
import { invalidArgument, PiccoloError } from "../errors.js";
import type { OperationKind, OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import type { ServiceImpl } from "../rpc.js";
import type { CredentialStore } from "../trust/credentials.js";
import { watchAlerts } from "./alerts.js";
import { checkDevicePath, checkKey, encryptionStatus, reseal } from "./encryption.js";
import { listFilesystems } from "./filesystems.js";
import { checkVolumeName, type VolumeManager } from "./volumes.js";

/** Operation kind of ResealEncryption. */
export const RESEAL_KIND = "storage.reseal";

/** What StorageService needs. */
export interface StorageServiceDeps {
  /** The block device inventory (shared with the installer). */
  readonly inventory: DiskInventory;
  readonly volumes: VolumeManager;
  readonly ops: OperationManager;
  readonly credentials: CredentialStore;
  readonly mountInfoFile: string;
  /** systemd's --tpm2-device= value. */
  readonly tpm2Device: string;
  readonly alertThresholdPercent: number;
  readonly alertIntervalMs: number;
}

/** A reseal as the worker gets it: the request as journaled (key left out) and the key. */
interface ResealJob {
  readonly request: ResealEncryptionRequest;
  readonly key: Buffer;
}

/** The `storage.reseal` operation kind. */
export function resealKind(tpm2Device: string): OperationKind<ResealJob> {
  return {
    kind: RESEAL_KIND,
    requestType: "piccolo.storage.v1.ResealEncryptionRequest",
    // The key never reaches the journal: only the device, the credential name and the PCRs do.
    encodeRequest: (job) => ResealEncryptionRequest.encode({ ...job.request, key: "" }).finish(),
    exclusive: true,
    single: false,
    cancellable: false,
    async run(job, ctx) {
      const out = await reseal({
        device: job.request.device,
        key: job.key,
        pcrs: job.request.pcrs,
        tpm2Device,
        signal: ctx.signal,
        progress: (phase, percent, message) => ctx.progress({ phase, percent, message }),
      });
      const result: ResealEncryptionResult = { device: out.device, newKeyslot: out.newKeyslot, wipedKeyslots: out.wipedKeyslots };
      return Any.fromPartial({
        typeUrl: "type.googleapis.com/piccolo.storage.v1.ResealEncryptionResult",
        value: ResealEncryptionResult.encode(result).finish(),
      });
    },
  };
}

/** Creates the StorageService implementation. */
export function createStorageService(deps: StorageServiceDeps): ServiceImpl<typeof StorageServiceService> {
  const { volumes, ops } = deps;
  const fs = () => listFilesystems(deps.mountInfoFile);
  return {
    async listDisks(_req, ctx) {
      return { disks: await deps.inventory.tree(ctx.signal) };
    },
    async listFilesystems() {
      return { filesystems: await fs() };
    },
    async listVolumes(req, ctx) {
      return { volumes: await volumes.list(req.includeUnmanaged, ctx.signal) };
    },
    createVolume(req, ctx) {
      return volumes.create(checkVolumeName(req.name, "name"), req.labels, ctx.signal);
    },
    async deleteVolume(req, ctx) {
      const name = checkVolumeName(req.name, "name");
      await volumes.remove(name, ctx.signal);
      return { name };
    },
    async getEncryptionStatus(req, ctx) {
      let paths: string[];
      if (req.devices.length > 0) {
        if (req.devices.length > 64) throw invalidArgument("devices", `at most 64 (got ${req.devices.length})`);
        paths = [];
        for (const [i, d] of req.devices.entries()) paths.push(await checkDevicePath(d, `devices[${i}]`));
      } else {
        paths = flattenTree(await deps.inventory.tree(ctx.signal))
          .filter((d) => d.fsType === "crypto_LUKS")
          .map((d) => d.path);
      }
      const devices = [];
      for (const p of paths) devices.push(await encryptionStatus(p, ctx.signal));
      return { devices };
    },
    async resealEncryption(req, ctx, sink) {
      const device = await checkDevicePath(req.device, "device");
      if (req.pcrs.length > 24) throw invalidArgument("pcrs", "at most 24 PCRs");
      for (const [i, p] of req.pcrs.entries()) if (p > 23) throw invalidArgument(`pcrs[${i}]`, `PCR ${p} does not exist (0 to 23)`);
      const pcrs = req.pcrs.length > 0 ? [...new Set(req.pcrs)].sort((a, b) => a - b) : [7];
      if ((req.key === "") === (req.keyCredential === "")) throw invalidArgument("key", "give exactly one of key and key_credential");
      let key: Buffer;
      if (req.key !== "") {
        if (req.key.length > 1024) throw invalidArgument("key", "longer than 1024 characters");
        key = Buffer.from(req.key, "utf8");
      } else {
        try {
          key = await deps.credentials.unseal(req.keyCredential);
        } catch (e) {
          if (e instanceof PiccoloError && e.kind === "invalid_argument") throw invalidArgument("key_credential", e.message);
          throw e;
        }
      }
      // Not LUKS (FAILED_PRECONDITION) or a wrong key (INVALID_ARGUMENT) fail the call, before any operation.
      await encryptionStatus(device, ctx.signal);
      await checkKey(device, key, ctx.signal);
      const op = await ops.start<ResealJob>(RESEAL_KIND, { request: { ...req, device, pcrs, key: "" }, key }, ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async watchAlerts(_req, ctx, sink) {
      for await (const a of watchAlerts({ list: fs, thresholdPercent: deps.alertThresholdPercent, intervalMs: deps.alertIntervalMs }, ctx.signal)) {
        await sink.send(a);
      }
    },
  };
}
