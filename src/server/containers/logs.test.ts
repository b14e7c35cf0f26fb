import { LogStream, type LogEntry } from "../../../gen/piccolo/containers/v1/containers.js";
import { demuxFrames, framesToLines, MAX_LINE_BYTES, rawToLines } from "./logs.js";

const frame = (stream: 1 | 2, text: string | Buffer): Buffer => {
  const data = Buffer.isBuffer(text) ? text : Buffer.from(text);
  const h = Buffer.alloc(8);
  h[0] = stream;
  h.writeUInt32BE(data.length, 4);
  return Buffer.concat([h, data]);
};

async function* chunked(buf: Buffer, size: number): AsyncGenerator<Buffer> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

async function lines(it: AsyncIterable<LogEntry>): Promise<[string, string, string | undefined][]> {
  const out: [string, string, string | undefined][] = [];
  for await (const e of it) out.push([e.stream === LogStream.LOG_STREAM_STDERR ? "err" : "out", e.line, e.time?.toISOString()]);
  return out;
}

test("frames are reassembled however the bytes are cut, and stdout and stderr stay apart", async () => {
  const stream = Buffer.concat([frame(1, "one\n"), frame(2, "oops\n"), frame(1, "two\nthree\n"), frame(2, "again\n")]);
  for (const size of [1, 3, 7, 1000]) {
    expect(await lines(framesToLines(demuxFrames(chunked(stream, size)), false))).toEqual([
      ["out", "one", undefined],
      ["err", "oops", undefined],
      ["out", "two", undefined],
      ["out", "three", undefined],
      ["err", "again", undefined],
    ]);
  }
});

test("timestamps become the line's time and are taken off the text, also on a message continuing a split line", async () => {
  const stream = Buffer.concat([
    frame(1, "2026-11-23T14:02:21.451234567Z first\n"),
    frame(2, "2026-11-23T14:02:22.000000001Z par"),
    frame(2, "2026-11-23T14:02:22.500000000Z tial\n"),
    frame(1, "2026-11-23T14:02:23Z no newline at the end"),
  ]);
  expect(await lines(framesToLines(demuxFrames(chunked(stream, 5)), true))).toEqual([
    ["out", "first", "2026-11-23T14:02:21.451Z"],
    ["err", "partial", "2026-11-23T14:02:22.000Z"],
    ["out", "no newline at the end", "2026-11-23T14:02:23.000Z"],
  ]);
});

test("CRLF line ends, invalid UTF-8 and an endless line are handled", async () => {
  const endless = Buffer.alloc(MAX_LINE_BYTES + 10, 0x61);
  const stream = Buffer.concat([frame(1, "dos\r\n"), frame(1, Buffer.from([0x66, 0xff, 0x0a])), frame(1, endless)]);
  const got = await lines(framesToLines(demuxFrames(chunked(stream, 64 * 1024)), false));
  expect(got[0]).toEqual(["out", "dos", undefined]);
  expect(got[1]).toEqual(["out", "f\ufffd", undefined]);
  expect(got.slice(2).map((l) => l[1].length).reduce((a, b) => a + b, 0)).toBe(MAX_LINE_BYTES + 10);
  expect(got.slice(2).every((l) => l[1].length <= MAX_LINE_BYTES + 64 * 1024)).toBe(true);
});

test("a stream cut inside a frame is an error, not a silent loss", async () => {
  const stream = frame(1, "complete\n").subarray(0, 10);
  await expect(lines(framesToLines(demuxFrames(chunked(stream, 4)), false))).rejects.toThrow(/ended inside a frame/);
});

test("the raw stream of a terminal container is all stdout, one timestamp per line", async () => {
  const raw = Buffer.from("2026-11-23T14:00:00Z a\r\n2026-11-23T14:00:01Z b\n");
  expect(await lines(rawToLines(chunked(raw, 4), true))).toEqual([
    ["out", "a", "2026-11-23T14:00:00.000Z"],
    ["out", "b", "2026-11-23T14:00:01.000Z"],
  ]);
});
