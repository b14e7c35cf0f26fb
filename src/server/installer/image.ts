/**
 * Install images: what compression a file has (by its magic bytes, not its name), a stream of its
 * decompressed bytes (gzip in-process; bzip2 and zstd through their tools, as Node 20 has neither),
 * and the first MiB of that stream, from which the plan reads the image's GPT.
 */
import { spawn } from "node:child_process";
import { createReadStream } from "node:fs";
import { open } from "node:fs/promises";
import type { Readable } from "node:stream";
import { createGunzip } from "node:zlib";
import { PiccoloError, unavailable } from "../errors.js";
import { HEAD_BYTES } from "./gpt.js";

/** Compression of an image file. */
export type Compression = "none" | "gzip" | "bzip2" | "zstd";

/** Reads the magic bytes of a file. */
export async function detectCompression(path: string): Promise<Compression> {
  const fh = await open(path, "r");
  try {
    const b = Buffer.alloc(4);
    await fh.read(b, 0, 4, 0);
    if (b[0] === 0x1f && b[1] === 0x8b) return "gzip";
    if (b.toString("latin1", 0, 3) === "BZh") return "bzip2";
    if (b.readUInt32LE(0) === 0xfd2fb528) return "zstd";
    return "none";
  } finally {
    await fh.close();
  }
}

/** A decompressed byte stream and a way to learn whether the decompressor failed. */
export interface ImageStream {
  readonly stream: Readable;
  /** Resolves once the decompressor exited cleanly; rejects with its error. */
  readonly done: Promise<void>;
}

const READ_CHUNK = 4 << 20;

/** Opens the decompressed bytes of an image file. */
export function openImage(path: string, compression: Compression, signal?: AbortSignal): ImageStream {
  const file = createReadStream(path, { highWaterMark: READ_CHUNK, signal });
  // Errors reach the consumer through its iterator and `done`; these keep a late one (after the
  // consumer stopped reading) from becoming an uncaught exception.
  file.on("error", () => undefined);
  if (compression === "none") {
    const done = new Promise<void>((res, rej) => file.once("end", res).once("error", rej));
    done.catch(() => undefined);
    return { stream: file, done };
  }
  if (compression === "gzip") {
    const gz = createGunzip({ chunkSize: 1 << 20 });
    gz.on("error", () => undefined);
    file.on("error", (e) => gz.destroy(e));
    file.pipe(gz);
    const done = new Promise<void>((res, rej) => gz.once("end", res).once("error", (e) => rej(new PiccoloError("invalid_argument", `image: not a valid gzip stream (${e.message})`, { field: "spec.image_path" }))));
    done.catch(() => undefined);
    return { stream: gz, done };
  }
  const bin = compression === "bzip2" ? "bzip2" : "zstd";
  const child = spawn(bin, ["-dc"], { stdio: ["pipe", "pipe", "pipe"], signal });
  let stderr = "";
  child.stderr.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4096)));
  child.stdin.on("error", () => undefined);
  child.stdout.on("error", () => undefined);
  child.on("error", () => undefined);
  file.on("error", (e) => child.stdout.destroy(e));
  file.pipe(child.stdin);
  const done = new Promise<void>((res, rej) => {
    child.once("error", (e: NodeJS.ErrnoException) => rej(e.code === "ENOENT" ? unavailable(`${bin} (needed for ${compression} images)`, e) : e));
    child.once("close", (code) =>
      code === 0 ? res() : rej(new PiccoloError("invalid_argument", `image: ${bin} could not decompress it (exit ${code}): ${stderr.trim()}`, { field: "spec.image_path" })),
    );
  });
  done.catch(() => undefined);
  return { stream: child.stdout, done };
}

/** The first MiB of the decompressed image (shorter when the image is). */
export async function readImageHead(path: string, compression: Compression): Promise<Buffer> {
  const ac = new AbortController();
  const { stream } = openImage(path, compression, ac.signal);
  stream.on("error", () => undefined);
  const parts: Buffer[] = [];
  let n = 0;
  try {
    for await (const c of stream) {
      parts.push(c as Buffer);
      n += (c as Buffer).length;
      if (n >= HEAD_BYTES) break;
    }
  } catch (e) {
    if (n < HEAD_BYTES) throw e;
  } finally {
    ac.abort();
    stream.destroy();
  }
  return Buffer.concat(parts).subarray(0, HEAD_BYTES);
}
