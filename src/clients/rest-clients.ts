/** All generated REST clients over one transport. */
import { AuthServiceRestClient } from "../../gen/piccolo/auth/v1/auth_rest.js";
import { ContainerServiceRestClient } from "../../gen/piccolo/containers/v1/containers_rest.js";
import { OperationsServiceRestClient } from "../../gen/piccolo/operations/v1/operations_rest.js";
import { SystemServiceRestClient } from "../../gen/piccolo/system/v1/system_rest.js";
import { createRestTransport, type RestTransportOptions } from "./rest-transport.js";

/** The REST clients for every piccolod service. */
export interface PiccoloRestClients {
  readonly auth: AuthServiceRestClient;
  readonly system: SystemServiceRestClient;
  readonly operations: OperationsServiceRestClient;
  readonly containers: ContainerServiceRestClient;
}

/** Creates REST clients for the gateway at `options.baseUrl`. */
export function createRestClients(options: RestTransportOptions): PiccoloRestClients {
  const t = createRestTransport(options);
  return { auth: new AuthServiceRestClient(t), system: new SystemServiceRestClient(t), operations: new OperationsServiceRestClient(t), containers: new ContainerServiceRestClient(t) };
}
