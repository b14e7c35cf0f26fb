/** NetworkService: the RPC layer over the network manager. */
import type { NetworkServiceService } from "../../../gen/piccolo/network/v1/network.js";
import type { ServiceImpl } from "../rpc.js";
import { listInterfaces, type NetRunner } from "./interfaces.js";
import type { NetworkManager } from "./manager.js";

/** What NetworkService needs. */
export interface NetworkServiceDeps {
  readonly network: NetworkManager;
  readonly runner: NetRunner;
}

/** Creates the NetworkService implementation. */
export function createNetworkService(deps: NetworkServiceDeps): ServiceImpl<typeof NetworkServiceService> {
  const { network, runner } = deps;
  return {
    async listInterfaces(_req, ctx) {
      return { interfaces: await listInterfaces(runner, ctx.signal) };
    },
    getNetworkConfig() {
      return network.getConfig();
    },
    applyNetworkConfig(req, ctx) {
      return network.apply(req.interfaces, req.confirmTimeoutSeconds, ctx.signal);
    },
    async confirmNetworkChange(req) {
      return { config: await network.confirm(req.id) };
    },
    async setHostname(req, ctx) {
      return { hostname: await network.setHostname(req.hostname, ctx.signal) };
    },
    checkConnectivity(req, ctx) {
      return network.checkConnectivity(req.hostname, req.timeoutSeconds, ctx.signal);
    },
  };
}
