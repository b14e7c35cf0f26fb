import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { OperationState, type OperationEvent } from "../../../gen/piccolo/operations/v1/operations.js";
import { PiccoloError } from "../errors.js";
import { openJournalStore } from "./journal.js";
import { createOperationManager, type OperationKind, type OperationManager, type WorkerContext } from "./manager.js";

const log = pino({ level: "silent" });
let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), "piccolod-ops-"));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

type Req = { n: number };
const kind = (over: Partial<OperationKind<Req>> & { run: OperationKind<Req>["run"] }): OperationKind<Req> => ({
  kind: "test.work",
  requestType: "piccolo.system.v1.RunDiagnosticsRequest",
  encodeRequest: () => new Uint8Array(),
  exclusive: false,
  single: false,
  cancellable: true,
  ...over,
});

async function manager(kinds: OperationKind<Req>[], intervalMs = 50): Promise<OperationManager> {
  const m = createOperationManager({ store: await openJournalStore(dir), log, retention: 100, progressIntervalMs: intervalMs });
  for (const k of kinds) m.register(k);
  await m.init();
  return m;
}

async function collect(m: OperationManager, id: string, after = 0): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const ev of m.watch(id, after, new AbortController().signal)) out.push(ev);
  return out;
}

const gate = () => {
  let open!: () => void;
  const p = new Promise<void>((r) => (open = r));
  return { p, open };
};

