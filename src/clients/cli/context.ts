/** What every piccoloctl command gets: the API, the global options and where to write. */
import type { PiccoloApi } from "./api.js";
import type { TextSink } from "./progress.js";

/** The global options, after parsing. */
export interface GlobalOptions {
  readonly endpoint: string;
  readonly token?: string;
  readonly output: "text" | "json";
  readonly timeout?: number;
}

/** Where a command writes, and the signal that stops following a stream (Ctrl-C). */
export interface CommandContext {
  readonly api: PiccoloApi;
  readonly global: GlobalOptions;
  readonly stdout: TextSink;
  readonly stderr: TextSink;
  readonly signal: AbortSignal;
}
