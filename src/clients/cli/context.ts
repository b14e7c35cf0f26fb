/** What every piccoloctl command gets: the API, the global options and where to write. */
import type { PiccoloApi } from "./api.js";
import type { TextSink } from "./progress.js";

/** The global options, after parsing. */
export interface GlobalOptions {
  readonly endpoint: string;
  readonly token?: string;
  /** A file holding the token. */
  readonly tokenFile?: string;
  /** SHA-256 fingerprint of the daemon's TLS certificate to pin. */
  readonly tlsFingerprint?: string;
  /** The daemon's TLS certificate (PEM file) to pin. */
  readonly tlsCa?: string;
  /** gRPC over TCP without TLS (development daemons only). */
  readonly plaintext?: boolean;
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
  /** The environment (PICCOLO_PASSWORD for the auth commands). */
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Reads all of standard input (passwords). */
  readonly readStdin?: () => Promise<string>;
}
