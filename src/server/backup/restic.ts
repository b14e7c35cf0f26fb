/**
 * The adapter to restic: every call runs `restic -r LOCATION` with the repository password on
 * stdin (restic reads it from there when stdin is not a terminal), so the password is never in
 * argv or the environment, and with piccolod's own cache folder. JSON output is parsed line by
 * line; restic's progress lines reach the caller as they come.
 */
import type { ChildProcess } from "node:child_process";
import { PiccoloError } from "../errors.js";
import { runTool, type ToolResult } from "../storage/run.js";

const HINT = "install restic (Debian package restic; shipped in the piccolod sysext on Flatcar)";

/** A `restic backup --json` status line. */
export interface BackupStatus {
  message_type: "status";
  percent_done?: number;
  total_files?: number;
  files_done?: number;
  total_bytes?: number;
  bytes_done?: number;
  current_files?: string[];
}

/** The `restic backup --json` summary line. */
export interface BackupSummary {
  message_type: "summary";
  files_new: number;
  files_changed: number;
  files_unmodified: number;
  data_added: number;
  total_files_processed: number;
  total_bytes_processed: number;
  snapshot_id: string;
}

/** A snapshot as `restic snapshots --json` prints it. */
export interface ResticSnapshot {
  id: string;
  short_id: string;
  time: string;
  hostname: string;
  paths: string[];
  tags?: string[] | null;
  parent?: string;
}

/** One group of `restic forget --json`. */
export interface ForgetGroup {
  keep: ResticSnapshot[] | null;
  remove: ResticSnapshot[] | null;
}

/** Options of one restic run. */
export interface ResticRunOptions {
  readonly signal?: AbortSignal;
  /** Each JSON object restic prints, as it prints it. */
  readonly onJson?: (value: Record<string, unknown>) => void;
  readonly onSpawn?: (child: ChildProcess) => void;
}

/** A connection to one repository. */
export interface Restic {
  readonly location: string;
  /** Runs restic with the global flags; resolves to its result (never rejects on a non-zero exit). */
  run(args: readonly string[], options?: ResticRunOptions): Promise<ToolResult>;
  /** Runs restic and fails with restic's own words on a non-zero exit. */
  ok(args: readonly string[], options?: ResticRunOptions): Promise<string>;
  snapshots(signal?: AbortSignal): Promise<ResticSnapshot[]>;
}

/** Options of createRestic. */
export interface ResticOptions {
  readonly location: string;
  readonly password: () => Promise<Buffer>;
  readonly cacheDir: string;
  readonly bin?: string;
}

/** Maps restic's failure text to a PiccoloError. */
export function resticError(args: readonly string[], r: ToolResult): PiccoloError {
  const text = (r.stderr.trim() || r.stdout.trim()).split("\n").slice(-8).join("\n");
  if (/wrong password|no key found/i.test(text)) {
    return new PiccoloError("failed_precondition", `the repository refused the password piccolod has sealed for it: ${text}`, { reason: "WRONG_PASSWORD" });
  }
  if (/unable to open config file|Is there a repository at the following location/i.test(text)) {
    return new PiccoloError("failed_precondition", `there is no restic repository there: ${text}`, { reason: "NO_REPOSITORY" });
  }
  if (/repository is already locked/i.test(text)) {
    return new PiccoloError("failed_precondition", `the repository is locked by another restic run: ${text}`, { reason: "REPOSITORY_LOCKED" });
  }
  if (/connection refused|no such host|dial tcp/i.test(text)) {
    return new PiccoloError("unavailable", `the restic repository server is unreachable: ${text}`, { reason: "HOST_PART_UNAVAILABLE" });
  }
  return new PiccoloError("internal", `restic ${args[0] ?? ""} failed (exit ${r.code}): ${text}`);
}

/** Creates the adapter for one repository. */
export function createRestic(o: ResticOptions): Restic {
  const bin = o.bin ?? "restic";
  // Unsealed once per adapter (one per operation), not once per restic run.
  let password: Promise<Buffer> | undefined;
  const self: Restic = {
    location: o.location,
    async run(args, ro = {}) {
      password ??= o.password();
      password.catch(() => (password = undefined));
      const secret = await password;
      let buf = "";
      const onStdout = ro.onJson
        ? (chunk: Buffer): void => {
            buf += chunk.toString("utf8");
            let nl: number;
            while ((nl = buf.indexOf("\n")) >= 0) {
              const line = buf.slice(0, nl).trim();
              buf = buf.slice(nl + 1);
              if (!line.startsWith("{")) continue;
              try {
                ro.onJson!(JSON.parse(line) as Record<string, unknown>);
              } catch {
                // not a JSON line (restic prints a few plain ones)
              }
            }
          }
        : undefined;
      const env = { ...process.env };
      for (const k of Object.keys(env)) if (k.startsWith("RESTIC_")) delete env[k];
      // A few JSON status lines a second are enough for Operation progress.
      env["RESTIC_PROGRESS_FPS"] = "4";
      return runTool(
        bin,
        ["-r", o.location, "--cache-dir", o.cacheDir, ...args],
        {
          input: Buffer.concat([secret, Buffer.from("\n")]),
          env,
          signal: ro.signal,
          killSignal: "SIGINT",
          onStdout,
          discardStdout: ro.onJson !== undefined,
          onSpawn: ro.onSpawn,
        },
        HINT,
      );
    },
    async ok(args, ro) {
      const r = await self.run(args, ro);
      if (r.code !== 0) throw resticError(args, r);
      return r.stdout;
    },
    async snapshots(signal) {
      const out = await self.ok(["snapshots", "--json"], { signal });
      const start = out.indexOf("[");
      return JSON.parse(start >= 0 ? out.slice(start) : "[]") as ResticSnapshot[];
    },
  };
  return self;
}
