#!/usr/bin/env node
/**
 * piccolod's entry point: load and validate the configuration, start the daemon, tell systemd
 * it is ready once the start-up checks passed, and stop gracefully on SIGTERM or SIGINT.
 */
// First: its V8 settings must be in place before the rest of the daemon is loaded.
import { endStartupTuning } from "./startup-tuning.js";
import { ConfigError, loadConfig } from "./config.js";
import { createLogger, startDaemon, StartupCheckError } from "./daemon.js";
import { createNotifier } from "./notify.js";

async function main(): Promise<number> {
  const t0 = performance.now();
  let config;
  try {
    config = loadConfig({ defaultFile: "/etc/piccolod/config.json" });
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`piccolod: ${e.message}\n`);
      return 2;
    }
    throw e;
  }
  const log = createLogger(config);
  const notifier = createNotifier(log);
  // Handlers go in before anything starts: a SIGTERM that arrives while starting up (or right
  // after READY) must still stop gracefully, not kill the process with running operations.
  const stopRequested = new Promise<string>((resolve) => {
    process.once("SIGTERM", () => resolve("SIGTERM"));
    process.once("SIGINT", () => resolve("SIGINT"));
  });
  let daemon;
  try {
    daemon = await startDaemon(config, log);
  } catch (e) {
    if (e instanceof StartupCheckError) {
      log.fatal({ err: e.message }, "not starting");
      process.stderr.write(`piccolod: ${e.message}\n`);
      return 1;
    }
    throw e;
  }
  const { endpoints } = daemon;
  await notifier.ready(`serving on ${[endpoints.socket, endpoints.grpc, endpoints.rest].filter(Boolean).join(", ")}`);
  notifier.startWatchdog();
  endStartupTuning();
  log.info({ ...endpoints, startupMs: Math.round(performance.now() - t0) }, "piccolod ready");

  log.info({ signal: await stopRequested }, "shutdown requested");
  notifier.stopWatchdog();
  await notifier.stopping();
  await daemon.stop();
  log.info("piccolod stopped");
  return 0;
}

main().then(
  (code) => {
    process.exitCode = code;
    // Let pino flush, then exit even if a stray handle is left.
    setTimeout(() => process.exit(code), 50).unref();
  },
  (err: unknown) => {
    process.stderr.write(`piccolod: fatal: ${(err as Error).stack ?? String(err)}\n`);
    process.exit(1);
  },
);
