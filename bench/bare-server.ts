/**
 * The baseline for bench/rpc.ts: a bare @grpc/grpc-js server, in its own process, serving the
 * same SystemService definition as piccolod (gen/piccolo/system/v1/system.ts) with a GetVersion
 * handler that returns a precomputed GetVersionResponse. No interceptors, no logging, no audit,
 * no health or reflection services: what any grpc-js server costs per call.
 *
 * Usage: node dist/bench/bare-server.js <endpoints-file> <GetVersionResponse as base64, or "">
 * Binds 127.0.0.1:0 and writes {"grpc": "127.0.0.1:<port>", "pid": …} to <endpoints-file>
 * (atomically, as piccolod writes endpoints.json). Exits on SIGTERM/SIGINT or when its stdin
 * closes (the parent went away).
 */
import { renameSync, writeFileSync } from "node:fs";
import * as grpc from "@grpc/grpc-js";
import { GetVersionResponse, SystemServiceService, type SystemServiceServer } from "../gen/piccolo/system/v1/system.js";

const [endpointsFile, responseBase64 = ""] = process.argv.slice(2);
if (!endpointsFile) {
  process.stderr.write("usage: bare-server.js <endpoints-file> <response-base64>\n");
  process.exit(2);
}

// Decoded once; grpc-js encodes it per call through responseSerialize, exactly as piccolod
// encodes its cached response per call.
const response: GetVersionResponse = GetVersionResponse.decode(Buffer.from(responseBase64, "base64"));

const unimplemented = { code: grpc.status.UNIMPLEMENTED, details: "not served by the bare benchmark server" };
const impl: SystemServiceServer = {
  getVersion: (_call, callback) => callback(null, response),
  getHealth: (_call, callback) => callback(unimplemented),
  runDiagnostics: (call) => call.emit("error", unimplemented),
};

const server = new grpc.Server();
server.addService(SystemServiceService, impl);
server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) {
    process.stderr.write(`bare-server: cannot bind: ${err.message}\n`);
    process.exit(1);
  }
  const tmp = `${endpointsFile}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify({ grpc: `127.0.0.1:${port}`, pid: process.pid }) + "\n");
  renameSync(tmp, endpointsFile);
});

const stop = (): void => {
  server.forceShutdown();
  process.exit(0);
};
process.once("SIGTERM", stop);
process.once("SIGINT", stop);
// The parent holds our stdin open; when it goes away (even by SIGKILL), so do we.
process.stdin.on("end", stop);
process.stdin.on("error", stop);
process.stdin.resume();
