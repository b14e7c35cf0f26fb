/**
 * Operations end to end against the real daemon: many concurrent watchers over every transport
 * see the same journal, re-attaching resumes exactly where a watcher left off, kill -9 and
 * SIGTERM leave the operation INTERRUPTED (with the clean-up said), cancel and the single-run rule
 * behave as documented, and ListOperations filters and pages without repeats or gaps.
 */
import * as grpc from "@grpc/grpc-js";
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { ErrorInfo, PreconditionFailure } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import {
  ListOperationsRequest,
  OperationEvent,
  OperationState,
  type Operation,
} from "../gen/piccolo/operations/v1/operations.js";
import { RunDiagnosticsResult } from "../gen/piccolo/system/v1/system.js";
import { createGrpcClients, type PiccoloGrpcClients } from "../src/clients/grpc-client.js";
import { RestError } from "../src/clients/rest-transport.js";
import { watchOperation, type OpenWatch } from "../src/clients/watch.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

const S = OperationState;
/** Big enough that the write probe runs for a couple of seconds. */
const LONG_PROBE_MIB = 512;
/** For runs that are cancelled, killed or stopped mid-probe: they must never get to the end. */
const HUGE_PROBE_MIB = 2048;

/** Consumes a stream in the background and lets a test wait for an event. */
class Recorder {
  readonly events: OperationEvent[] = [];
  error: unknown;
  readonly done: Promise<void>;
  private waiters: { pred: (e: OperationEvent) => boolean; resolve: (e: OperationEvent) => void; reject: (e: unknown) => void }[] = [];

  constructor(stream: AsyncIterable<OperationEvent>) {
    this.done = (async () => {
      try {
        for await (const ev of stream) {
          this.events.push(ev);
          this.waiters = this.waiters.filter((w) => {
            if (!w.pred(ev)) return true;
            w.resolve(ev);
            return false;
          });
        }
      } catch (e) {
        this.error = e;
      } finally {
        for (const w of this.waiters) w.reject(new Error(`stream ended (${String(this.error ?? "cleanly")}) before the awaited event`));
        this.waiters = [];
      }
    })();
  }

  /** Resolves with the first event (already seen or future) matching `pred`. */
  waitFor(pred: (e: OperationEvent) => boolean): Promise<OperationEvent> {
    const seen = this.events.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => this.waiters.push({ pred, resolve, reject }));
  }

  /** Waits for the end and returns every message; throws the stream's error. */
  async all(): Promise<OperationEvent[]> {
    await this.done;
    if (this.error) throw this.error;
    return this.events;
  }

  /** The journaled events (without the `attached` header). */
  async journaled(): Promise<OperationEvent[]> {
    return (await this.all()).filter((e) => !e.attached);
  }
}

const isWriting = (e: OperationEvent): boolean => e.progress?.phase === "write_throughput" && e.progress.bytesDone > 0;

/** What must be identical wherever an event is seen: sequence, progress and outcome (result decoded). */
const comparable = (e: OperationEvent) => ({
  sequence: e.sequence,
  progress: e.progress ?? null,
  outcome: e.outcome
    ? {
        state: e.outcome.state,
        error: e.outcome.error ?? null,
        result: e.outcome.result ? { typeUrl: e.outcome.result.typeUrl, value: RunDiagnosticsResult.decode(e.outcome.result.value) } : null,
      }
    : null,
});

/** Asserts events are exactly sequences first..last, each once, in order, the last one carrying an outcome. */
function expectContiguous(events: OperationEvent[], first: number, last: number): void {
  expect(events.map((e) => e.sequence)).toEqual(Array.from({ length: last - first + 1 }, (_, i) => first + i));
  expect(events.filter((e) => e.outcome)).toHaveLength(1);
  expect(events[events.length - 1]!.outcome).toBeDefined();
}

/** The operation's journal as written to disk (first line is the operation itself). */
async function readJournal(d: TestDaemon, id: string): Promise<OperationEvent[]> {
  const text = await readFile(join(d.stateDir, "operations", `${id}.journal`), "utf8");
  return text
    .split("\n")
    .filter((l) => l !== "")
    .slice(1)
    .map((l) => OperationEvent.decode(Buffer.from(l, "base64")));
}