test("events are journaled in order and replayed to late watchers", async () => {
  const m = await manager([
    kind({
      async run(_r, ctx) {
        for (const phase of ["a", "b", "c"]) ctx.progress({ phase, percent: 10 });
        return undefined;
      },
    }),
  ]);
  const op = await m.start("test.work", { n: 1 }, "tester");
  const live = await collect(m, op.id);
  expect(live[0]!.attached?.id).toBe(op.id);
  const events = live.slice(1);
  expect(events.map((e) => e.sequence)).toEqual(events.map((_, i) => i + 1));
  expect(events.map((e) => e.progress?.phase ?? "outcome")).toEqual(["start", "a", "b", "c", "outcome"]);
  expect(events.at(-1)!.outcome!.state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  // A late watcher from sequence 2 gets exactly the rest.
  const late = (await collect(m, op.id, 2)).slice(1);
  expect(late.map((e) => e.sequence)).toEqual([3, 4, 5]);
  // The journal holds the operation line plus one line per event.
  const lines = (await readFile(join(dir, `${op.id}.journal`), "utf8")).trim().split("\n");
  expect(lines).toHaveLength(1 + events.length);
});

test("progress is coalesced within a phase and a slow watcher does not slow the worker", async () => {
  const m = await manager(
    [
      kind({
        async run(_r, ctx) {
          const t0 = performance.now();
          while (performance.now() - t0 < 300) {
            for (let i = 0; i < 1000; i++) ctx.progress({ phase: "write", bytesDone: i, bytesTotal: 1000 });
            await new Promise((r) => setImmediate(r));
          }
          return undefined;
        },
      }),
    ],
    100,
  );
  const op = await m.start("test.work", { n: 1 }, "tester");
  // A watcher that takes the header and then stalls.
  const stalled = m.watch(op.id, 0, new AbortController().signal);
  await stalled.next();
  const t0 = performance.now();
  const events = (await collect(m, op.id)).slice(1);
  expect(performance.now() - t0).toBeLessThan(5000);
  const writes = events.filter((e) => e.progress?.phase === "write");
  // ~300 ms at one event per 100 ms: a handful, not hundreds of thousands.
  expect(writes.length).toBeGreaterThanOrEqual(2);
  expect(writes.length).toBeLessThanOrEqual(8);
  // The stalled watcher still gets everything afterwards, in order.
  const rest: OperationEvent[] = [];
  for await (const ev of stalled) rest.push(ev);
  expect(rest.map((e) => e.sequence)).toEqual(events.map((e) => e.sequence));
});

test("rate and ETA are derived from bytes when the worker leaves them out", async () => {
  const m = await manager(
    [
      kind({
        async run(_r, ctx) {
          for (let i = 1; i <= 8; i++) {
            await new Promise((r) => setTimeout(r, 60));
            ctx.progress({ phase: "copy", bytesDone: i * 1_000_000, bytesTotal: 16_000_000 });
          }
          return undefined;
        },
      }),
    ],
    0,
  );
  const op = await m.start("test.work", { n: 1 }, "t");
  const copies = (await collect(m, op.id)).filter((e) => e.progress?.phase === "copy");
  const last = copies.at(-1)!.progress!;
  expect(last.bytesPerSecond).toBeGreaterThan(2_000_000);
  expect(last.bytesPerSecond).toBeLessThan(40_000_000);
  expect(last.eta?.seconds ?? -1).toBeGreaterThanOrEqual(0);
});

test("a phase that ends within the first rate window still reports its average rate at its end", async () => {
  let elapsed = 0;
  const m = await manager(
    [
      kind({
        async run(_r, ctx) {
          const t0 = performance.now();
          ctx.progress({ phase: "copy", bytesDone: 0, bytesTotal: 8_000_000 });
          await new Promise((r) => setTimeout(r, 40));
          ctx.progress({ phase: "copy", bytesDone: 4_000_000, bytesTotal: 8_000_000 });
          await new Promise((r) => setTimeout(r, 40));
          ctx.progress({ phase: "copy", bytesDone: 8_000_000, bytesTotal: 8_000_000 });
          elapsed = (performance.now() - t0) / 1000;
          ctx.progress({ phase: "next", bytesDone: 0, bytesTotal: 0 });
          return undefined;
        },
      }),
    ],
    0,
  );
  const op = await m.start("test.work", { n: 1 }, "t");
  const copies = (await collect(m, op.id)).filter((e) => e.progress?.phase === "copy").map((e) => e.progress!);
  const end = copies.find((p) => p.bytesDone === 8_000_000)!;
  // 8 MB over the time the worker measured between its first and last report (about 80 ms; a timer
  // may fire a fraction of a millisecond early by this clock, and late on a busy machine).
  const average = 8_000_000 / elapsed;
  expect(end.bytesPerSecond).toBeGreaterThan(average * 0.9);
  expect(end.bytesPerSecond).toBeLessThan(average * 1.1);
  expect(copies.filter((p) => p.bytesDone < 8_000_000).every((p) => p.bytesPerSecond === 0)).toBe(true);
});

test("cancel stops the worker and ends CANCELLED; cancelling an ended operation is refused", async () => {
  const m = await manager([
    kind({
      async run(_r, ctx: WorkerContext) {
        await new Promise((_res, rej) => ctx.signal.addEventListener("abort", () => rej(ctx.signal.reason)));
        return undefined;
      },
    }),
  ]);
  const op = await m.start("test.work", { n: 1 }, "t");
  m.cancel(op.id, "alice");
  const events = await collect(m, op.id);
  const outcome = events.at(-1)!.outcome!;
  expect(outcome.state).toBe(OperationState.OPERATION_STATE_CANCELLED);
  expect(outcome.error?.message).toContain("cancelled by alice");
  expect(() => m.cancel(op.id, "alice")).toThrow(/already ended/);
});

test("a failing worker ends FAILED with its message and reason", async () => {
  const m = await manager([
    kind({
      async run() {
        throw new PiccoloError("failed_precondition", "disk is mounted", { reason: "DISK_BUSY" });
      },
    }),
  ]);
  const op = await m.start("test.work", { n: 1 }, "t");
  const outcome = (await collect(m, op.id)).at(-1)!.outcome!;
  expect(outcome.state).toBe(OperationState.OPERATION_STATE_FAILED);
  expect(outcome.error).toMatchObject({ code: 9, message: "disk is mounted" });
  expect(m.get(op.id).state).toBe(OperationState.OPERATION_STATE_FAILED);
});

test("one exclusive operation at a time; a second is refused naming the first", async () => {
  const g = gate();
  const k = kind({ exclusive: true, async run() { await g.p; return undefined; } });
  const m = await manager([k, { ...k, kind: "test.other" }]);
  const first = await m.start("test.work", { n: 1 }, "t");
  const second = m.start("test.other", { n: 2 }, "t");
  await expect(second).rejects.toMatchObject({ kind: "failed_precondition", metadata: { operation_id: first.id } });
  await expect(m.start("test.work", { n: 3 }, "t")).rejects.toThrow(first.id);
  g.open();
  await collect(m, first.id);
  await expect(m.start("test.other", { n: 4 }, "t")).resolves.toMatchObject({ kind: "test.other" });
});

test("an operation left running by a dead daemon is INTERRUPTED at the next start, with the kind's clean-up said", async () => {
  const never = new Promise<never>(() => undefined);
  const m1 = await manager([kind({ async run(_r, ctx) { ctx.progress({ phase: "write", percent: 42 }); return never; } })]);
  const op = await m1.start("test.work", { n: 1 }, "t");
  // Wait until the write phase is journaled, then "die" (drop m1 without shutdown).
  for await (const ev of m1.watch(op.id, 0, new AbortController().signal)) if (ev.progress?.phase === "write") break;
  const recovered: string[] = [];
  const m2 = await manager([
    kind({
      async run() { return undefined; },
      async recover(o) { recovered.push(o.id); return "removed /tmp/x"; },
    }),
  ]);
  expect(recovered).toEqual([op.id]);
  const events = (await collect(m2, op.id)).slice(1);
  expect(events.map((e) => e.progress?.phase ?? "outcome")).toEqual(["start", "write", "outcome"]);
  const outcome = events.at(-1)!.outcome!;
  expect(outcome.state).toBe(OperationState.OPERATION_STATE_INTERRUPTED);
  expect(outcome.error?.message).toMatch(/phase "write" at 42%.*removed \/tmp\/x/);
});

test("a torn last journal line is dropped and the journal stays appendable", async () => {
  const m1 = await manager([kind({ async run(_r, ctx) { ctx.progress({ phase: "a" }); return new Promise(() => undefined); } })]);
  const op = await m1.start("test.work", { n: 1 }, "t");
  for await (const ev of m1.watch(op.id, 0, new AbortController().signal)) if (ev.progress?.phase === "a") break;
  const { appendFile } = await import("node:fs/promises");
  await appendFile(join(dir, `${op.id}.journal`), "CgRoYWxm"); // half a line, no newline
  const m2 = await manager([kind({ async run() { return undefined; } })]);
  const events = (await collect(m2, op.id)).slice(1);
  expect(events.map((e) => e.sequence)).toEqual([1, 2, 3]);
  expect(events.at(-1)!.outcome!.state).toBe(OperationState.OPERATION_STATE_INTERRUPTED);
});

test("shutdown journals running operations as INTERRUPTED even if the worker ignores the signal", async () => {
  const m = await manager([kind({ async run(_r, ctx) { ctx.progress({ phase: "stuck" }); return new Promise(() => undefined); } })]);
  const op = await m.start("test.work", { n: 1 }, "t");
  for await (const ev of m.watch(op.id, 0, new AbortController().signal)) if (ev.progress?.phase === "stuck") break;
  await m.shutdown(100);
  expect(m.get(op.id).state).toBe(OperationState.OPERATION_STATE_INTERRUPTED);
  expect(m.get(op.id).error?.message).toContain("did not stop within 100 ms");
  await expect(m.start("test.work", { n: 2 }, "t")).rejects.toMatchObject({ kind: "unavailable" });
});

test("list filters by kind and state and pages newest first", async () => {
  const m = await manager([kind({ async run() { return undefined; } }), { ...kind({ async run() { throw new Error("x"); } }), kind: "test.fail" }]);
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) {
    const op = await m.start(i % 2 ? "test.fail" : "test.work", { n: i }, "t");
    await collect(m, op.id);
    ids.push(op.id);
  }
  const seen: string[] = [];
  let token = "";
  do {
    const page = m.list({ pageSize: 2, pageToken: token });
    seen.push(...page.operations.map((o) => o.id));
    token = page.nextPageToken;
  } while (token);
  expect(seen).toEqual([...ids].reverse());
  expect(m.list({ pageSize: 50, kind: "test.fail" }).operations).toHaveLength(2);
  expect(m.list({ pageSize: 50, state: OperationState.OPERATION_STATE_SUCCEEDED }).operations).toHaveLength(3);
  expect(() => m.list({ pageSize: 1, pageToken: "garbage!" })).toThrow(/page_token/);
});
