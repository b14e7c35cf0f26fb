/**
 * Resumable download of a release file (an update payload or an install image): bytes go to
 * `<dest>.part` and, in order, to the caller's tap when it has one (hashes, gpgv); a dropped
 * connection or a 5xx answer is retried with `Range: bytes=N-` from where it stopped, and a `.part`
 * left by an earlier attempt is kept and continued (read through the tap first, when there is one).
 * The finished file is renamed to `dest`. Honours the abort signal.
 */
import { open, rename, stat } from "node:fs/promises";
import { PiccoloError } from "../errors.js";

/** Options of download(). */
export interface DownloadOptions {
  readonly url: string;
  readonly dest: string;
  /** Expected size from the manifest. */
  readonly size: number;
  readonly headers?: Readonly<Record<string, string>>;
  /** Attempts after the first. */
  readonly retries: number;
  readonly signal: AbortSignal;
  /** Gets every byte of the file in order, exactly once (none: the file is checked once it is whole). */
  tap?(chunk: Buffer): Promise<void> | void;
  progress(done: number, total: number, note?: string): void;
  /** Delay before retry n (1-based), ms. */
  readonly backoffMs?: (n: number) => number;
  /** No data for this long ends an attempt. */
  readonly idleMs?: number;
}

/** The outcome: how many attempts it took and how many bytes were resumed. */
export interface DownloadResult {
  readonly attempts: number;
  readonly resumedFrom: number;
}

class Retryable extends Error {}

/** Downloads `url` to `dest`; throws PiccoloError("unavailable") naming the server and the byte it stopped at. */
export async function download(o: DownloadOptions): Promise<DownloadResult> {
  const part = `${o.dest}.part`;
  let have = 0;
  try {
    have = (await stat(part)).size;
  } catch {
    have = 0;
  }
  if (have > o.size) have = 0;
  const fh = await open(part, have > 0 ? "r+" : "w", 0o600);
  const resumedFrom = have;
  try {
    if (have > 0) o.progress(have, o.size, `resuming an earlier download at byte ${have}`);
    if (have > 0 && o.tap) {
      // Feed what an earlier attempt left through the tap, then continue after it.
      const buf = Buffer.alloc(1 << 20);
      let pos = 0;
      while (pos < have) {
        o.signal.throwIfAborted();
        const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, have - pos), pos);
        if (bytesRead === 0) break;
        await o.tap(Buffer.from(buf.subarray(0, bytesRead)));
        pos += bytesRead;
        o.progress(pos, o.size, "resuming an earlier download");
      }
    }
    await fh.truncate(have);
    const st = { have };
    let attempts = 0;
    let lastError = "";
    for (;;) {
      attempts++;
      o.signal.throwIfAborted();
      try {
        await attempt(o, fh, st);
        have = st.have;
        break;
      } catch (e) {
        if (o.signal.aborted) throw o.signal.reason;
        have = st.have;
        if (!(e instanceof Retryable)) throw e;
        lastError = e.message;
        if (attempts > o.retries) {
          throw new PiccoloError(
            "unavailable",
            `download of ${o.url} failed after ${attempts} attempts at byte ${have} of ${o.size}: ${lastError}; the ${have} bytes received are kept in ${part} and resumed next time`,
            { reason: "HOST_PART_UNAVAILABLE" },
          );
        }
        o.progress(have, o.size, `attempt ${attempts} failed (${lastError}); retrying from byte ${have}`);
        const wait = o.backoffMs?.(attempts) ?? Math.min(8000, 500 * 2 ** (attempts - 1));
        await new Promise((r) => setTimeout(r, wait));
      }
    }
    await fh.sync();
    await fh.close();
    await rename(part, o.dest);
    return { attempts, resumedFrom };
  } catch (e) {
    await fh.close().catch(() => undefined);
    throw e;
  }
}

async function attempt(o: DownloadOptions, fh: import("node:fs/promises").FileHandle, st: { have: number }): Promise<void> {
  const from = st.have;
  const ac = new AbortController();
  const signal = AbortSignal.any([o.signal, ac.signal]);
  let idle: NodeJS.Timeout | undefined;
  const arm = (): void => {
    clearTimeout(idle);
    idle = setTimeout(() => ac.abort(new Retryable(`no data for ${(o.idleMs ?? 30_000) / 1000} s`)), o.idleMs ?? 30_000);
  };
  try {
    arm();
    let res: Response;
    try {
      res = await fetch(o.url, { headers: { ...o.headers, ...(from > 0 ? { range: `bytes=${from}-` } : {}) }, signal, redirect: "follow" });
    } catch (e) {
      if (o.signal.aborted) throw o.signal.reason;
      throw new Retryable(`cannot connect (${(e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message})`);
    }
    if (res.status >= 500 || res.status === 429 || res.status === 408) {
      await res.body?.cancel();
      throw new Retryable(`the server answered HTTP ${res.status}`);
    }
    if (res.status !== 200 && res.status !== 206) {
      await res.body?.cancel();
      throw new PiccoloError("unavailable", `download of ${o.url} answered HTTP ${res.status}`, { reason: "HOST_PART_UNAVAILABLE" });
    }
    // A 200 to a ranged request starts at 0: skip what the taps already had.
    let skip = 0;
    if (from > 0 && res.status === 200) skip = from;
    if (res.status === 206) {
      const cr = /^bytes (\d+)-/.exec(res.headers.get("content-range") ?? "");
      if (!cr || Number(cr[1]) !== from) {
        await res.body?.cancel();
        throw new Retryable(`the server resumed at ${cr?.[1] ?? "?"} instead of byte ${from}`);
      }
    }
    if (!res.body) throw new Retryable("the answer has no body");
    // Network chunks are small; write and tap them in batches of about 1 MiB, the file write and
    // the taps (hashes, gpgv) side by side.
    let batch: Buffer[] = [];
    let batched = 0;
    const flush = async (): Promise<void> => {
      if (batched === 0) return;
      const buf = batch.length === 1 ? batch[0]! : Buffer.concat(batch, batched);
      batch = [];
      batched = 0;
      await Promise.all([fh.write(buf, 0, buf.length, st.have), o.tap?.(buf)]);
      st.have += buf.length;
      o.progress(st.have, o.size);
    };
    try {
      for await (const raw of res.body as unknown as AsyncIterable<Uint8Array>) {
        arm();
        let chunk = Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
        if (skip > 0) {
          const n = Math.min(skip, chunk.length);
          skip -= n;
          chunk = chunk.subarray(n);
          if (chunk.length === 0) continue;
        }
        if (st.have + batched + chunk.length > o.size) {
          throw new PiccoloError("failed_precondition", `the server sent more than the manifest's ${o.size} bytes; the payload does not match its manifest`);
        }
        batch.push(chunk);
        batched += chunk.length;
        if (batched >= 1 << 20) await flush();
      }
      await flush();
    } catch (e) {
      // Keep what arrived before the break: it was received whole.
      if (!(e instanceof PiccoloError)) await flush().catch(() => undefined);
      if (e instanceof PiccoloError) throw e;
      if (o.signal.aborted) throw o.signal.reason;
      if (ac.signal.aborted && ac.signal.reason instanceof Retryable) throw ac.signal.reason;
      throw new Retryable(`the connection broke (${(e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message})`);
    }
    if (st.have < o.size) throw new Retryable(`the server ended the answer at byte ${st.have}`);
  } finally {
    clearTimeout(idle);
  }
}
