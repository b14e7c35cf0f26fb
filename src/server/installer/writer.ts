/**
 * The write path: streams the decompressed image onto the target in large aligned writes with a
 * few in flight, hashing each block while the kernel writes the previous ones, and holds back the
 * first MiB (protective MBR and primary GPT) so it can be written last. Then the read-back pass.
 */
import { createHash } from "node:crypto";
import type { FileHandle } from "node:fs/promises";
import type { Readable } from "node:stream";
import { PiccoloError } from "../errors.js";
import { HEAD_BYTES } from "./gpt.js";

/** Size of one write; a multiple of every sector and page size. */
export const BLOCK_BYTES = 4 << 20;
/** Writes in flight: one being written while the next is hashed; more only contend for the inode. */
const DEPTH = 2;

async function writeFully(fh: FileHandle, buf: Buffer, position: number): Promise<void> {
  let off = 0;
  while (off < buf.length) {
    const { bytesWritten } = await fh.write(buf, off, buf.length - off, position + off);
    if (bytesWritten <= 0) throw new Error(`short write at byte ${position + off}`);
    off += bytesWritten;
  }
}

/** Writes zeros over [offset, offset + length). */
export async function zeroRange(fh: FileHandle, offset: number, length: number): Promise<void> {
  const z = Buffer.alloc(Math.min(length, BLOCK_BYTES));
  for (let o = 0; o < length; o += z.length) await writeFully(fh, z.subarray(0, Math.min(z.length, length - o)), offset + o);
}

/** What writeImage did. */
export interface WriteResult {
  /** The image's first MiB, not yet written. */
  readonly head: Buffer;
  /** Bytes in the image. */
  readonly bytes: number;
  /** SHA-256 of the whole decompressed image, hex. */
  readonly sha256: string;
}

/** Options of writeImage. */
export interface WriteOptions {
  readonly source: Readable;
  readonly target: FileHandle;
  /** Largest image that fits the target, in bytes. */
  readonly capacity: number;
  readonly signal: AbortSignal;
  /** Called after each block is handed to the kernel, with the image bytes done. */
  readonly onProgress: (bytesDone: number) => void;
}

/**
 * Streams `source` onto the target from byte HEAD_BYTES on (the first MiB is returned, not
 * written), hashing everything. Does not sync; the caller does.
 */
export async function writeImage(o: WriteOptions): Promise<WriteResult> {
  const hash = createHash("sha256");
  const head = Buffer.alloc(HEAD_BYTES);
  const inflight: Promise<void>[] = [];
  let block = Buffer.allocUnsafe(BLOCK_BYTES);
  let fill = 0;
  let base = 0; // image offset of `block`
  let written = 0;

  const dispatch = async (buf: Buffer, at: number): Promise<void> => {
    if (at + buf.length > o.capacity) {
      throw new PiccoloError("failed_precondition", `the image is larger than the target (${o.capacity} bytes)`, { reason: "TARGET_TOO_SMALL" });
    }
    let data = buf;
    let pos = at;
    if (at < HEAD_BYTES) {
      const n = Math.min(HEAD_BYTES - at, buf.length);
      buf.copy(head, at, 0, n);
      data = buf.subarray(n);
      pos = at + n;
    }
    if (data.length > 0) {
      const p = writeFully(o.target, data, pos);
      p.catch(() => undefined);
      inflight.push(p);
    }
    hash.update(buf); // overlaps with the kernel doing the write
    while (inflight.length >= DEPTH) await inflight.shift();
    written = at + buf.length;
    o.onProgress(written);
  };

  try {
    for await (const chunk of o.source) {
      if (o.signal.aborted) throw o.signal.reason;
      let c = chunk as Buffer;
      // Whole aligned blocks straight from the reader (a raw image read in 4 MiB chunks): no copy.
      while (fill === 0 && c.length >= BLOCK_BYTES) {
        await dispatch(c.subarray(0, BLOCK_BYTES), base);
        base += BLOCK_BYTES;
        c = c.subarray(BLOCK_BYTES);
      }
      while (c.length > 0) {
        const n = Math.min(c.length, BLOCK_BYTES - fill);
        c.copy(block, fill, 0, n);
        fill += n;
        c = c.subarray(n);
        if (fill === BLOCK_BYTES) {
          await dispatch(block, base);
          base += BLOCK_BYTES;
          block = Buffer.allocUnsafe(BLOCK_BYTES);
          fill = 0;
        }
      }
    }
    if (fill > 0) await dispatch(block.subarray(0, fill), base);
    await Promise.all(inflight);
  } catch (e) {
    await Promise.allSettled(inflight);
    throw e;
  }
  if (written < HEAD_BYTES) {
    throw new PiccoloError("invalid_argument", `image: only ${written} bytes long, not a disk image`, { field: "spec.image_path" });
  }
  return { head, bytes: written, sha256: hash.digest("hex") };
}

/**
 * Reads the target back over [HEAD_BYTES, bytes) and returns the SHA-256 of `head` followed by
 * those bytes, to compare with WriteResult.sha256.
 */
export async function readBack(
  target: FileHandle,
  head: Buffer,
  bytes: number,
  signal: AbortSignal,
  onProgress: (bytesDone: number) => void,
): Promise<string> {
  const hash = createHash("sha256");
  hash.update(head.subarray(0, Math.min(head.length, bytes)));
  let bufs = [Buffer.allocUnsafe(BLOCK_BYTES), Buffer.allocUnsafe(BLOCK_BYTES)];
  let pos = HEAD_BYTES;
  const readAt = async (buf: Buffer, at: number): Promise<Buffer> => {
    const want = Math.min(BLOCK_BYTES, bytes - at);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await target.read(buf, got, want - got, at + got);
      if (bytesRead === 0) throw new PiccoloError("internal", `the target ended at byte ${at + got} while reading back`);
      got += bytesRead;
    }
    return buf.subarray(0, want);
  };
  let next: Promise<Buffer> | undefined = pos < bytes ? readAt(bufs[0]!, pos) : undefined;
  while (next) {
    if (signal.aborted) throw signal.reason;
    const cur = await next;
    const at = pos;
    pos += cur.length;
    bufs = [bufs[1]!, bufs[0]!];
    next = pos < bytes ? readAt(bufs[0]!, pos) : undefined; // read ahead while hashing
    hash.update(cur);
    onProgress(at + cur.length);
  }
  return hash.digest("hex");
}
