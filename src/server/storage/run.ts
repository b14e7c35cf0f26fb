/**
 * Runs a host tool (lsblk, cryptsetup, ip, restic …) as a child process with the caller's abort
 * signal, bounded output, optional stdin and extra pipes (for secrets: a secret goes through a
 * pipe, never argv or the environment), and maps "not installed" to UNAVAILABLE naming the tool.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { PiccoloError } from "../errors.js";

/** What a tool run produced. */
export interface ToolResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** Options of runTool. */
export interface RunOptions {
  /** Written to the tool's stdin, which is then closed. */
  readonly input?: string | Buffer;
  /** Data for extra pipes: index 0 becomes fd 3, index 1 fd 4 …; each is written and closed. */
  readonly fds?: readonly (string | Buffer)[];
  readonly env?: NodeJS.ProcessEnv;
  readonly signal?: AbortSignal;
  /** Most stdout bytes kept; more fails the run. Default 64 MiB. */
  readonly maxOutput?: number;
  /** Called with each stdout chunk as it arrives (the chunk is kept in `stdout` too unless `discardStdout`). */
  readonly onStdout?: (chunk: Buffer) => void;
  /** Do not keep stdout (for tools that stream a lot of progress). */
  readonly discardStdout?: boolean;
  /** Signal sent to the child when `signal` aborts; default SIGTERM. */
  readonly killSignal?: NodeJS.Signals;
  /** Called once the child is spawned (e.g. to journal its pid). */
  readonly onSpawn?: (child: ChildProcess) => void;
}

/** The host tool could not be run at all. */
export function toolMissing(tool: string, hint: string, cause?: unknown): PiccoloError {
  return new PiccoloError("unavailable", `${tool} is unavailable (${(cause as Error)?.message ?? "not found"}); ${hint}`, {
    reason: "HOST_PART_UNAVAILABLE",
    cause,
  });
}

/** Runs `cmd args`; resolves with its exit code and output (never rejects on a non-zero exit). */
export function runTool(cmd: string, args: readonly string[], options: RunOptions = {}, hint = "install it on the host"): Promise<ToolResult> {
  const max = options.maxOutput ?? 64 * 1024 * 1024;
  return new Promise((resolve, reject) => {
    if (options.signal?.aborted) {
      reject(new PiccoloError("cancelled", "the call was cancelled"));
      return;
    }
    const extra = options.fds ?? [];
    const child = spawn(cmd, [...args], {
      stdio: ["pipe", "pipe", "pipe", ...extra.map(() => "pipe" as const)],
      env: options.env ?? process.env,
      signal: options.signal,
      killSignal: options.killSignal ?? "SIGTERM",
    });
    const out: Buffer[] = [];
    let outBytes = 0;
    let err = "";
    let failed: Error | undefined;
    child.stdout!.on("data", (d: Buffer) => {
      options.onStdout?.(d);
      if (options.discardStdout) return;
      outBytes += d.length;
      if (outBytes > max && !failed) {
        failed = new PiccoloError("internal", `${cmd} wrote more than ${max} bytes`);
        child.kill("SIGKILL");
      } else out.push(d);
    });
    child.stderr!.on("data", (d: Buffer) => {
      if (err.length < 1024 * 1024) err += d.toString();
    });
    child.on("spawn", () => options.onSpawn?.(child));
    child.on("error", (e: NodeJS.ErrnoException) => {
      if (e.name === "AbortError") failed ??= new PiccoloError("cancelled", "the call was cancelled", { cause: e });
      else if (e.code === "ENOENT" || e.code === "EACCES") failed ??= toolMissing(cmd, hint, e);
      else failed ??= e;
    });
    child.on("close", (code, sig) => {
      if (failed) reject(failed);
      else resolve({ code: code ?? (sig ? 128 : -1), stdout: Buffer.concat(out).toString("utf8"), stderr: err });
    });
    child.stdin!.on("error", () => undefined);
    child.stdin!.end(options.input ?? "");
    extra.forEach((data, i) => {
      const s = child.stdio[3 + i] as NodeJS.WritableStream & { on(e: "error", f: () => void): void };
      s.on("error", () => undefined);
      s.end(data);
    });
  });
}

/** Runs a tool and returns stdout; a non-zero exit becomes `onFail(result)` (default: internal error with stderr). */
export async function runToolOk(
  cmd: string,
  args: readonly string[],
  options: RunOptions = {},
  onFail?: (r: ToolResult) => Error,
  hint?: string,
): Promise<string> {
  const r = await runTool(cmd, args, options, hint);
  if (r.code !== 0) {
    throw onFail?.(r) ?? new PiccoloError("internal", `${cmd} ${args[0] ?? ""} failed (exit ${r.code}): ${r.stderr.trim().slice(0, 2000)}`);
  }
  return r.stdout;
}
