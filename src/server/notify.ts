/**
 * systemd readiness and watchdog notifications. Node cannot send on a unix datagram socket, so
 * this runs `systemd-notify` (the unit sets NotifyAccess=all; systemd-notify waits for systemd
 * to process each message, so there is no race with its exit).
 */
import { execFile } from "node:child_process";
import type { Logger } from "pino";

/** Sends sd_notify messages when NOTIFY_SOCKET is set; does nothing otherwise. */
export interface Notifier {
  /** Whether a service manager is listening. */
  readonly enabled: boolean;
  /** Sends READY=1 with a status line. */
  ready(status: string): Promise<void>;
  /** Sends STOPPING=1. */
  stopping(): Promise<void>;
  /** Starts pinging the watchdog at half of WATCHDOG_USEC, if set. */
  startWatchdog(): void;
  stopWatchdog(): void;
}

/** Creates the notifier from the process environment. */
export function createNotifier(log: Logger, env: NodeJS.ProcessEnv = process.env): Notifier {
  const socket = env["NOTIFY_SOCKET"];
  let timer: NodeJS.Timeout | undefined;
  const send = (...assignments: string[]): Promise<void> =>
    new Promise((resolve) => {
      if (!socket) return resolve();
      execFile("systemd-notify", assignments, { env: { ...process.env, NOTIFY_SOCKET: socket }, timeout: 10_000 }, (err, _o, stderr) => {
        if (err) log.warn({ err: err.message, stderr: stderr.trim() }, "systemd-notify failed");
        resolve();
      });
    });
  return {
    enabled: !!socket,
    ready: (status) => send("READY=1", `STATUS=${status}`, `MAINPID=${process.pid}`),
    stopping: () => send("STOPPING=1"),
    startWatchdog() {
      const usec = Number(env["WATCHDOG_USEC"] ?? 0);
      const pid = Number(env["WATCHDOG_PID"] ?? process.pid);
      if (!socket || !usec || pid !== process.pid) return;
      timer = setInterval(() => void send("WATCHDOG=1"), Math.max(500, usec / 2000));
      timer.unref();
    },
    stopWatchdog() {
      if (timer) clearInterval(timer);
    },
  };
}
