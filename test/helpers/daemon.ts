/**
 * Starts the real piccolod (the built dist/ tree) as a child process on a temporary state folder,
 * a temporary unix socket and port 0, and hands out clients for it. The TCP listeners are TLS with
 * the daemon's self-signed certificate and want a bearer token: once the daemon is up the helper
 * mints an admin token over the unix socket and reads the certificate there (checking it against
 * the fingerprint in endpoints.json), so grpcTcp(), rest() and fetch() are pinned to that
 * certificate and send that token unless told otherwise.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { Role } from "../../gen/piccolo/common/v1/access.js";
import { channelCredentials, createGrpcClients, type PiccoloGrpcClients } from "../../src/clients/grpc-client.js";
import { createRestClients, type PiccoloRestClients } from "../../src/clients/rest-clients.js";
import { createPinnedFetch, pemFingerprint } from "../../src/clients/tls.js";

/** The repository root. */
export const ROOT = resolve(new URL(".", import.meta.url).pathname, "../..");
/** The built daemon and CLI. */
export const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
export const CLI_JS = join(ROOT, "dist/src/clients/cli/main.js");

/** Where a test daemon listens. */
export interface TestEndpoints {
  readonly socket: string;
  readonly grpc: string;
  /** https://… (http://… with --insecure-plaintext). */
  readonly rest: string;
  /** SHA-256 fingerprint of the TLS certificate; "" without TLS. */
  readonly tlsFingerprint: string;
  readonly pid: number;
}

/** Which token a client sends: a token string, null for none; undefined means the admin token. */
export type TokenChoice = string | null | undefined;

/** Options of the TCP clients. */
export interface ClientOptions {
  /** The token to send; null sends none; default the admin token. */
  readonly token?: string | null;
}

/** A running test daemon. */
export interface TestDaemon {
  readonly dir: string;
  readonly stateDir: string;
  readonly runtimeDir: string;
  endpoints: TestEndpoints;
  proc: ChildProcess;
  /** Everything the daemon printed (JSON log lines and stderr). */
  output(): string;
  grpcUnix(): PiccoloGrpcClients;
  /** gRPC over TCP (TLS pinned to the daemon's certificate), with the admin token unless `token` says otherwise. */
  grpcTcp(options?: ClientOptions): PiccoloGrpcClients;
  /** The REST clients (HTTPS pinned), with the admin token unless `token` says otherwise. */
  rest(options?: { sse?: boolean } & ClientOptions): PiccoloRestClients;
  /** A raw HTTP(S) request to the gateway (`path` like "/api/v1/version"), with the admin token unless `token` says otherwise. */
  fetch(path: string, init?: RequestInit, options?: ClientOptions): Promise<Response>;
  /**
   * Channel credentials for raw grpc-js clients on the TCP listener: TLS pinned to the daemon's
   * certificate, and the admin token (or `token`) on every call.
   */
  channelCredentials(options?: ClientOptions): grpc.ChannelCredentials;
  /** A fetch that trusts the daemon's certificate (and nothing else) and adds no token. */
  readonly pinnedFetch: typeof fetch;
  /** Mints a token over the unix socket (default ttl 1 h). */
  token(role: "reader" | "operator" | "admin", ttlSeconds?: number, subject?: string): Promise<string>;
  /** The admin token the clients send by default. */
  readonly adminToken: string;
  /** The daemon's TLS certificate (PEM); "" without TLS. */
  readonly certificate: string;
  /** Environment for a piccoloctl child process reaching the TCP endpoints: PICCOLO_TOKEN and PICCOLO_TLS_FINGERPRINT. */
  cliEnv(): Record<string, string>;
  /** SIGTERM and wait for exit; resolves to the exit code. */
  stop(): Promise<number | null>;
  /** SIGKILL and wait. */
  kill9(): Promise<void>;
  /** Starts the daemon again on the same state folder (new ports). */
  restart(): Promise<void>;
  /** Stops it and removes the temporary folder. */
  cleanup(): Promise<void>;
}

