/**
 * watchOperation(): follows an operation to its end across dropped connections and daemon
 * restarts, re-attaching with the last sequence seen so no event is lost or repeated. Works over
 * the gRPC or the REST client: it only needs a function that opens a WatchOperation stream.
 */
import { OperationState, type OperationEvent } from "../../gen/piccolo/operations/v1/operations.js";

/** Opens one WatchOperation stream. */
export type OpenWatch = (id: string, afterSequence: number, signal: AbortSignal) => AsyncIterable<OperationEvent>;

/** Options of watchOperation. */
export interface WatchOptions {
  /** Start after this sequence (0 = the whole history). */
  readonly afterSequence?: number;
  /** Stop watching. */
  readonly signal?: AbortSignal;
  /** Give up after this long without getting through, in ms. Default 60 s. */
  readonly reconnectForMs?: number;
  /** Called before each reconnect attempt. */
  readonly onReconnect?: (attempt: number, error: unknown) => void;
  /** Yield the `attached` header of each (re-)attach too. Default false. */
  readonly includeAttached?: boolean;
}

// gRPC UNAVAILABLE (14), CANCELLED by a dying peer (1 without a local abort), INTERNAL stream resets (13),
// and network errors from fetch are worth a retry; everything else is the server's answer.
const RETRYABLE_CODES = new Set([1, 13, 14]);
const ENDED = new Set<OperationState>([
  OperationState.OPERATION_STATE_SUCCEEDED,
  OperationState.OPERATION_STATE_FAILED,
  OperationState.OPERATION_STATE_CANCELLED,
  OperationState.OPERATION_STATE_INTERRUPTED,
]);

function retryable(err: unknown, signal: AbortSignal | undefined): boolean {
  if (signal?.aborted) return false;
  const e = err as { code?: unknown; name?: string; cause?: unknown };
  if (typeof e.code === "number") return RETRYABLE_CODES.has(e.code);
  if (e.name === "TypeError" || e.name === "AbortError") return true; // fetch network failure / reset
  if (typeof e.code === "string") return /^(ECONNREFUSED|ECONNRESET|EPIPE|ENOENT|UND_ERR_)/.test(e.code);
  return false;
}

const sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });

/** Yields each event of operation `id` once, in order, until the one with the outcome. */
export async function* watchOperation(open: OpenWatch, id: string, options: WatchOptions = {}): AsyncGenerator<OperationEvent> {
  let last = options.afterSequence ?? 0;
  let attempt = 0;
  let failingSince: number | undefined;
  const budget = options.reconnectForMs ?? 60_000;
  for (;;) {
    const ac = new AbortController();
    const onAbort = (): void => ac.abort();
    options.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const ev of open(id, last, ac.signal)) {
        attempt = 0;
        failingSince = undefined;
        if (ev.attached) {
          if (options.includeAttached) yield ev;
          // Attached after the end of an operation that has already ended: nothing more will come.
          if (ENDED.has(ev.attached.state) && ev.sequence >= ev.attached.lastSequence) return;
          continue;
        }
        if (ev.sequence <= last) continue; // never repeat
        last = ev.sequence;
        yield ev;
        if (ev.outcome) return;
      }
      if (options.signal?.aborted) return;
      // The stream ended without an outcome (the daemon went away cleanly): re-attach.
      throw Object.assign(new Error("the stream ended before the operation did"), { code: 14 });
    } catch (err) {
      if (!retryable(err, options.signal)) throw err;
      failingSince ??= Date.now();
      if (Date.now() - failingSince > budget) throw err;
      attempt++;
      options.onReconnect?.(attempt, err);
      await sleep(Math.min(2000, 100 * 2 ** Math.min(attempt, 5)), options.signal);
      if (options.signal?.aborted) return;
    } finally {
      options.signal?.removeEventListener("abort", onAbort);
      ac.abort();
    }
  }
}
