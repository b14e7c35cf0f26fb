/**
 * Follows one operation's event stream to its end for piccoloctl: renders it (progress view or
 * NDJSON), re-attaches with WatchOperation after a dropped connection or a daemon restart, and
 * turns the outcome into an exit code.
 */
import type { Any } from "../../../gen/google/protobuf/any.js";
import type { Status } from "../../../gen/google/rpc/status.js";
import { OperationState, type OperationEvent } from "../../../gen/piccolo/operations/v1/operations.js";
import { watchOperation, type OpenWatch } from "../watch.js";
import type { PiccoloApi } from "./api.js";
import type { CommandContext } from "./context.js";
import { codeName, FatalStreamError, unreachableReason } from "./errors.js";
import { eventJsonLine, formatResult, formatStatus } from "./format.js";
import { ProgressView, stateName, type TextSink } from "./progress.js";

/** Options of followOperation. */
export interface FollowOptions {
  readonly api: PiccoloApi;
  readonly endpoint: string;
  readonly stdout: TextSink;
  readonly stderr: TextSink;
  readonly output: "text" | "json";
  /** The operation to watch; omit when `first` starts it and names it in its `attached` header. */
  readonly id?: string;
  /** Opens the first stream instead of WatchOperation (e.g. RunDiagnostics, which starts the operation). */
  readonly first?: (signal: AbortSignal) => AsyncIterable<OperationEvent>;
  /** Start after this sequence. Default 0 (the whole history). */
  readonly afterSequence?: number;
  /** Stop after the first `attached` header, printing the operation id. */
  readonly detach?: boolean;
  /** Stops following (Ctrl-C); the operation keeps running. */
  readonly signal?: AbortSignal;
  /** How long to keep trying to re-attach, in ms. Default 60 s. */
  readonly reconnectForMs?: number;
}

const TERMINAL = new Set([
  OperationState.OPERATION_STATE_SUCCEEDED,
  OperationState.OPERATION_STATE_FAILED,
  OperationState.OPERATION_STATE_CANCELLED,
  OperationState.OPERATION_STATE_INTERRUPTED,
]);

/** The end of an operation as followOperation saw it. */
interface Ending {
  readonly id: string;
  readonly state: OperationState;
  readonly result: Any | undefined;
  readonly error: Status | undefined;
}

const brief = (err: unknown): string => {
  const reason = unreachableReason(err);
  if (reason) return reason;
  const e = err as { code?: unknown; details?: unknown; message?: unknown };
  const msg = typeof e.details === "string" && e.details ? e.details : String(e.message ?? err);
  return typeof e.code === "number" ? `${codeName(e.code)}: ${msg}` : msg;
};

/**
 * Follows the operation until its outcome and returns the exit code: 0 when it SUCCEEDED, 1 when
 * it FAILED, was CANCELLED or INTERRUPTED (the error goes to stderr), 130 when stopped by `signal`.
 * Errors of the first attach (unknown id, unreachable daemon) are thrown as FatalStreamError.
 */
export async function followOperation(o: FollowOptions): Promise<number> {
  const json = o.output === "json";
  const view = new ProgressView(o.stdout);
  let opId = o.id ?? "";
  let attachedOnce = false;
  let firstOpen = true;

  async function* guard(src: () => AsyncIterable<OperationEvent>): AsyncGenerator<OperationEvent> {
    try {
      for await (const ev of src()) {
        if (ev.attached) {
          attachedOnce = true;
          opId ||= ev.operationId || ev.attached.id;
        }
        yield ev;
      }
    } catch (err) {
      // Before the first attach there is nothing to re-attach to: report the error at once.
      throw attachedOnce ? err : new FatalStreamError(err);
    }
  }
  const open: OpenWatch = (_id, afterSequence, signal) => {
    const useFirst = firstOpen && o.first !== undefined;
    firstOpen = false;
    if (useFirst) return guard(() => o.first!(signal));
    if (!opId) throw new FatalStreamError(new Error("the stream ended before the daemon named the operation"));
    return guard(() => o.api.watchOperation(opId, afterSequence, signal));
  };

  const notice = (text: string): void => {
    if (json) o.stderr.write(`${text}\n`);
    else view.notice(text, o.stderr);
  };

  let last = o.afterSequence ?? 0;
  let shownAttached = false;
  let reconnecting = false;
  let ending: Ending | undefined;
  try {
    for await (const ev of watchOperation(open, opId, {
      afterSequence: o.afterSequence ?? 0,
      signal: o.signal,
      includeAttached: true,
      reconnectForMs: o.reconnectForMs,
      onReconnect: (attempt, err) => {
        reconnecting = true;
        // The first loss and then every fifth attempt: enough to see it is still trying.
        if (attempt === 1) notice(`piccoloctl: lost the stream of ${opId || "the operation"} (${brief(err)}); re-attaching`);
        else if (attempt % 5 === 0) notice(`piccoloctl: still re-attaching to ${opId} (attempt ${attempt}: ${brief(err)})`);
      },
    })) {
      if (ev.attached) {
        if (reconnecting) notice(`piccoloctl: re-attached to ${opId} after sequence ${last}`);
        reconnecting = false;
        if (shownAttached) continue;
        shownAttached = true;
        if (o.detach) {
          o.stdout.write(json ? eventJsonLine(ev) : `${opId}\n`);
          return 0;
        }
        if (json) o.stdout.write(eventJsonLine(ev));
        else view.event(ev);
        const a = ev.attached;
        // Already over and nothing left to replay after `last`: the header is all there is.
        if (TERMINAL.has(a.state) && a.lastSequence <= last) {
          ending = { id: a.id, state: a.state, result: a.result, error: a.error };
          break;
        }
        continue;
      }
      last = ev.sequence;
      if (json) o.stdout.write(eventJsonLine(ev));
      else view.event(ev);
      if (ev.outcome) {
        ending = { id: opId || ev.operationId, state: ev.outcome.state, result: ev.outcome.result, error: ev.outcome.error };
        break;
      }
    }
  } catch (err) {
    view.settle();
    if (!o.signal?.aborted) throw err;
  }
  view.settle();

  if (!ending) {
    // Stopped by the signal: the operation goes on without us.
    const id = opId || "the operation";
    o.stderr.write(
      `piccoloctl: stopped following ${id}; it keeps running` +
        (opId ? ` (follow it again with: piccoloctl ops watch ${opId}; stop it with: piccoloctl ops cancel ${opId})` : "") +
        "\n",
    );
    return 130;
  }
  const ok = ending.state === OperationState.OPERATION_STATE_SUCCEEDED;
  if (!json) {
    o.stdout.write(`${ending.id} ${stateName(ending.state)}\n`);
    if (ok && ending.result) o.stdout.write(formatResult(ending.result));
  }
  if (ok) return 0;
  o.stderr.write(
    `piccoloctl: ${ending.error ? formatStatus(ending.error) : `operation ${ending.id} ended ${stateName(ending.state)}`}\n`,
  );
  return 1;
}

/** The options every command that follows an operation takes from its context. */
export function followOptionsFrom(c: CommandContext): Pick<FollowOptions, "api" | "endpoint" | "stdout" | "stderr" | "output" | "signal"> {
  return { api: c.api, endpoint: c.global.endpoint, stdout: c.stdout, stderr: c.stderr, output: c.global.output, signal: c.signal };
}
