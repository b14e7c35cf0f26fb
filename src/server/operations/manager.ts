/**
 * The operation manager: starts long work as Operations, journals every event before anyone sees
 * it, coalesces progress, lets any number of watchers follow from any sequence number, honours
 * cancel, holds the one exclusive lock for work that changes disks or boot state, and marks work
 * that a dead daemon left running as INTERRUPTED at the next start.
 */
import { randomBytes } from "node:crypto";
import type { Logger } from "pino";
import type { Any } from "../../../gen/google/protobuf/any.js";
import type { Status } from "../../../gen/google/rpc/status.js";
import {
  Operation,
  OperationState,
  type OperationEvent,
  type Progress,
} from "../../../gen/piccolo/operations/v1/operations.js";
import { notFound, PiccoloError, toRpcStatus } from "../errors.js";
import type { JournalStore, JournalWriter } from "./journal.js";
import { isoTime } from "../iso-time.js";

/** What a worker gets. */
export interface WorkerContext {
  /** The operation's id. */
  readonly id: string;
  /** Aborted on cancel or daemon shutdown; pass it to every child process, request and write. */
  readonly signal: AbortSignal;
  /** The operation's logger. */
  readonly log: Logger;
  /**
   * Reports progress. Never blocks: reports are coalesced (at most one journaled event per
   * progress interval within a phase; a new phase is journaled at once). Rate and ETA are filled
   * in from bytes_done when the worker leaves them out.
   */
  progress(p: Partial<Progress>): void;
}

/** A kind of operation and its worker. */
export interface OperationKind<Req> {
  /** "<area>.<verb>", e.g. "system.diagnostics". */
  readonly kind: string;
  /** Full name of the request message (packed into Operation.request). */
  readonly requestType: string;
  /** Encodes the request for the journal. */
  encodeRequest(request: Req): Uint8Array;
  /** Takes the daemon's exclusive lock (disk and boot-state changes). */
  readonly exclusive: boolean;
  /** Refuses a second operation of this kind while one runs. */
  readonly single: boolean;
  /** Whether CancelOperation is accepted. */
  readonly cancellable: boolean;
  /** Does the work; returns the result (packed Any). Throw PiccoloError to fail with a reason. */
  run(request: Req, ctx: WorkerContext): Promise<Any | undefined>;
  /**
   * Cleans up after an operation of this kind that was running when the daemon died, and says
   * what was left behind; called once at the next start.
   */
  recover?(operation: Operation, log: Logger): Promise<string>;
}

/** Filter and page of ListOperations. */
export interface ListFilter {
  readonly kind?: string;
  readonly state?: OperationState;
  readonly pageSize: number;
  readonly pageToken?: string;
}

/** The operation manager. */
export interface OperationManager {
  /** Registers a kind; call before init(). */
  register<Req>(kind: OperationKind<Req>): void;
  /** Loads the journals, marking operations that were running as INTERRUPTED. */
  init(): Promise<void>;
  /** Starts an operation and returns it as journaled (RUNNING). */
  start<Req>(kind: string, request: Req, actor: string): Promise<Operation>;
  /** An operation as it is now; NOT_FOUND when unknown. */
  get(id: string): Operation;
  /** A page of operations, newest first. */
  list(filter: ListFilter): { operations: Operation[]; nextPageToken: string };
  /** The attached header, then every event after `afterSequence`, live, until the outcome. */
  watch(id: string, afterSequence: number, signal: AbortSignal): AsyncGenerator<OperationEvent>;
  /** Asks a running operation to stop. */
  cancel(id: string, actor: string): Operation;
  /** Stops accepting work, aborts running operations and journals them INTERRUPTED after `graceMs`. */
  shutdown(graceMs: number): Promise<void>;
  /** Ids of operations still running. */
  running(): string[];
}

/** Options of createOperationManager. */
export interface OperationManagerOptions {
  readonly store: JournalStore;
  readonly log: Logger;
  /** Finished operations kept. */
  readonly retention: number;
  /** Smallest interval between journaled progress events in one phase. */
  readonly progressIntervalMs: number;
}

class AbortReason extends Error {
  constructor(
    readonly why: "cancel" | "shutdown",
    message: string,
  ) {
    super(message);
    this.name = "AbortError";
  }
}

interface Entry {
  op: Operation;
  events: OperationEvent[];
  done: boolean;
  listeners: Set<() => void>;
  writer?: JournalWriter;
  abort?: AbortController;
  finished?: Promise<void>;
}

