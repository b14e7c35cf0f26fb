/**
 * How piccoloctl reports failures: gRPC ServiceErrors and REST errors as `<CODE_NAME>: <message>`,
 * an unreachable daemon as which endpoint could not be reached and how to start it, usage
 * errors with exit code 2.
 */
import { status as GrpcStatus } from "@grpc/grpc-js";

/** A mistake in the command line (exit code 2). */
export class UsageError extends Error {
  override readonly name = "UsageError";
}

/**
 * Wraps an error that must not be retried (e.g. the first attach of a watch failed), so the
 * re-attaching watcher gives up at once; the original error is `cause`.
 */
export class FatalStreamError extends Error {
  override readonly name = "FatalStreamError";
  constructor(override readonly cause: unknown) {
    super((cause as Error | undefined)?.message ?? String(cause));
  }
}

/** The name of a gRPC status code: 5 → "NOT_FOUND". */
export function codeName(code: number): string {
  return GrpcStatus[code] ?? `CODE_${code}`;
}

/** A failure as piccoloctl prints it, and the exit code it leads to. */
export interface DescribedError {
  /** Without the "piccoloctl: " prefix; may span lines. */
  readonly text: string;
  readonly exitCode: number;
}

const NETWORK_CODES = /^(ECONNREFUSED|ECONNRESET|ENOENT|ENOTSOCK|EACCES|EPERM|EHOSTUNREACH|ENETUNREACH|ETIMEDOUT|ENOTFOUND|EAI_AGAIN|UND_ERR_\w+)$/;

/**
 * Why a connection could not be made, when `err` is a transport failure rather than an answer
 * from the daemon; undefined otherwise.
 */
export function unreachableReason(err: unknown): string | undefined {
  const e = err as { code?: unknown; details?: unknown; message?: unknown; name?: unknown; cause?: unknown } | undefined;
  if (!e || typeof e !== "object") return undefined;
  if (e.code === GrpcStatus.UNAVAILABLE && typeof e.details === "string") {
    const m = /No connection established\. Last error: (?:\w*Error: )?(.*?)(?:\.? Resolution note:.*)?$/s.exec(e.details);
    if (m) return m[1]!.trim() || "no connection";
    if (/Name resolution failed|getaddrinfo|connect E[A-Z]+/.test(e.details)) return e.details;
    return undefined;
  }
  if (e.name === "TypeError" && typeof e.message === "string" && /fetch failed/.test(e.message)) {
    let c = e.cause as { code?: unknown; message?: unknown; cause?: unknown } | undefined;
    const reasons: string[] = [];
    for (let i = 0; c && i < 4; i++, c = c.cause as typeof c) {
      if (typeof c.code === "string" && NETWORK_CODES.test(c.code)) return typeof c.message === "string" ? c.message : c.code;
      if (typeof c.message === "string") reasons.push(c.message);
    }
    return reasons[0] ?? e.message;
  }
  return undefined;
}

/** Turns anything a command threw into what to print and the exit code. */
export function describeError(err: unknown, endpoint: string): DescribedError {
  if (err instanceof FatalStreamError) return describeError(err.cause, endpoint);
  if (err instanceof UsageError) return { text: err.message, exitCode: 2 };
  const reason = unreachableReason(err);
  if (reason !== undefined && /fingerprint|certificate|self[- ]signed|SSL|TLS/i.test(reason)) {
    return {
      text:
        `UNAVAILABLE: cannot trust piccolod at ${endpoint} (${reason})\n` +
        "  pin its certificate with --tls-fingerprint (shown by `piccoloctl auth fingerprint` on its host) or --tls-ca",
      exitCode: 1,
    };
  }
  if (reason !== undefined) {
    if (/EACCES|EPERM|permission denied/i.test(reason)) {
      return {
        text:
          `PERMISSION_DENIED: cannot connect to piccolod at ${endpoint} (${reason})\n` +
          "  the unix socket is only open to root: run piccoloctl with sudo, or use a TCP endpoint with --endpoint",
        exitCode: 1,
      };
    }
    return {
      text:
        `UNAVAILABLE: cannot reach piccolod at ${endpoint} (${reason})\n` +
        "  is the daemon running? Start it (`npm run demo` for a development daemon, `systemctl start piccolod` on a host),\n" +
        "  or point --endpoint / PICCOLO_ENDPOINT at where it listens",
      exitCode: 1,
    };
  }
  const e = err as { code?: unknown; details?: unknown; message?: unknown; name?: unknown } | undefined;
  if (e && typeof e === "object") {
    if (e.name === "TimeoutError") return { text: `DEADLINE_EXCEEDED: no answer from ${endpoint} in time (--timeout)`, exitCode: 1 };
    if (typeof e.code === "number") {
      // grpc-js ServiceError: `details` is the server's message; RestError: `message` is.
      const msg = typeof e.details === "string" && e.details !== "" ? e.details : String(e.message ?? "");
      const hint =
        e.code === GrpcStatus.UNAUTHENTICATED
          ? "\n  get a token on the daemon's host (`piccoloctl auth token --role reader`) or with `piccoloctl auth login`, and pass it with --token or $PICCOLO_TOKEN"
          : "";
      return { text: `${codeName(e.code)}: ${msg}${hint}`, exitCode: 1 };
    }
  }
  const msg = err instanceof Error ? err.message : String(err);
  return { text: `UNKNOWN: ${msg}`, exitCode: 1 };
}