const probeFiles = async (d: TestDaemon): Promise<string[]> => {
  try {
    return (await readdir(join(d.stateDir, "tmp"))).filter((n) => n.startsWith("diag-") && n.endsWith(".probe"));
  } catch {
    return [];
  }
};

/** Awaits a gRPC failure and returns it. */
async function grpcError(p: Promise<unknown> | AsyncIterable<unknown>): Promise<grpc.ServiceError> {
  try {
    if (Symbol.asyncIterator in p) {
      for await (const _ of p) {
        // drain until the error
      }
    } else await p;
  } catch (e) {
    return e as grpc.ServiceError;
  }
  throw new Error("expected the call to fail");
}

/** The google.rpc.Status a gRPC error carries in grpc-status-details-bin. */
function richStatus(err: grpc.ServiceError): Status {
  const bin = err.metadata?.get("grpc-status-details-bin")[0];
  expect(Buffer.isBuffer(bin)).toBe(true);
  return Status.decode(bin as Buffer);
}

async function restError(p: Promise<unknown> | AsyncIterable<unknown>): Promise<RestError> {
  const e = await grpcError(p as never);
  expect(e).toBeInstanceOf(RestError);
  return e as unknown as RestError;
}

describe("one daemon: watchers, re-attach, cancel, list", () => {
  let d: TestDaemon;
  let unix: PiccoloGrpcClients;
  let tcp: PiccoloGrpcClients;
  beforeAll(async () => {
    d = await startTestDaemon();
    unix = d.grpcUnix();
    tcp = d.grpcTcp();
  });
  afterAll(async () => {
    await d.cleanup();
  });

  test("100 concurrent watchers (50 gRPC unix/TCP, 25 REST NDJSON, 25 REST SSE) each get every journaled event once, in order, ending SUCCEEDED", async () => {
    const starter = new Recorder(unix.system.runDiagnostics({ writeProbeMib: LONG_PROBE_MIB }));
    const head = await starter.waitFor((e) => e.attached !== undefined);
    const id = head.attached!.id;
    expect(id).toMatch(/^op-/);
    expect(head.attached!.kind).toBe("system.diagnostics");

    // Separate channels so the watchers really are separate connections on both listeners.
    const grpcClients = Array.from({ length: 10 }, (_, i) => (i % 2 === 0 ? d.grpcUnix() : d.grpcTcp()));
    const watchers: { name: string; rec: Recorder }[] = [];
    for (let i = 0; i < 50; i++) {
      const c = grpcClients[i % grpcClients.length]!;
      watchers.push({ name: `grpc-${i % 2 === 0 ? "unix" : "tcp"}-${i}`, rec: new Recorder(c.operations.watchOperation({ id, afterSequence: 0 })) });
    }
    for (let i = 0; i < 25; i++) {
      watchers.push({ name: `rest-ndjson-${i}`, rec: new Recorder(d.rest().operations.watchOperation({ id, afterSequence: 0 })) });
    }
    for (let i = 0; i < 25; i++) {
      const sse = d.rest({ sse: true });
      watchers.push({ name: `rest-sse-${i}`, rec: new Recorder(sse.operations.watchOperation({ id, afterSequence: 0 })) });
    }
    expect(watchers).toHaveLength(100);

    const startedEvents = await starter.journaled();
    const results = await Promise.all(watchers.map(async (w) => ({ name: w.name, all: await w.rec.all() })));
    const op = await tcp.operations.getOperation({ id });
    expect(op.state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const n = op.lastSequence;
    // It ran for a while: the start, seven phases and several write-probe reports.
    expect(n).toBeGreaterThan(10);

    const journal = await readJournal(d, id);
    expect(journal.map((e) => e.sequence)).toEqual(Array.from({ length: n }, (_, i) => i + 1));
    const expected = journal.map(comparable);

    expectContiguous(startedEvents, 1, n);
    expect(startedEvents.map(comparable)).toEqual(expected);
    let live = 0;
    for (const r of results) {
      const [header, ...events] = r.all;
      // Each stream starts with the header, taken while the operation was still going.
      expect({ name: r.name, attached: header!.attached?.id }).toEqual({ name: r.name, attached: id });
      expect(header!.sequence).toBe(0);
      if (header!.attached!.state === S.OPERATION_STATE_RUNNING || header!.attached!.state === S.OPERATION_STATE_PENDING) live++;
      expectContiguous(events, 1, n);
      expect({ name: r.name, events: events.map(comparable) }).toEqual({ name: r.name, events: expected });
      expect(events.every((e) => e.operationId === id)).toBe(true);
      expect(events[n - 1]!.outcome!.state).toBe(S.OPERATION_STATE_SUCCEEDED);
    }
    // The watchers followed the live tail, not just a replay of a finished journal.
    expect(live).toBe(100);

    // What a user sees: progress never goes backwards and the result names the probe's speed.
    const percents = expected.filter((e) => e.progress).map((e) => e.progress!.percent);
    expect(percents).toEqual([...percents].sort((a, b) => a - b));
    expect(percents[percents.length - 1]).toBe(100);
    const writes = journal.filter(isWriting).map((e) => e.progress!.bytesDone);
    expect(writes.length).toBeGreaterThanOrEqual(2);
    expect(writes[writes.length - 1]).toBe(LONG_PROBE_MIB * 1024 * 1024);
    const result = RunDiagnosticsResult.decode(journal[n - 1]!.outcome!.result!.value);
    expect(result.writeBytesPerSecond).toBeGreaterThan(0);
    expect(result.checks.map((c) => c.name)).toEqual(expect.arrayContaining(["write_throughput", "fsync_latency", "free_space"]));
    expect(await probeFiles(d)).toEqual([]);
  });

  test("a watcher that stops after event k and re-attaches with after_sequence=k gets exactly k+1..N", async () => {
    const starter = new Recorder(tcp.system.runDiagnostics({ writeProbeMib: LONG_PROBE_MIB }));
    const id = (await starter.waitFor((e) => e.attached !== undefined)).attached!.id;
    const k = 3;

    // Raw gRPC: read up to k, hang up, re-attach after k.
    const firstPart: OperationEvent[] = [];
    for await (const ev of unix.operations.watchOperation({ id, afterSequence: 0 })) {
      if (ev.attached) continue;
      firstPart.push(ev);
      if (ev.sequence === k) break;
    }
    expect(firstPart.map((e) => e.sequence)).toEqual([1, 2, 3]);
    const grpcRest = new Recorder(unix.operations.watchOperation({ id, afterSequence: k }));
    // Raw REST, same thing.
    const restFirst: OperationEvent[] = [];
    for await (const ev of d.rest().operations.watchOperation({ id, afterSequence: 0 })) {
      if (ev.attached) continue;
      restFirst.push(ev);
      if (ev.sequence === k) break;
    }
    expect(restFirst.map(comparable)).toEqual(firstPart.map(comparable));
    const restRest = new Recorder(d.rest({ sse: true }).operations.watchOperation({ id, afterSequence: k }));

    // The client library's watcher, started after k over both transports.
    const openGrpc: OpenWatch = (opId, after, signal) => tcp.operations.watchOperation({ id: opId, afterSequence: after }, { signal });
    const openRest: OpenWatch = (opId, after, signal) => d.rest().operations.watchOperation({ id: opId, afterSequence: after }, { signal });
    const collect = async (it: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> => {
      const out: OperationEvent[] = [];
      for await (const e of it) out.push(e);
      return out;
    };
    const libGrpc = collect(watchOperation(openGrpc, id, { afterSequence: k }));
    const libRest = collect(watchOperation(openRest, id, { afterSequence: k }));

    // And one whose connection drops after every second event: it must re-attach each time
    // with the last sequence it saw, never repeating or skipping one.
    let reconnects = 0;
    const afters: number[] = [];
    const flaky: OpenWatch = (opId, after, signal) => ({
      async *[Symbol.asyncIterator]() {
        afters.push(after);
        let n = 0;
        for await (const ev of unix.operations.watchOperation({ id: opId, afterSequence: after }, { signal })) {
          yield ev;
          if (!ev.attached && !ev.outcome && ++n === 2) throw Object.assign(new Error("connection dropped"), { code: grpc.status.UNAVAILABLE });
        }
      },
    });
    const libFlaky = collect(watchOperation(flaky, id, { onReconnect: () => reconnects++ }));

    const all = await starter.journaled();
    const n = all[all.length - 1]!.sequence;
    expect(all[n - 1]!.outcome?.state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const tail = all.slice(k).map(comparable);

    const g = await grpcRest.all();
    expect(g[0]!.attached?.id).toBe(id);
    expect(g[0]!.sequence).toBe(k);
    expectContiguous(g.slice(1), k + 1, n);
    expect(g.slice(1).map(comparable)).toEqual(tail);
    const r = await restRest.all();
    expect(r[0]!.sequence).toBe(k);
    expect(r.slice(1).map(comparable)).toEqual(tail);
    for (const events of [await libGrpc, await libRest]) {
      expectContiguous(events, k + 1, n);
      expect(events.map(comparable)).toEqual(tail);
    }
    const fl = await libFlaky;
    expectContiguous(fl, 1, n);
    expect(fl.map(comparable)).toEqual(all.map(comparable));
    // Each re-attach asked for exactly what came after the last event it had.
    expect(afters).toEqual(Array.from({ length: Math.ceil(n / 2) }, (_, i) => 2 * i));
    expect(reconnects).toBe(afters.length - 1);

    // After the end: re-attaching at N-1 replays only the outcome, at N nothing, past N is refused.
    const lastOnly = (await new Recorder(tcp.operations.watchOperation({ id, afterSequence: n - 1 })).all()).filter((e) => !e.attached);
    expect(lastOnly.map(comparable)).toEqual([comparable(all[n - 1]!)]);
    const nothing = await new Recorder(d.rest().operations.watchOperation({ id, afterSequence: n })).all();
    expect(nothing.map((e) => e.sequence)).toEqual([n]);
    expect(nothing[0]!.attached?.state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const past = await grpcError(unix.operations.watchOperation({ id, afterSequence: n + 1 }));
    expect(past.code).toBe(grpc.status.INVALID_ARGUMENT);
    expect(past.details).toContain("after_sequence");
  });

  test("CancelOperation mid-run ends CANCELLED and removes the probe; a second run while one runs and a cancel after the end are FAILED_PRECONDITION", async () => {
    const starter = new Recorder(d.rest().system.runDiagnostics({ writeProbeMib: HUGE_PROBE_MIB }));
    const id = (await starter.waitFor((e) => e.attached !== undefined)).attached!.id;
    await starter.waitFor(isWriting);
    expect(await probeFiles(d)).toEqual([`diag-${id}.probe`]);

    // Only one diagnostics run at a time; the refusal names the one that runs.
    const second = await grpcError(unix.system.runDiagnostics({ writeProbeMib: 1 }));
    expect(second.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(second.details).toContain(id);
    const st = richStatus(second);
    expect(st.code).toBe(grpc.status.FAILED_PRECONDITION);
    const info = ErrorInfo.decode(st.details.find((a) => a.typeUrl.endsWith("google.rpc.ErrorInfo"))!.value);
    expect(info.reason).toBe("OPERATION_RUNNING");
    expect(info.metadata["operation_id"]).toBe(id);
    const pf = PreconditionFailure.decode(st.details.find((a) => a.typeUrl.endsWith("google.rpc.PreconditionFailure"))!.value);
    expect(pf.violations[0]?.subject).toBe(id);
    const restSecond = await restError(d.rest().system.runDiagnostics({ writeProbeMib: 1 }));
    expect(restSecond.httpStatus).toBe(412);
    expect(restSecond.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(restSecond.message).toContain(id);

    const cancelled = await tcp.operations.cancelOperation({ id });
    expect(cancelled.id).toBe(id);
    const events = await starter.journaled();
    const outcome = events[events.length - 1]!.outcome!;
    expect(outcome.state).toBe(S.OPERATION_STATE_CANCELLED);
    expect(outcome.error?.message).toMatch(/^cancelled by tcp:127\.0\.0\.1/);
    expectContiguous(events, 1, events.length);
    // It stopped in the middle of the probe, not after writing all of it.
    const lastWrite = events.filter(isWriting).pop()!;
    expect(lastWrite.progress!.bytesDone).toBeLessThan(HUGE_PROBE_MIB * 1024 * 1024);
    expect(await probeFiles(d)).toEqual([]);
    const op = await unix.operations.getOperation({ id });
    expect(op.state).toBe(S.OPERATION_STATE_CANCELLED);
    expect(op.endTime).toBeDefined();

    const again = await grpcError(unix.operations.cancelOperation({ id }));
    expect(again.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(again.details).toContain("already ended");
    expect(ErrorInfo.decode(richStatus(again).details[0]!.value).reason).toBe("OPERATION_ENDED");
    const restAgain = await restError(d.rest().operations.cancelOperation({ id }));
    expect(restAgain.httpStatus).toBe(412);
    expect(restAgain.code).toBe(grpc.status.FAILED_PRECONDITION);

    // The lock is released: a new run is accepted again.
    const next = await new Recorder(unix.system.runDiagnostics({ writeProbeMib: 1 })).journaled();
    expect(next[next.length - 1]!.outcome?.state).toBe(S.OPERATION_STATE_SUCCEEDED);
  });

  test("ListOperations filters by kind and state, and page_size=1 visits every operation exactly once", async () => {
    // Two more successes and one cancelled run, so every filter has something to find.
    const made: string[] = [];
    for (let i = 0; i < 2; i++) {
      const evs = await new Recorder(tcp.system.runDiagnostics({ writeProbeMib: 1 })).all();
      made.push(evs[0]!.attached!.id);
    }
    const rec = new Recorder(unix.system.runDiagnostics({ writeProbeMib: HUGE_PROBE_MIB }));
    const cancelledId = (await rec.waitFor((e) => e.attached !== undefined)).attached!.id;
    await unix.operations.cancelOperation({ id: cancelledId });
    const cevs = await rec.journaled();
    expect(cevs[cevs.length - 1]!.outcome?.state).toBe(S.OPERATION_STATE_CANCELLED);

    const full = await unix.operations.listOperations(ListOperationsRequest.fromPartial({ pageSize: 1000 }));
    expect(full.nextPageToken).toBe("");
    const ids = full.operations.map((o) => o.id);
    expect(new Set(ids).size).toBe(ids.length);
    expect(ids).toEqual(expect.arrayContaining([...made, cancelledId]));
    // Newest first.
    const times = full.operations.map((o) => o.createTime!.getTime());
    expect(times).toEqual([...times].sort((a, b) => b - a));
    expect(ids.slice(0, 3)).toEqual([cancelledId, made[1], made[0]]);

    const pageAllGrpc = async (filter: { kind?: string; state?: OperationState }): Promise<Operation[]> => {
      const out: Operation[] = [];
      let token = "";
      for (let guard = 0; guard < 1000; guard++) {
        const page = await tcp.operations.listOperations(ListOperationsRequest.fromPartial({ ...filter, pageSize: 1, pageToken: token }));
        expect(page.operations.length).toBeLessThanOrEqual(1);
        out.push(...page.operations);
        token = page.nextPageToken;
        if (!token) return out;
      }
      throw new Error("paging did not end");
    };
    const pageAllRest = async (query: string): Promise<string[]> => {
      const out: string[] = [];
      let token = "";
      for (let guard = 0; guard < 1000; guard++) {
        const res = await d.fetch(`/api/v1/operations?pageSize=1${query}${token ? `&pageToken=${encodeURIComponent(token)}` : ""}`);
        expect(res.status).toBe(200);
        const body = (await res.json()) as { operations?: { id: string }[]; nextPageToken?: string };
        out.push(...(body.operations ?? []).map((o) => o.id));
        token = body.nextPageToken ?? "";
        if (!token) return out;
      }
      throw new Error("paging did not end");
    };

    expect((await pageAllGrpc({})).map((o) => o.id)).toEqual(ids);
    expect(await pageAllRest("")).toEqual(ids);

    const byKind = await unix.operations.listOperations(ListOperationsRequest.fromPartial({ kind: "system.diagnostics", pageSize: 1000 }));
    expect(byKind.operations.map((o) => o.id)).toEqual(ids);
    expect((await unix.operations.listOperations(ListOperationsRequest.fromPartial({ kind: "update.apply" }))).operations).toEqual([]);
    expect(await pageAllRest("&kind=update.apply")).toEqual([]);

    for (const state of [S.OPERATION_STATE_SUCCEEDED, S.OPERATION_STATE_CANCELLED, S.OPERATION_STATE_RUNNING]) {
      const want = full.operations.filter((o) => o.state === state).map((o) => o.id);
      const paged = await pageAllGrpc({ kind: "system.diagnostics", state });
      expect({ state: S[state], ids: paged.map((o) => o.id) }).toEqual({ state: S[state], ids: want });
      expect(paged.every((o) => o.state === state)).toBe(true);
      expect(await pageAllRest(`&state=${S[state]}&kind=system.diagnostics`)).toEqual(want);
    }
    const succeeded = full.operations.filter((o) => o.state === S.OPERATION_STATE_SUCCEEDED).map((o) => o.id);
    expect(succeeded).toEqual(expect.arrayContaining(made));
    expect(full.operations.filter((o) => o.state === S.OPERATION_STATE_CANCELLED).map((o) => o.id)).toContain(cancelledId);
    expect(full.operations.filter((o) => o.state === S.OPERATION_STATE_RUNNING)).toEqual([]);
  });
});

describe("kill -9 mid-operation", () => {
  let d: TestDaemon;
  beforeAll(async () => {
    d = await startTestDaemon();
  });
  afterAll(async () => {
    await d.cleanup();
  });

  test("after a restart the operation is INTERRUPTED with the left-over probe removed, and a following watcher carries on to that end", async () => {
    const unix = d.grpcUnix();
    const starter = new Recorder(unix.system.runDiagnostics({ writeProbeMib: HUGE_PROBE_MIB }));
    const id = (await starter.waitFor((e) => e.attached !== undefined)).attached!.id;

    // Followers that must survive the daemon's death: one over the unix socket (same path after
    // the restart), one over REST that looks up the gateway's new address on each attach.
    const follower = createGrpcClients({ endpoint: `unix://${d.endpoints.socket}` });
    let grpcReconnects = 0;
    let restReconnects = 0;
    const grpcFollow = new Recorder(
      watchOperation((opId, after, signal) => follower.operations.watchOperation({ id: opId, afterSequence: after }, { signal }), id, {
        onReconnect: () => grpcReconnects++,
      }),
    );
    const restFollow = new Recorder(
      watchOperation(
        (opId, after, signal) => d.rest().operations.watchOperation({ id: opId, afterSequence: after }, { signal }),
        id,
        { onReconnect: () => restReconnects++ },
      ),
    );

    await starter.waitFor(isWriting);
    // Both followers are attached and following before the kill.
    await grpcFollow.waitFor(isWriting);
    await restFollow.waitFor(isWriting);
    await d.kill9();
    const beforeKill = await starter.journaled().catch(() => starter.events.filter((e) => !e.attached));
    expect(starter.error).toBeDefined(); // the stream broke with the daemon
    expect(beforeKill.some(isWriting)).toBe(true);
    expect(beforeKill.some((e) => e.outcome)).toBe(false);
    // The dead daemon left its probe behind.
    expect(await probeFiles(d)).toEqual([`diag-${id}.probe`]);
    const probePath = join(d.stateDir, "tmp", `diag-${id}.probe`);

    await d.restart();
    const [g, r] = await Promise.all([grpcFollow.all(), restFollow.all()]);
    follower.close();
    expect(grpcReconnects).toBeGreaterThanOrEqual(1);
    expect(restReconnects).toBeGreaterThanOrEqual(1);

    const op = await d.grpcTcp().operations.getOperation({ id });
    expect(op.state).toBe(S.OPERATION_STATE_INTERRUPTED);
    const n = op.lastSequence;
    expect(op.error?.code).toBe(grpc.status.ABORTED);
    expect(op.error?.message).toMatch(/^interrupted: piccolod stopped while this operation was running during phase "write_throughput"/);
    expect(op.error?.message).toContain(`removed the left-over write probe ${probePath}`);
    expect(existsSync(probePath)).toBe(false);
    expect(await probeFiles(d)).toEqual([]);

    // Replays over gRPC and REST: the whole history, ending with the interruption.
    const replayGrpc = (await new Recorder(d.grpcTcp().operations.watchOperation({ id, afterSequence: 0 })).all()).filter((e) => !e.attached);
    const replayRest = await new Recorder(d.rest({ sse: true }).operations.watchOperation({ id, afterSequence: 0 })).journaled();
    const journal = (await readJournal(d, id)).map(comparable);
    for (const events of [replayGrpc, replayRest, g, r]) {
      expectContiguous(events, 1, n);
      expect(events.map(comparable)).toEqual(journal);
      expect(events[n - 1]!.outcome!.state).toBe(S.OPERATION_STATE_INTERRUPTED);
      expect(events[n - 1]!.outcome!.error?.message).toBe(op.error?.message);
    }
    // What the starter saw before the kill is exactly the start of the history.
    expect(beforeKill.map(comparable)).toEqual(journal.slice(0, beforeKill.length));
  });
});

describe("SIGTERM during an operation", () => {
  let d: TestDaemon;
  beforeAll(async () => {
    d = await startTestDaemon();
  });
  afterAll(async () => {
    await d.cleanup();
  });

  test("the daemon exits 0 after journaling the operation INTERRUPTED itself; the restart adds nothing", async () => {
    const unix = d.grpcUnix();
    const starter = new Recorder(unix.system.runDiagnostics({ writeProbeMib: HUGE_PROBE_MIB }));
    const id = (await starter.waitFor((e) => e.attached !== undefined)).attached!.id;
    // Watchers on the other transports, following live.
    const others = [
      new Recorder(d.grpcTcp().operations.watchOperation({ id, afterSequence: 0 })),
      new Recorder(d.rest().operations.watchOperation({ id, afterSequence: 0 })),
      new Recorder(d.rest({ sse: true }).operations.watchOperation({ id, afterSequence: 0 })),
    ];
    await starter.waitFor(isWriting);
    await Promise.all(others.map((o) => o.waitFor(isWriting)));

    expect(await d.stop()).toBe(0);
    // The live streams got the outcome before the daemon went away.
    const live = await starter.journaled();
    expectContiguous(live, 1, live.length);
    for (const o of others) expect((await o.journaled()).map(comparable)).toEqual(live.map(comparable));
    const end = live[live.length - 1]!.outcome!;
    expect(end.state).toBe(S.OPERATION_STATE_INTERRUPTED);
    expect(end.error?.message).toMatch(/^interrupted: piccolod was stopped while this operation was running/);
    expect(await probeFiles(d)).toEqual([]);
    const onDisk = await readJournal(d, id);
    expect(onDisk.map(comparable)).toEqual(live.map(comparable));

    const outputBefore = d.output().length;
    await d.restart();
    const op = await d.grpcTcp().operations.getOperation({ id });
    expect(op.state).toBe(S.OPERATION_STATE_INTERRUPTED);
    expect(op.lastSequence).toBe(live.length);
    expect(op.error?.message).toBe(end.error?.message);
    expect(op.error?.message).not.toContain("piccolod stopped while");
    const replay = await new Recorder(d.rest().operations.watchOperation({ id, afterSequence: 0 })).journaled();
    expect(replay.map(comparable)).toEqual(live.map(comparable));
    expect(d.output().slice(outputBefore)).not.toContain("piccolod stopped while this operation was running");
  });
});
