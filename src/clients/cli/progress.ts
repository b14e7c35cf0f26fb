/**
 * Renders operation events for a person: on a terminal a single progress line redrawn in place
 * (phase, bar, percent, bytes, rate, ETA, message) that is left behind as a final line each time
 * the phase changes; elsewhere one plain `[seq] phase pct% message` line per event.
 */
import type { Duration } from "../../../gen/google/protobuf/duration.js";
import { OperationState, type OperationEvent, type Progress } from "../../../gen/piccolo/operations/v1/operations.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

/** Where rendered text goes: a subset of a Node writable stream. */
export interface TextSink {
  write(text: string): unknown;
  /** Set on a terminal. */
  readonly isTTY?: boolean;
  /** Terminal width, when known. */
  readonly columns?: number;
}

/** Options of renderProgressLine. */
export interface ProgressLineOptions {
  /** Cut the line to this many characters (the message goes first). Default: no limit. */
  readonly width?: number;
  /** Characters inside the bar's brackets. Default 20. */
  readonly barWidth?: number;
}

/** "OPERATION_STATE_SUCCEEDED" → "SUCCEEDED". */
export function stateName(state: OperationState): string {
  return (OperationState[state] ?? `STATE_${state}`).replace(/^OPERATION_STATE_/, "");
}

/** Percent clamped to 0..100 and rounded down, so 100% shows only when the work is done. */
export function percentOf(p: Pick<Progress, "percent">): number {
  const v = Number.isFinite(p.percent) ? p.percent : 0;
  return Math.floor(Math.max(0, Math.min(100, v)));
}

function unitFor(n: number): { div: number; name: string; digits: number } {
  if (n >= GiB) return { div: GiB, name: "GiB", digits: 2 };
  if (n >= MiB) return { div: MiB, name: "MiB", digits: 1 };
  if (n >= KiB) return { div: KiB, name: "KiB", digits: 1 };
  return { div: 1, name: "B", digits: 0 };
}

/** A byte count in binary units: "512 B", "4.0 KiB", "12.5 MiB", "1.20 GiB". */
export function formatBytes(n: number): string {
  const u = unitFor(n);
  return `${(n / u.div).toFixed(u.digits)} ${u.name}`;
}

/** "done/total unit" in the total's unit ("4.0/8.0 MiB"); just the done part when the total is unknown. */
export function formatBytesOf(done: number, total: number): string {
  if (total <= 0) return formatBytes(done);
  const u = unitFor(total);
  return `${(done / u.div).toFixed(u.digits)}/${(total / u.div).toFixed(u.digits)} ${u.name}`;
}

/** A rate in MiB/s with one decimal: "12.3 MiB/s". */
export function formatRate(bytesPerSecond: number): string {
  return `${(bytesPerSecond / MiB).toFixed(1)} MiB/s`;
}

