/**
 * What each piccoloctl command does once its command line is parsed: call the daemon, print
 * text or proto3 JSON, and return the exit code. program.ts loads this module only when a
 * command runs, so help and usage errors do not pay for gRPC and the descriptor registry.
 */
import {
  ListOperationsResponse,
  Operation,
  OperationState,
  type ListOperationsRequest,
} from "../../../gen/piccolo/operations/v1/operations.js";
import { GetHealthResponse, GetVersionResponse, HealthState } from "../../../gen/piccolo/system/v1/system.js";
import { connectApi, resolveApiOptions } from "./api.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatHealth, formatOperation, formatOperationList, formatVersion, jsonDocument } from "./format.js";
import { stateName } from "./progress.js";

import type { CommandContext } from "./context.js";
export type { CommandContext, GlobalOptions } from "./context.js";

/** Connects to the daemon (re-exported so program.ts gets it with the commands). */
export { connectApi, resolveApiOptions };

/** The `auth …` commands (auth.ts). */
export * from "./auth.js";

/** The `containers …` and `images …` commands (containers.ts). */
export * from "./containers.js";
export * from "./tasks.js";

/** The `update …` commands (update.ts). */
export * from "./update.js";
export * from "./install.js";
/** The `storage …`, `network …` and `backup …` commands. */
export * from "./storage.js";
export * from "./network.js";
export * from "./backup.js";

/** Parses an operation state: "running", "RUNNING" or "OPERATION_STATE_RUNNING"; UsageError otherwise. */
export function parseOperationState(value: string): OperationState {
  const key = value.trim().toUpperCase().replace(/-/g, "_");
  const full = key.startsWith("OPERATION_STATE_") ? key : `OPERATION_STATE_${key}`;
  const n = (OperationState as unknown as Record<string, number | undefined>)[full];
  if (typeof n !== "number" || n === OperationState.OPERATION_STATE_UNSPECIFIED) {
    const names = Object.keys(OperationState)
      .filter((k) => Number.isNaN(Number(k)) && k !== "OPERATION_STATE_UNSPECIFIED")
      .map((k) => k.replace(/^OPERATION_STATE_/, "").toLowerCase());
    throw new UsageError(`--state ${JSON.stringify(value)}: expected one of ${names.join(", ")}`);
  }
  return n;
}

/** `version`: GetVersion. */
export async function versionCommand(c: CommandContext): Promise<number> {
  const v = await c.api.getVersion();
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument("piccolo.system.v1.GetVersionResponse", GetVersionResponse, v));
    return 0;
  }
  // The TLS fingerprint, so it can be pinned from another machine (GetAuthInfo is public).
  const auth = await c.api.auth.getAuthInfo({}).catch(() => undefined);
  c.stdout.write(formatVersion(v, auth ? (auth.tlsEnabled ? auth.tlsFingerprintSha256 : "off (insecurePlaintext)") : undefined));
  return 0;
}

/** `health`: GetHealth; 0 when healthy or degraded, 1 when unhealthy. */
export async function healthCommand(c: CommandContext): Promise<number> {
  const h = await c.api.getHealth();
  c.stdout.write(c.global.output === "json" ? jsonDocument("piccolo.system.v1.GetHealthResponse", GetHealthResponse, h) : formatHealth(h));
  return h.state === HealthState.HEALTH_STATE_HEALTHY || h.state === HealthState.HEALTH_STATE_DEGRADED ? 0 : 1;
}

/** `diagnostics`: starts RunDiagnostics and follows the operation (or only starts it, with --detach). */
export function diagnosticsCommand(c: CommandContext, opts: { readonly writeProbeMib?: number; readonly detach?: boolean }): Promise<number> {
  return followOperation({
    ...followOptionsFrom(c),
    first: (s) => c.api.runDiagnostics({ writeProbeMib: opts.writeProbeMib ?? 0 }, s),
    detach: opts.detach === true,
  });
}

/** `ops list`: pages through ListOperations up to --limit. */
export async function opsListCommand(
  c: CommandContext,
  opts: { readonly kind?: string; readonly state?: string; readonly limit?: number },
): Promise<number> {
  const state = opts.state === undefined ? OperationState.OPERATION_STATE_UNSPECIFIED : parseOperationState(opts.state);
  const limit = opts.limit ?? 50;
  const all: Operation[] = [];
  let pageToken = "";
  do {
    const req: ListOperationsRequest = { kind: opts.kind ?? "", state, pageSize: Math.min(1000, limit - all.length), pageToken };
    const page = await c.api.listOperations(req);
    all.push(...page.operations);
    pageToken = page.nextPageToken;
  } while (pageToken && all.length < limit);
  const res: ListOperationsResponse = { operations: all.slice(0, limit), nextPageToken: pageToken };
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument("piccolo.operations.v1.ListOperationsResponse", ListOperationsResponse, res));
  } else {
    c.stdout.write(formatOperationList(res.operations));
    if (pageToken) c.stderr.write("(more operations exist: raise --limit to see them)\n");
  }
  return 0;
}

/** `ops get ID`: GetOperation. */
export async function opsGetCommand(c: CommandContext, id: string): Promise<number> {
  const op = await c.api.getOperation(id);
  c.stdout.write(c.global.output === "json" ? jsonDocument("piccolo.operations.v1.Operation", Operation, op) : formatOperation(op));
  return 0;
}

/** `ops watch ID`: follows the operation, re-attaching after a dropped connection or a daemon restart. */
export function opsWatchCommand(c: CommandContext, id: string, opts: { readonly after?: number }): Promise<number> {
  return followOperation({
    ...followOptionsFrom(c),
    id,
    afterSequence: opts.after ?? 0,
  });
}

/** `ops cancel ID`: CancelOperation (returns at once; the operation ends CANCELLED after cleaning up). */
export async function opsCancelCommand(c: CommandContext, id: string): Promise<number> {
  const op = await c.api.cancelOperation(id);
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.operations.v1.Operation", Operation, op));
  else c.stdout.write(`cancelling ${op.id} (${op.kind}, ${stateName(op.state)}); follow it with: piccoloctl ops watch ${op.id}\n`);
  return 0;
}
