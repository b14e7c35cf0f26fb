/** The progress renderer: the line a person sees for given Progress values, and the view's redraw behaviour. */
import { OperationState, type OperationEvent, type Progress } from "../../../gen/piccolo/operations/v1/operations.js";
import {
  formatBytes,
  formatEta,
  ProgressView,
  renderPlainLine,
  renderProgressLine,
} from "./progress.js";

const MiB = 1024 * 1024;

const progress = (p: Partial<Progress>): Progress => ({
  items: [],
  phase: "",
  phaseIndex: 0,
  phaseCount: 0,
  percent: 0,
  bytesDone: 0,
  bytesTotal: 0,
  bytesPerSecond: 0,
  eta: undefined,
  message: "",
  ...p,
});

const event = (sequence: number, e: Partial<OperationEvent>): OperationEvent => ({
  operationId: "op-1",
  sequence,
  time: new Date(0),
  ...e,
});

describe("renderProgressLine", () => {
  test("a byte-counting phase shows index, bar, percent, bytes, rate, ETA and message", () => {
    const line = renderProgressLine(
      progress({
        phase: "write_throughput",
        phaseIndex: 3,
        phaseCount: 7,
        percent: 42.9,
        bytesDone: 4 * MiB,
        bytesTotal: 8 * MiB,
        bytesPerSecond: 12.34 * MiB,
        eta: { seconds: 3, nanos: 200_000_000 },
        message: "writing the probe",
      }),
    );
    expect(line).toBe("write_throughput 3/7  [########------------]   42%  4.0/8.0 MiB  12.3 MiB/s  ETA 0:04  writing the probe");
  });

  test("fields that do not apply are left out", () => {
    expect(renderProgressLine(progress({ phase: "start", message: "system.diagnostics started" }))).toBe(
      "start  [--------------------]    0%  system.diagnostics started",
    );
    expect(renderProgressLine(progress({ phase: "health", phaseIndex: 1, phaseCount: 7, percent: 5 }))).toBe(
      "health 1/7  [#-------------------]    5%",
    );
  });

  test("percent is clamped and rounded down; 100 fills the bar", () => {
    expect(renderProgressLine(progress({ phase: "p", percent: 99.9 }))).toContain("[####################]   99%");
    expect(renderProgressLine(progress({ phase: "p", percent: 100 }))).toContain("[####################]  100%");
    expect(renderProgressLine(progress({ phase: "p", percent: 250 }))).toContain("100%");
    expect(renderProgressLine(progress({ phase: "p", percent: -3 }))).toContain("[--------------------]    0%");
  });

  test("an unknown total shows only the bytes done; large totals switch to GiB", () => {
    expect(renderProgressLine(progress({ phase: "download", bytesDone: 1536 }))).toContain("  1.5 KiB");
    expect(renderProgressLine(progress({ phase: "download", bytesDone: 512 * MiB, bytesTotal: 2048 * MiB }))).toContain("0.50/2.00 GiB");
  });

  test("a width cuts the message first, then the line", () => {
    const p = progress({ phase: "write", percent: 50, message: "a rather long message about what is going on" });
    const full = renderProgressLine(p);
    const cut = renderProgressLine(p, { width: 50 });
    expect(cut).toHaveLength(50);
    expect(cut.endsWith("…")).toBe(true);
    expect(full.startsWith(cut.slice(0, -1))).toBe(true);
    expect(renderProgressLine(p, { width: 12 })).toBe("write  [###…");
  });
});

test("formatBytes and formatEta", () => {
  expect(formatBytes(0)).toBe("0 B");
  expect(formatBytes(1023)).toBe("1023 B");
  expect(formatBytes(64 * MiB)).toBe("64.0 MiB");
  expect(formatEta({ seconds: 0, nanos: 0 })).toBe("0:00");
  expect(formatEta({ seconds: 59, nanos: 1 })).toBe("1:00");
  expect(formatEta({ seconds: 3723, nanos: 0 })).toBe("1:02:03");
});