/** A duration as m:ss or h:mm:ss, rounded up to whole seconds ("0:05", "12:00", "1:02:03"). */
export function formatEta(d: Duration): string {
  const total = Math.max(0, Math.ceil((d.seconds || 0) + (d.nanos || 0) / 1e9));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = total % 60;
  const ss = String(s).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/** The bar: "[#########-----------]". */
export function renderBar(percent: number, width = 20): string {
  const filled = Math.round((Math.max(0, Math.min(100, percent)) / 100) * width);
  return `[${"#".repeat(filled)}${"-".repeat(width - filled)}]`;
}

/**
 * One progress line: phase (with "i/n" when the kind has a fixed list), bar, percent, bytes
 * done/total, rate and ETA when they apply, then the message. Fields at zero are left out.
 */
export function renderProgressLine(p: Progress, options: ProgressLineOptions = {}): string {
  const pct = percentOf(p);
  const parts: string[] = [];
  parts.push(p.phaseCount > 0 && p.phaseIndex > 0 ? `${p.phase || "-"} ${p.phaseIndex}/${p.phaseCount}` : p.phase || "-");
  parts.push(renderBar(pct, options.barWidth ?? 20));
  parts.push(`${String(pct).padStart(3)}%`);
  if (p.bytesTotal > 0 || p.bytesDone > 0) parts.push(formatBytesOf(p.bytesDone, p.bytesTotal));
  if (p.bytesPerSecond > 0) parts.push(formatRate(p.bytesPerSecond));
  if (p.eta) parts.push(`ETA ${formatEta(p.eta)}`);
  const head = parts.join("  ");
  const width = options.width;
  if (width === undefined) return p.message ? `${head}  ${p.message}` : head;
  if (head.length > width) return width <= 1 ? head.slice(0, Math.max(0, width)) : `${head.slice(0, width - 1)}…`;
  const room = width - head.length - 2;
  if (!p.message || room < 4) return head;
  return `${head}  ${p.message.length > room ? `${p.message.slice(0, room - 1)}…` : p.message}`;
}

/**
 * The plain (not a terminal) line of one event: `[seq] phase pct% message` for progress,
 * `[seq] attached <id> <kind> <STATE>` for the stream header, `[seq] <STATE>[: message]` for the outcome.
 */
export function renderPlainLine(ev: OperationEvent): string {
  if (ev.attached) return `[${ev.sequence}] attached ${ev.attached.id} ${ev.attached.kind} ${stateName(ev.attached.state)}`;
  if (ev.progress) {
    const p = ev.progress;
    return `[${ev.sequence}] ${p.phase || "-"} ${percentOf(p)}%${p.message ? ` ${p.message}` : ""}`;
  }
  if (ev.outcome) {
    const msg = ev.outcome.error?.message;
    return `[${ev.sequence}] ${stateName(ev.outcome.state)}${msg ? `: ${msg}` : ""}`;
  }
  return `[${ev.sequence}] (empty event)`;
}

const CLEAR_LINE = "\r\x1b[2K";

/**
 * Shows an operation's events on a sink. On a terminal the progress line is redrawn in place and
 * left behind as a final line when the phase changes or the stream ends; otherwise each event is
 * one plain line. The outcome itself is left to the caller (it knows the operation's id).
 */
export class ProgressView {
  private live: { phase: string; line: string } | undefined;
  private readonly tty: boolean;

  /** `tty` overrides the sink's isTTY (for tests). */
  constructor(
    private readonly out: TextSink,
    options: { readonly tty?: boolean } = {},
  ) {
    this.tty = options.tty ?? out.isTTY === true;
  }

  /** Whether the view redraws in place. */
  get interactive(): boolean {
    return this.tty;
  }

  private width(): number | undefined {
    const cols = this.out.columns;
    return cols && cols > 10 ? cols - 1 : 79;
  }

  /** Shows one event. Outcome events only end the live line. */
  event(ev: OperationEvent): void {
    if (!this.tty) {
      if (!ev.outcome) this.out.write(`${renderPlainLine(ev)}\n`);
      return;
    }
    if (ev.attached) {
      this.settle();
      const a = ev.attached;
      this.out.write(`${a.id} (${a.kind}): ${stateName(a.state)}\n`);
      // Show where it is now, unless older events are about to be replayed.
      if (a.progress && a.progress.phase && ev.sequence >= a.lastSequence) this.draw(a.progress);
      return;
    }
    if (ev.progress) {
      this.draw(ev.progress);
      return;
    }
    if (ev.outcome) this.settle();
  }

  private draw(p: Progress): void {
    if (this.live && this.live.phase !== p.phase) this.settle();
    const line = renderProgressLine(p, { width: this.width() });
    this.out.write(`${CLEAR_LINE}${line}`);
    this.live = { phase: p.phase, line };
  }

  /** Writes a line of its own (e.g. a reconnect notice) without breaking the live line. */
  notice(text: string, to: TextSink = this.out): void {
    if (this.tty && this.live) {
      this.out.write(CLEAR_LINE);
      to.write(`${text}\n`);
      this.out.write(this.live.line);
      return;
    }
    to.write(`${text}\n`);
  }

  /** Leaves the live line behind as a final line. */
  settle(): void {
    if (this.tty && this.live) this.out.write("\n");
    this.live = undefined;
  }
}
