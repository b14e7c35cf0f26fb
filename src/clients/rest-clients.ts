/** All generated REST clients over one transport. */
import { BackupServiceRestClient } from "../../gen/piccolo/backup/v1/backup_rest.js";
import { NetworkServiceRestClient } from "../../gen/piccolo/network/v1/network_rest.js";
import { StorageServiceRestClient } from "../../gen/piccolo/storage/v1/storage_rest.js";
import { ContainerServiceRestClient } from "../../gen/piccolo/containers/v1/containers_rest.js";
import { OperationsServiceRestClient } from "../../gen/piccolo/operations/v1/operations_rest.js";
import { SystemServiceRestClient } from "../../gen/piccolo/system/v1/system_rest.js";
import { createRestTransport, type RestTransportOptions } from "./rest-transport.js";

/** The REST clients for every piccolod service. */
export interface PiccoloRestClients {
  readonly system: SystemServiceRestClient;
  readonly operations: OperationsServiceRestClient;
  readonly containers: ContainerServiceRestClient;
  readonly storage: StorageServiceRestClient;
  readonly network: NetworkServiceRestClient;
  readonly backup: BackupServiceRestClient;
}

/** Creates REST clients for the gateway at `options.baseUrl`. */
export function createRestClients(options: RestTransportOptions): PiccoloRestClients {
  const t = createRestTransport(options);
  return { system: new SystemServiceRestClient(t), operations: new OperationsServiceRestClient(t), containers: new ContainerServiceRestClient(t),
    storage: new StorageServiceRestClient(t),
    network: new NetworkServiceRestClient(t),
    backup: new BackupServiceRestClient(t),
  };
}
