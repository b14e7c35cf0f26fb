/**
 * Reading the engine's log stream: undoing its multiplexing (8-byte frame headers that say
 * stdout or stderr) and cutting the output into lines, with the engine's timestamp taken off
 * each message when asked for. Pure generators over byte chunks, so they are tested without an
 * engine and never hold more than one line (capped) per stream in memory.
 */
import { LogStream, type LogEntry } from "../../../gen/piccolo/containers/v1/containers.js";

/** One frame of the multiplexed stream. */
export interface LogFrame {
  /** 1 stdout, 2 stderr (0 stdin never comes). */
  readonly stream: 1 | 2;
  readonly data: Buffer;
}

/** A line longer than this is sent in pieces, so one endless line cannot exhaust memory. */
export const MAX_LINE_BYTES = 1024 * 1024;

/** Splits the engine's multiplexed log stream into frames, however the bytes arrive. */
export async function* demuxFrames(source: AsyncIterable<Buffer>): AsyncGenerator<LogFrame> {
  let buf: Buffer = Buffer.alloc(0);
  for await (const chunk of source) {
    buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
    while (buf.length >= 8) {
      const size = buf.readUInt32BE(4);
      if (buf.length < 8 + size) break;
      const kind = buf[0] === 2 ? 2 : 1;
      yield { stream: kind, data: buf.subarray(8, 8 + size) };
      buf = buf.subarray(8 + size);
    }
  }
  if (buf.length > 0) throw new Error(`the log stream ended inside a frame (${buf.length} bytes left)`);
}

const TIMESTAMP = /^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:\d\d)) /;

/** Parses an RFC 3339 timestamp with nanoseconds (JavaScript keeps milliseconds). */
function parseTime(s: string): Date | undefined {
  const d = new Date(s.replace(/(\.\d{3})\d+/, "$1"));
  return Number.isNaN(d.getTime()) ? undefined : d;
}

const decoder = new TextDecoder("utf-8", { fatal: false });

/**
 * Turns log frames into lines. With `timestamps`, the engine starts every message with its time
 * and a space: that prefix is taken off and becomes the line's time. A message without a line
 * end (the engine splits lines over 16 KiB, and the last one may be partial) is joined with what
 * follows on the same stream.
 */
export async function* framesToLines(frames: AsyncIterable<LogFrame>, timestamps: boolean): AsyncGenerator<LogEntry> {
  const pending: Record<1 | 2, { parts: Buffer[]; size: number; time: Date | undefined }> = {
    1: { parts: [], size: 0, time: undefined },
    2: { parts: [], size: 0, time: undefined },
  };
  const entry = (stream: 1 | 2, bytes: Buffer, time: Date | undefined): LogEntry => ({
    stream: stream === 2 ? LogStream.LOG_STREAM_STDERR : LogStream.LOG_STREAM_STDOUT,
    line: decoder.decode(bytes),
    time,
  });
  for await (const f of frames) {
    const p = pending[f.stream];
    let data = f.data;
    if (timestamps) {
      // Only the start of a message carries a timestamp; read at most the prefix's length.
      const m = TIMESTAMP.exec(data.subarray(0, 48).toString("latin1"));
      if (m) {
        if (p.size === 0) p.time = parseTime(m[1]!);
        data = data.subarray(m[0].length);
      }
    }
    let start = 0;
    for (let nl = data.indexOf(10); nl >= 0; nl = data.indexOf(10, start)) {
      const piece = data.subarray(start, nl > start && data[nl - 1] === 13 ? nl - 1 : nl);
      const line = p.size === 0 ? piece : Buffer.concat([...p.parts, piece]);
      yield entry(f.stream, line, p.time);
      p.parts = [];
      p.size = 0;
      p.time = undefined;
      start = nl + 1;
    }
    if (start < data.length) {
      const rest = data.subarray(start);
      p.parts.push(Buffer.from(rest));
      p.size += rest.length;
      if (p.size >= MAX_LINE_BYTES) {
        yield entry(f.stream, Buffer.concat(p.parts), p.time);
        p.parts = [];
        p.size = 0;
      }
    }
  }
  for (const s of [1, 2] as const) {
    if (pending[s].size > 0) yield entry(s, Buffer.concat(pending[s].parts), pending[s].time);
  }
}

/** The raw stream of a container with a terminal: everything is stdout, lines carry timestamps. */
export async function* rawToLines(source: AsyncIterable<Buffer>, timestamps: boolean): AsyncGenerator<LogEntry> {
  // Frame the raw bytes line by line so each line's own timestamp prefix is read.
  async function* asFrames(): AsyncGenerator<LogFrame> {
    let buf: Buffer = Buffer.alloc(0);
    for await (const chunk of source) {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      let nl: number;
      while ((nl = buf.indexOf(10)) >= 0) {
        yield { stream: 1, data: buf.subarray(0, nl + 1) };
        buf = buf.subarray(nl + 1);
      }
      if (buf.length >= MAX_LINE_BYTES) {
        yield { stream: 1, data: buf };
        buf = Buffer.alloc(0);
      }
    }
    if (buf.length > 0) yield { stream: 1, data: buf };
  }
  yield* framesToLines(asFrames(), timestamps);
}
