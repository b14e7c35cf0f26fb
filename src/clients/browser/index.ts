/** The browser entry of the SDK: REST clients, the re-attaching watcher, and JSON helpers. */
export { createRestClients, type PiccoloRestClients } from "../rest-clients.js";
export { createRestTransport, RestError } from "../rest-transport.js";
export { watchOperation } from "../watch.js";
export { binaryToJson, jsonToBinary } from "../../common/proto-registry.js";