test("plain lines are `[seq] phase pct% message`", () => {
  expect(renderPlainLine(event(4, { progress: progress({ phase: "write_throughput", percent: 57.8, message: "writing" }) }))).toBe(
    "[4] write_throughput 57% writing",
  );
  expect(
    renderPlainLine(event(9, { outcome: { state: OperationState.OPERATION_STATE_FAILED, result: undefined, error: { code: 9, message: "disk full", details: [] } } })),
  ).toBe("[9] FAILED: disk full");
});

describe("ProgressView", () => {
  const sink = (isTTY: boolean) => {
    const chunks: string[] = [];
    return { chunks, text: () => chunks.join(""), isTTY, columns: 200, write: (s: string) => chunks.push(s) };
  };

  test("on a terminal it redraws one line in place and leaves a final line per phase", () => {
    const out = sink(true);
    const view = new ProgressView(out);
    view.event(event(1, { progress: progress({ phase: "download", percent: 10 }) }));
    view.event(event(2, { progress: progress({ phase: "download", percent: 40 }) }));
    view.event(event(3, { progress: progress({ phase: "verify", percent: 90 }) }));
    view.event(event(4, { outcome: { state: OperationState.OPERATION_STATE_SUCCEEDED, result: undefined, error: undefined } }));
    // Each draw clears the line first; a phase change and the end leave the last drawing behind.
    const lines = out.text().split("\n");
    expect(lines).toHaveLength(3);
    expect(lines[0]).toBe(
      "\r\x1b[2Kdownload  [##------------------]   10%\r\x1b[2Kdownload  [########------------]   40%",
    );
    expect(lines[1]).toBe("\r\x1b[2Kverify  [##################--]   90%");
    expect(lines[2]).toBe("");
  });

  test("on a terminal the attach header shows the current progress only when nothing is replayed after it", () => {
    const op = (lastSequence: number) => ({
      id: "op-1",
      kind: "system.diagnostics",
      state: OperationState.OPERATION_STATE_RUNNING,
      createTime: undefined,
      startTime: undefined,
      endTime: undefined,
      actor: "",
      request: undefined,
      lastSequence,
      progress: progress({ phase: "write_throughput", percent: 50 }),
      cancellable: true,
      exclusive: false,
      error: undefined,
      result: undefined,
    });
    const live = sink(true);
    new ProgressView(live).event(event(7, { attached: op(7) }));
    expect(live.text()).toBe("op-1 (system.diagnostics): RUNNING\n\r\x1b[2Kwrite_throughput  [##########----------]   50%");
    const replay = sink(true);
    new ProgressView(replay).event(event(0, { attached: op(7) }));
    expect(replay.text()).toBe("op-1 (system.diagnostics): RUNNING\n");
  });

  test("a notice on a terminal clears the live line and draws it again", () => {
    const out = sink(true);
    const err = sink(true);
    const view = new ProgressView(out);
    view.event(event(1, { progress: progress({ phase: "download", percent: 10 }) }));
    view.notice("re-attaching", err);
    expect(err.text()).toBe("re-attaching\n");
    expect(out.chunks.slice(-2)).toEqual(["\r\x1b[2K", "download  [##------------------]   10%"]);
  });

  test("elsewhere it writes one plain line per event and none for the outcome", () => {
    const out = sink(false);
    const view = new ProgressView(out);
    view.event(event(1, { progress: progress({ phase: "download", percent: 10, message: "fetching" }) }));
    view.event(event(2, { progress: progress({ phase: "download", percent: 40 }) }));
    view.event(event(3, { outcome: { state: OperationState.OPERATION_STATE_SUCCEEDED, result: undefined, error: undefined } }));
    expect(out.text()).toBe("[1] download 10% fetching\n[2] download 40%\n");
    expect(out.text()).not.toContain("\r");
  });
});
