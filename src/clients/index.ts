/** piccolod's client SDK: typed gRPC clients, generated REST clients, and the re-attaching watcher. */
export { channelCredentials, createGrpcClients, createPromiseClient, grpcTarget, type GrpcCallOptions, type PiccoloGrpcClients, type PromiseClient } from "./grpc-client.js";
export { createRestTransport, RestError, type RestTransportOptions } from "./rest-transport.js";
export { watchOperation, type OpenWatch, type WatchOptions } from "./watch.js";
export { createRestClients, type PiccoloRestClients } from "./rest-clients.js";
export { createPinnedFetch, fetchPinnedCertificate, normalizeFingerprint, resolveTrust, type TlsTrust } from "./tls.js";
