/**
 * Starts the real piccolod (the built dist/ tree) as a child process on a temporary state folder,
 * a temporary unix socket and port 0, and hands out clients for it.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createGrpcClients, type PiccoloGrpcClients } from "../../src/clients/grpc-client.js";
import { createRestClients, type PiccoloRestClients } from "../../src/clients/rest-clients.js";

/** The repository root. */
export const ROOT = resolve(new URL(".", import.meta.url).pathname, "../..");
/** The built daemon and CLI. */
export const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
export const CLI_JS = join(ROOT, "dist/src/clients/cli/main.js");

/** Where a test daemon listens. */
export interface TestEndpoints {
  readonly socket: string;
  readonly grpc: string;
  readonly rest: string;
  readonly pid: number;
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
  grpcTcp(): PiccoloGrpcClients;
  rest(options?: { sse?: boolean }): PiccoloRestClients;
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
    grpcTcp() {
      const c = createGrpcClients({ endpoint: d.endpoints.grpc });
      clients.push(c);
      return c;
    },
    rest(o = {}) {
      return createRestClients({ baseUrl: d.endpoints.rest, sse: o.sse });
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
    },
    async cleanup() {
      for (const c of clients) c.close();
      if (d.proc.exitCode === null && d.proc.signalCode === null) await d.kill9();
      if (!options.dir) await rm(dir, { recursive: true, force: true });
    },
  };
  return d;
}
