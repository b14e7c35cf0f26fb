/** TrustService: the RPC layer over the trust manager. */
import type { TrustServiceService } from "../../../gen/piccolo/trust/v1/trust.js";
import { invalidArgument } from "../errors.js";
import type { OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import type { ServiceImpl } from "../rpc.js";
import { MAX_SECRET_BYTES } from "./credentials.js";
import { pcrSelectionString, REGISTER_KIND, type TrustManager } from "./manager.js";

/** What TrustService needs. */
export interface TrustServiceDeps {
  readonly trust: TrustManager;
  readonly ops: OperationManager;
}

/** Creates the TrustService implementation. */
export function createTrustService(deps: TrustServiceDeps): ServiceImpl<typeof TrustServiceService> {
  const { trust, ops } = deps;
  return {
    async getTpmStatus(_req, ctx) {
      return trust.tpmStatus(ctx.signal);
    },
    async getDeviceIdentity(_req, ctx) {
      const id = await trust.identity(ctx.signal);
      return {
        deviceId: id.deviceId,
        ekPublicKeyPem: id.ekPublicPem,
        ekCertificatePem: id.ekCertificatePem,
        akPublicKeyPem: id.akPublicPem,
        akName: id.akName,
        akHandle: id.akHandle,
        registration: id.registration,
      };
    },
    async attest(req, ctx) {
      if (req.nonce.length === 0) throw invalidArgument("nonce", "is required (1-32 bytes)");
      if (req.nonce.length > 32) throw invalidArgument("nonce", `is ${req.nonce.length} bytes; at most 32`);
      const selection = pcrSelectionString(req.pcrSelection);
      const nonce = Buffer.from(req.nonce);
      const q = await trust.attest(nonce, selection, ctx.signal);
      return {
        quote: q.quote,
        signature: q.signature,
        pcrs: q.pcrs,
        pcrValues: q.pcrValues,
        akPublicKeyPem: q.akPublicPem,
        hashAlgorithm: q.hashAlgorithm,
        nonce,
        pcrSelection: q.selection,
        deviceId: q.deviceId,
      };
    },
    async registerDevice(req, ctx, sink) {
      const op = await ops.start(REGISTER_KIND, trust.prepareRegister(req), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    refreshDeviceToken(_req, ctx) {
      return trust.refreshNow(ctx.signal);
    },
    async sealSecret(req) {
      if (req.value.length === 0) throw invalidArgument("value", "is required (1 byte to 64 KiB)");
      if (req.value.length > MAX_SECRET_BYTES) throw invalidArgument("value", `is ${req.value.length} bytes; at most ${MAX_SECRET_BYTES}`);
      return trust.sealSecret(req.name, Buffer.from(req.value));
    },
    async listSecrets() {
      return trust.listSecrets();
    },
    async deleteSecret(req) {
      await trust.deleteSecret(req.name);
      return {};
    },
  };
}
