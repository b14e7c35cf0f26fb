/** All generated REST clients over one transport. */
import { AuthServiceRestClient } from "../../gen/piccolo/auth/v1/auth_rest.js";
import { BackupServiceRestClient } from "../../gen/piccolo/backup/v1/backup_rest.js";
import { NetworkServiceRestClient } from "../../gen/piccolo/network/v1/network_rest.js";
import { StorageServiceRestClient } from "../../gen/piccolo/storage/v1/storage_rest.js";
import { ContainerServiceRestClient } from "../../gen/piccolo/containers/v1/containers_rest.js";
import { InstallerServiceRestClient } from "../../gen/piccolo/installer/v1/installer_rest.js";
import { OperationsServiceRestClient } from "../../gen/piccolo/operations/v1/operations_rest.js";
import { SystemServiceRestClient } from "../../gen/piccolo/system/v1/system_rest.js";
import { TaskServiceRestClient } from "../../gen/piccolo/tasks/v1/tasks_rest.js";
import { TrustServiceRestClient } from "../../gen/piccolo/trust/v1/trust_rest.js";
import { UpdateServiceRestClient } from "../../gen/piccolo/update/v1/update_rest.js";
import { createRestTransport, type RestTransportOptions } from "./rest-transport.js";

/** The REST clients for every piccolod service. */
export interface PiccoloRestClients {
  readonly auth: AuthServiceRestClient;
  readonly system: SystemServiceRestClient;
  readonly operations: OperationsServiceRestClient;
  readonly containers: ContainerServiceRestClient;
  readonly tasks: TaskServiceRestClient;
  readonly trust: TrustServiceRestClient;
  readonly update: UpdateServiceRestClient;
  readonly installer: InstallerServiceRestClient;
  readonly storage: StorageServiceRestClient;
  readonly network: NetworkServiceRestClient;
  readonly backup: BackupServiceRestClient;
}

/** Creates REST clients for the gateway at `options.baseUrl`. */
export function createRestClients(options: RestTransportOptions): PiccoloRestClients {
  const t = createRestTransport(options);
  return {
    auth: new AuthServiceRestClient(t),
    system: new SystemServiceRestClient(t),
    operations: new OperationsServiceRestClient(t),
    containers: new ContainerServiceRestClient(t),
    tasks: new TaskServiceRestClient(t),
    trust: new TrustServiceRestClient(t),
    update: new UpdateServiceRestClient(t),
    installer: new InstallerServiceRestClient(t),
    storage: new StorageServiceRestClient(t),
    network: new NetworkServiceRestClient(t),
    backup: new BackupServiceRestClient(t),
  };
}
