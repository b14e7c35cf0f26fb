/** Runs the installer's host tools (sgdisk, cryptsetup, debugfs, …) with bounded output and the operation's abort signal. */
import { spawn } from "node:child_process";
import { PiccoloError, unavailable } from "../errors.js";

/** What a finished tool run printed. */
export interface RunResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Options of run(). */
export interface RunOptions {
  readonly signal?: AbortSignal;
  /** Written to stdin, then stdin is closed (secrets go here, never into arguments). */
  readonly input?: string | Uint8Array;
  /** Extra environment variables. */
  readonly env?: Readonly<Record<string, string>>;
  /** Resolve with a non-zero code instead of throwing. */
  readonly allowFailure?: boolean;
}

const KEEP = 256 * 1024;

/** Runs a tool; a missing binary is UNAVAILABLE naming it, a non-zero exit an internal error with its stderr. */
export function run(bin: string, args: readonly string[], o: RunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, {
      stdio: ["pipe", "pipe", "pipe"],
      signal: o.signal,
      env: o.env ? { ...process.env, ...o.env } : process.env,
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-KEEP)));
    child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-KEEP)));
    child.stdin.on("error", () => undefined);
    child.stdin.end(o.input ?? "");
    child.on("error", (e: NodeJS.ErrnoException) => reject(e.code === "ENOENT" ? unavailable(`${bin} (install it on the host)`, e) : e));
    child.on("close", (code, sig) => {
      const r = { code: code ?? (sig ? 128 : 1), stdout: out, stderr: err };
      if (r.code !== 0 && !o.allowFailure) {
        reject(new PiccoloError("internal", `${bin} ${args[0] ?? ""} failed (exit ${r.code}): ${(err || out).trim().split("\n").slice(-3).join(" / ")}`));
      } else resolve(r);
    });
  });
}