/** Options of startTestDaemon. */
export interface TestDaemonOptions {
  readonly extraArgs?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  /** Reuse an existing folder (state survives). */
  readonly dir?: string;
}

/** Waits for endpoints.json of a freshly started daemon, or fails with its output. */
async function waitReady(proc: ChildProcess, runtimeDir: string, out: () => string, timeoutMs = 20_000): Promise<TestEndpoints> {
  const started = Date.now();
  for (;;) {
    if (proc.exitCode !== null || proc.signalCode !== null) {
      throw new Error(`piccolod exited (${proc.exitCode ?? proc.signalCode}) before it was ready:\n${out()}`);
    }
    try {
      const ep = JSON.parse(await readFile(join(runtimeDir, "endpoints.json"), "utf8")) as TestEndpoints;
      if (ep.pid === proc.pid) return ep;
    } catch {
      // not yet
    }
    if (Date.now() - started > timeoutMs) throw new Error(`piccolod not ready after ${timeoutMs} ms:\n${out()}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Starts a daemon; call cleanup() in afterAll. */
export async function startTestDaemon(options: TestDaemonOptions = {}): Promise<TestDaemon> {
  if (!existsSync(DAEMON_JS)) throw new Error(`${DAEMON_JS} is missing: run "npm run build" first (npm test does)`);
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), "piccolod-test-")));
  const stateDir = join(dir, "state");
  const runtimeDir = join(dir, "run");
  let log = "";
  const clients: { close(): void }[] = [];
  const spawnIt = (): ChildProcess => {
    const p = spawn(
      process.execPath,
      [
        DAEMON_JS,
        "--state-dir", stateDir,
        "--runtime-dir", runtimeDir,
        "--grpc-listen", "127.0.0.1:0",
        "--rest-listen", "127.0.0.1:0",
        "--log-level", "debug",
        // The host's network configuration, host name and drives are never a test daemon's to change.
        "--network-config-dir", join(dir, "systemd-network"),
        "--network-reload-command", "",
        "--network-reconfigure-command", "",
        "--hostname-file", join(dir, "hostname"),
        "--hostname-command", "",
        "--backup-repository-roots", dir,
        ...(options.extraArgs ?? []),
      ],
      { env: { ...process.env, NOTIFY_SOCKET: "", ...options.env }, stdio: ["ignore", "pipe", "pipe"] },
    );
    p.stdout!.on("data", (d: Buffer) => (log += d.toString()));
    p.stderr!.on("data", (d: Buffer) => (log += d.toString()));
    return p;
  };
  const exited = (p: ChildProcess): Promise<number | null> =>
    p.exitCode !== null || p.signalCode !== null ? Promise.resolve(p.exitCode) : new Promise((r) => p.once("exit", (code) => r(code)));

  /** What the helper learns over the unix socket once the daemon is up: its certificate and an admin token. */
  const credentials = { certificate: "", adminToken: "", pinnedFetch: globalThis.fetch.bind(globalThis) as typeof fetch };
  const mint = async (role: Role, ttlSeconds: number, subject: string): Promise<string> => {
    const c = createGrpcClients({ endpoint: `unix://${d.endpoints.socket}` });
    try {
      return (await c.auth.createToken({ role, ttl: { seconds: ttlSeconds, nanos: 0 }, subject })).token;
    } finally {
      c.close();
    }
  };
  const learn = async (): Promise<void> => {
    if (!d.endpoints.socket) return;
    const c = createGrpcClients({ endpoint: `unix://${d.endpoints.socket}` });
    try {
      // Right after a restart grpc-js may still back off from the old daemon's socket (its
      // subchannels are shared between clients): retry UNAVAILABLE for a while.
      let info;
      for (let attempt = 0; ; attempt++) {
        try {
          info = await c.auth.getAuthInfo({});
          break;
        } catch (e) {
          if ((e as { code?: number }).code !== grpc.status.UNAVAILABLE || attempt >= 100) throw e;
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      credentials.certificate = info.tlsCertificatePem;
      if (info.tlsEnabled && pemFingerprint(info.tlsCertificatePem) !== d.endpoints.tlsFingerprint) {
        throw new Error(`the certificate from GetAuthInfo (${pemFingerprint(info.tlsCertificatePem)}) is not the one in endpoints.json (${d.endpoints.tlsFingerprint})`);
      }
      credentials.pinnedFetch = info.tlsEnabled ? createPinnedFetch({ ca: info.tlsCertificatePem }) : globalThis.fetch.bind(globalThis);
      credentials.adminToken = (await c.auth.createToken({ role: Role.ROLE_ADMIN, ttl: { seconds: 24 * 3600, nanos: 0 }, subject: "test-admin" })).token;
    } finally {
      c.close();
    }
  };
  const tokenOf = (t: TokenChoice): string | undefined => (t === null ? undefined : (t ?? credentials.adminToken));

  const proc = spawnIt();
  const d: TestDaemon = {
    dir,
    stateDir,
    runtimeDir,
    proc,
    endpoints: await waitReady(proc, runtimeDir, () => log),
    output: () => log,
    grpcUnix() {
      const c = createGrpcClients({ endpoint: `unix://${d.endpoints.socket}` });
      clients.push(c);
      return c;
    },
    grpcTcp(o = {}) {
      const c = createGrpcClients({
        endpoint: d.endpoints.grpc,
        token: tokenOf(o.token),
        ...(credentials.certificate ? { ca: credentials.certificate } : { plaintext: true }),
      });
      clients.push(c);
      return c;
    },
    rest(o = {}) {
      return createRestClients({ baseUrl: d.endpoints.rest, sse: o.sse, token: tokenOf(o.token), fetch: credentials.pinnedFetch });
    },
    fetch(path, init = {}, o = {}) {
      const headers = new Headers(init.headers);
      const token = tokenOf(o.token);
      if (token && !headers.has("authorization")) headers.set("authorization", `Bearer ${token}`);
      return credentials.pinnedFetch(`${d.endpoints.rest}${path}`, { ...init, headers });
    },
    channelCredentials(o = {}) {
      const tls = channelCredentials({ endpoint: d.endpoints.grpc, ca: credentials.certificate });
      const token = tokenOf(o.token);
      if (!token) return tls;
      return grpc.credentials.combineChannelCredentials(
        tls,
        grpc.credentials.createFromMetadataGenerator((_params, callback) => {
          const md = new grpc.Metadata();
          md.set("authorization", `Bearer ${token}`);
          callback(null, md);
        }),
      );
    },
    get pinnedFetch() {
      return credentials.pinnedFetch;
    },
    token(role, ttlSeconds = 3600, subject = `test-${role}`) {
      return mint({ reader: Role.ROLE_READER, operator: Role.ROLE_OPERATOR, admin: Role.ROLE_ADMIN }[role], ttlSeconds, subject);
    },
    get adminToken() {
      return credentials.adminToken;
    },
    get certificate() {
      return credentials.certificate;
    },
    cliEnv() {
      return {
        PICCOLO_TOKEN: credentials.adminToken,
        ...(d.endpoints.tlsFingerprint ? { PICCOLO_TLS_FINGERPRINT: d.endpoints.tlsFingerprint } : { PICCOLO_PLAINTEXT: "1" }),
      };
    },
    async stop() {
      d.proc.kill("SIGTERM");
      return exited(d.proc);
    },
    async kill9() {
      d.proc.kill("SIGKILL");
      await exited(d.proc);
    },
    async restart() {
      d.proc = spawnIt();
      d.endpoints = await waitReady(d.proc, runtimeDir, () => log);
      await learn();
    },
    async cleanup() {
      for (const c of clients) c.close();
      if (d.proc.exitCode === null && d.proc.signalCode === null) await d.kill9();
      if (!options.dir) await rm(dir, { recursive: true, force: true });
    },
  };
  try {
    await learn();
  } catch (e) {
    await d.cleanup();
    throw e;
  }
  return d;
}