const newId = (now: Date): string =>
  `op-${isoTime(now).replace(/[-:]/g, "").replace(/\.\d+Z$/, "Z")}-${randomBytes(3).toString("hex")}`;

const TERMINAL = new Set([
  OperationState.OPERATION_STATE_SUCCEEDED,
  OperationState.OPERATION_STATE_FAILED,
  OperationState.OPERATION_STATE_CANCELLED,
  OperationState.OPERATION_STATE_INTERRUPTED,
]);

const ABORTED = 10; // google.rpc.Code.ABORTED

/** The last event of an operation the daemon ends itself (found running at start, or stuck at stop). */
const interruptedEvent = (op: Operation, message: string): OperationEvent => ({
  operationId: op.id,
  sequence: op.lastSequence + 1,
  time: new Date(),
  attached: undefined,
  progress: undefined,
  outcome: { state: OperationState.OPERATION_STATE_INTERRUPTED, result: undefined, error: { code: ABORTED, message, details: [] } },
});

/** Creates the operation manager over a journal store. */
export function createOperationManager(options: OperationManagerOptions): OperationManager {
  const { store, log } = options;
  const kinds = new Map<string, OperationKind<unknown>>();
  const entries = new Map<string, Entry>();
  let stopping = false;

  const notify = (e: Entry): void => {
    const ls = [...e.listeners];
    e.listeners.clear();
    for (const l of ls) l();
  };

  const applyEvent = (e: Entry, ev: OperationEvent): void => {
    e.events.push(ev);
    e.op.lastSequence = ev.sequence;
    if (ev.progress) {
      e.op.progress = ev.progress;
      if (e.op.state === OperationState.OPERATION_STATE_PENDING) {
        e.op.state = OperationState.OPERATION_STATE_RUNNING;
        e.op.startTime = ev.time;
      }
    }
    if (ev.outcome) {
      e.op.state = ev.outcome.state;
      e.op.endTime = ev.time;
      e.op.result = ev.outcome.result;
      e.op.error = ev.outcome.error;
      e.done = true;
    }
  };

  const prune = async (): Promise<void> => {
    const finished = [...entries.values()].filter((e) => e.done).sort(byNewest);
    for (const e of finished.slice(options.retention)) {
      entries.delete(e.op.id);
      await store.remove(e.op.id);
    }
  };

  const byNewest = (a: Entry, b: Entry): number =>
    (b.op.createTime?.getTime() ?? 0) - (a.op.createTime?.getTime() ?? 0) || b.op.id.localeCompare(a.op.id);

  const exclusiveRunning = (): Entry | undefined => [...entries.values()].find((e) => !e.done && e.op.exclusive);

  const runWorker = async (e: Entry, kind: OperationKind<unknown>, request: unknown): Promise<void> => {
    const writer = e.writer!;
    const abort = e.abort!;
    const opLog = log.child({ op: e.op.id, kind: kind.kind });
    let seq = 0;
    let journalError: unknown;
    // Events are journaled in sequence order (the writer is a chain); each is applied and sent
    // only once its append has been fsync'd.
    const emit = (payload: Partial<OperationEvent>): Promise<void> => {
      if (e.done) return Promise.resolve();
      const ev: OperationEvent = {
        operationId: e.op.id,
        sequence: ++seq,
        time: new Date(),
        attached: undefined,
        progress: undefined,
        outcome: undefined,
        ...payload,
      };
      return writer.append(ev).then(
        () => {
          applyEvent(e, ev);
          notify(e);
        },
        (err: unknown) => {
          journalError ??= err;
          opLog.error({ err: (err as Error).message }, "journal append failed; stopping the operation");
          abort.abort(new PiccoloError("internal", `journal write failed: ${(err as Error).message}`));
        },
      );
    };

    // Progress coalescing.
    let pending: Progress | undefined;
    let last: Progress | undefined;
    let lastFlush = 0;
    let timer: NodeJS.Timeout | undefined;
    const rate = { t: 0, bytes: 0, phase: "", bps: 0 };
    const flush = (): void => {
      if (timer) clearTimeout(timer);
      timer = undefined;
      if (!pending) return;
      const p = pending;
      pending = undefined;
      last = p;
      lastFlush = performance.now();
      void emit({ progress: p });
    };
    const progress = (p: Partial<Progress>): void => {
      if (e.done) return;
      const now = performance.now();
      const phase = p.phase ?? pending?.phase ?? last?.phase ?? "";
      const merged: Progress = {
        phase,
        phaseIndex: p.phaseIndex ?? (phase === (pending ?? last)?.phase ? ((pending ?? last)?.phaseIndex ?? 0) : 0),
        phaseCount: p.phaseCount ?? (pending ?? last)?.phaseCount ?? 0,
        percent: Math.max(0, Math.min(100, p.percent ?? (pending ?? last)?.percent ?? 0)),
        bytesDone: p.bytesDone ?? 0,
        bytesTotal: p.bytesTotal ?? 0,
        bytesPerSecond: p.bytesPerSecond ?? 0,
        eta: p.eta,
        message: p.message ?? "",
        items: p.items ?? [],
      };
      // The rate is measured from the phase's first report: smoothed over windows of 0.25 s or
      // more, and for a phase that ends before the first window closes, its average at the end.
      if (rate.phase !== phase || merged.bytesDone < rate.bytes) Object.assign(rate, { t: now, bytes: merged.bytesDone, phase, bps: 0 });
      if (p.bytesPerSecond === undefined && merged.bytesDone > 0) {
        const dt = (now - rate.t) / 1000;
        const ended = merged.bytesTotal > 0 && merged.bytesDone >= merged.bytesTotal;
        if (dt >= 0.25 || (ended && rate.bps === 0 && dt >= 0.005 && merged.bytesDone > rate.bytes)) {
          const inst = (merged.bytesDone - rate.bytes) / dt;
          rate.bps = rate.bps === 0 ? inst : 0.7 * rate.bps + 0.3 * inst;
          rate.t = now;
          rate.bytes = merged.bytesDone;
        }
        merged.bytesPerSecond = rate.bps;
      }
      if (merged.eta === undefined && merged.bytesTotal > merged.bytesDone && merged.bytesPerSecond > 0) {
        const s = (merged.bytesTotal - merged.bytesDone) / merged.bytesPerSecond;
        merged.eta = { seconds: Math.floor(s), nanos: Math.round((s % 1) * 1e9) };
      }
      const phaseChanged = (pending ?? last)?.phase !== phase;
      if (phaseChanged && pending) flush();
      pending = merged;
      if (phaseChanged || now - lastFlush >= options.progressIntervalMs) flush();
      else timer ??= setTimeout(flush, options.progressIntervalMs - (now - lastFlush));
    };

    await emit({
      progress: {
        phase: "start",
        phaseIndex: 0,
        phaseCount: 0,
        percent: 0,
        bytesDone: 0,
        bytesTotal: 0,
        bytesPerSecond: 0,
        eta: undefined,
        message: `${kind.kind} started`,
        items: [],
      },
    });
    let outcome: { state: OperationState; result?: Any; error?: Status };
    try {
      if (abort.signal.aborted) throw abort.signal.reason;
      const result = await kind.run(request, { id: e.op.id, signal: abort.signal, log: opLog, progress });
      if (journalError) throw journalError;
      flush();
      outcome = { state: OperationState.OPERATION_STATE_SUCCEEDED, result };
    } catch (err) {
      flush();
      const reason: unknown = abort.signal.aborted ? abort.signal.reason : undefined;
      if (reason instanceof AbortReason && reason.why === "cancel") {
        outcome = {
          state: OperationState.OPERATION_STATE_CANCELLED,
          error: { code: 1, message: cleanupMessage(reason.message, err), details: [] },
        };
      } else if (reason instanceof AbortReason && reason.why === "shutdown") {
        outcome = {
          state: OperationState.OPERATION_STATE_INTERRUPTED,
          error: { code: ABORTED, message: cleanupMessage(reason.message, err), details: [] },
        };
      } else {
        outcome = { state: OperationState.OPERATION_STATE_FAILED, error: toRpcStatus(journalError ?? err).status };
        opLog.warn({ err: outcome.error?.message }, "operation failed");
      }
    }
    if (timer) clearTimeout(timer);
    if (!e.done) {
      await emit({ outcome: { state: outcome.state, result: outcome.result, error: outcome.error } });
      if (!e.done) {
        // The journal refused the outcome; still end the operation in memory so watchers finish.
        applyEvent(e, { operationId: e.op.id, sequence: ++seq, time: new Date(), outcome: { ...outcome, result: outcome.result, error: outcome.error } } as OperationEvent);
        notify(e);
      }
    }
    opLog.info({ state: OperationState[e.op.state] }, "operation ended");
    await writer.close();
    e.writer = undefined;
    await prune();
  };

  const cleanupMessage = (reason: string, err: unknown): string => {
    const m = err instanceof Error && !(err instanceof AbortReason) && err.name !== "AbortError" ? err.message : "";
    return m && m !== reason ? `${reason}; ${m}` : reason;
  };

  return {
    register(kind) {
      if (kinds.has(kind.kind)) throw new Error(`operation kind ${kind.kind} registered twice`);
      kinds.set(kind.kind, kind as OperationKind<unknown>);
    },

    async init() {
      const { journals, unreadable } = await store.readAll();
      for (const u of unreadable) log.error(u, "unreadable operation journal left in place");
      for (const j of journals) {
        const e: Entry = { op: { ...j.operation }, events: [], done: false, listeners: new Set() };
        for (const ev of j.events) applyEvent(e, ev);
        entries.set(e.op.id, e);
        if (e.done) continue;
        const kind = kinds.get(e.op.kind);
        let leftBehind = "";
        try {
          leftBehind = kind?.recover ? await kind.recover(Operation.fromPartial(e.op), log.child({ op: e.op.id })) : "";
        } catch (err) {
          leftBehind = `clean-up after the interruption failed: ${(err as Error).message}`;
        }
        const p = e.op.progress;
        const where = p ? ` during phase "${p.phase}" at ${p.percent.toFixed(0)}%` : "";
        const message = `interrupted: piccolod stopped while this operation was running${where}${leftBehind ? `; ${leftBehind}` : ""}`;
        const writer = await store.reopen(e.op.id);
        const ev = interruptedEvent(e.op, message);
        await writer.append(ev);
        await writer.close();
        applyEvent(e, ev);
        log.warn({ op: e.op.id, kind: e.op.kind }, message);
      }
      await prune();
    },

    async start(kindName, request, actor) {
      const kind = kinds.get(kindName);
      if (!kind) throw new Error(`operation kind ${kindName} is not registered`);
      if (stopping) throw new PiccoloError("unavailable", "piccolod is shutting down; try again when it is back");
      if (kind.exclusive) {
        const other = exclusiveRunning();
        if (other) {
          throw new PiccoloError(
            "failed_precondition",
            `operation ${other.op.id} (${other.op.kind}) holds the exclusive lock for disk and boot changes; wait for it to end or cancel it`,
            { reason: "OPERATION_RUNNING", metadata: { operation_id: other.op.id } },
          );
        }
      }
      if (kind.single) {
        const other = [...entries.values()].find((e) => !e.done && e.op.kind === kindName);
        if (other) {
          throw new PiccoloError(
            "failed_precondition",
            `a ${kindName} operation (${other.op.id}) is already running; watch it instead`,
            { reason: "OPERATION_RUNNING", metadata: { operation_id: other.op.id } },
          );
        }
      }
      // Create times are strictly increasing (a millisecond later than the newest when two starts
      // fall in the same millisecond), so "newest first" and page tokens are a total order.
      const newest = Math.max(0, ...[...entries.values()].map((x) => x.op.createTime?.getTime() ?? 0));
      const now = new Date(Math.max(Date.now(), newest + 1));
      const op: Operation = {
        id: newId(now),
        kind: kindName,
        state: OperationState.OPERATION_STATE_PENDING,
        createTime: now,
        startTime: undefined,
        endTime: undefined,
        actor,
        request: { typeUrl: `type.googleapis.com/${kind.requestType}`, value: kind.encodeRequest(request) },
        lastSequence: 0,
        progress: undefined,
        cancellable: kind.cancellable,
        exclusive: kind.exclusive,
        error: undefined,
        result: undefined,
      };
      const e: Entry = { op, events: [], done: false, listeners: new Set(), abort: new AbortController() };
      // Reserve the lock before the first await so two concurrent starts cannot both pass.
      entries.set(op.id, e);
      try {
        e.writer = await store.create(Operation.fromPartial(op));
      } catch (err) {
        entries.delete(op.id);
        throw err;
      }
      e.finished = runWorker(e, kind, request).catch((err: unknown) => {
        log.error({ op: op.id, err: (err as Error).message }, "operation worker crashed");
      });
      return Operation.fromPartial(op);
    },

    get(id) {
      const e = entries.get(id);
      if (!e) throw notFound("operation", id);
      return Operation.fromPartial(e.op);
    },

    list(filter) {
      let cursor: { t: number; id: string } | undefined;
      if (filter.pageToken) {
        try {
          cursor = JSON.parse(Buffer.from(filter.pageToken, "base64url").toString("utf8")) as { t: number; id: string };
          if (typeof cursor.t !== "number" || typeof cursor.id !== "string") throw new Error("bad cursor");
        } catch {
          throw new PiccoloError("invalid_argument", "page_token: not a token from a previous ListOperations page", {
            field: "page_token",
          });
        }
      }
      const all = [...entries.values()]
        .filter((e) => !filter.kind || e.op.kind === filter.kind)
        .filter((e) => !filter.state || e.op.state === filter.state)
        .sort(byNewest)
        .filter((e) => {
          if (!cursor) return true;
          const t = e.op.createTime?.getTime() ?? 0;
          return t < cursor.t || (t === cursor.t && e.op.id.localeCompare(cursor.id) < 0);
        });
      const page = all.slice(0, filter.pageSize);
      const lastOnPage = page[page.length - 1];
      const nextPageToken =
        all.length > page.length && lastOnPage
          ? Buffer.from(JSON.stringify({ t: lastOnPage.op.createTime?.getTime() ?? 0, id: lastOnPage.op.id })).toString("base64url")
          : "";
      return { operations: page.map((e) => Operation.fromPartial(e.op)), nextPageToken };
    },

    async *watch(id, afterSequence, signal) {
      const e = entries.get(id);
      if (!e) throw notFound("operation", id);
      yield {
        operationId: id,
        sequence: afterSequence,
        time: new Date(),
        attached: Operation.fromPartial(e.op),
        progress: undefined,
        outcome: undefined,
      };
      // events[i].sequence === i + 1
      let next = afterSequence;
      for (;;) {
        while (next < e.events.length) {
          yield e.events[next]!;
          next++;
        }
        if (e.done) return;
        if (signal.aborted) return;
        await new Promise<void>((resolve) => {
          const onAbort = (): void => {
            e.listeners.delete(wake);
            resolve();
          };
          const wake = (): void => {
            signal.removeEventListener("abort", onAbort);
            resolve();
          };
          e.listeners.add(wake);
          signal.addEventListener("abort", onAbort, { once: true });
        });
      }
    },

    cancel(id, actor) {
      const e = entries.get(id);
      if (!e) throw notFound("operation", id);
      if (e.done || TERMINAL.has(e.op.state)) {
        throw new PiccoloError(
          "failed_precondition",
          `operation ${id} has already ended (${OperationState[e.op.state]})`,
          { reason: "OPERATION_ENDED", metadata: { operation_id: id } },
        );
      }
      if (!e.op.cancellable) {
        throw new PiccoloError("failed_precondition", `operation ${id} (${e.op.kind}) cannot be cancelled`, {
          reason: "NOT_CANCELLABLE",
          metadata: { operation_id: id },
        });
      }
      if (!e.abort?.signal.aborted) e.abort?.abort(new AbortReason("cancel", `cancelled by ${actor}`));
      return Operation.fromPartial(e.op);
    },

    async shutdown(graceMs) {
      stopping = true;
      const live = [...entries.values()].filter((e) => !e.done);
      for (const e of live) e.abort?.abort(new AbortReason("shutdown", "interrupted: piccolod was stopped while this operation was running"));
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([
        Promise.all(live.map((e) => e.finished)),
        new Promise((r) => {
          timer = setTimeout(r, graceMs);
        }),
      ]);
      clearTimeout(timer);
      for (const e of live.filter((x) => !x.done)) {
        // The worker did not stop in time: journal the interruption ourselves.
        const ev = interruptedEvent(
          e.op,
          `interrupted: piccolod was stopped and the ${e.op.kind} worker did not stop within ${graceMs} ms`,
        );
        try {
          await e.writer?.append(ev);
        } catch (err) {
          log.error({ op: e.op.id, err: (err as Error).message }, "could not journal the interruption");
        }
        applyEvent(e, ev);
        notify(e);
      }
    },

    running() {
      return [...entries.values()].filter((e) => !e.done).map((e) => e.op.id);
    },
  };
}
