/**
 * The git CLI as the task runner uses it: every call is `git -C <dir> …` with a fixed identity
 * for the commits piccolod makes, output read in bounded amounts, and the caller's abort signal.
 */
import { spawn } from "node:child_process";
import { PiccoloError } from "../errors.js";

/** A finished git call. */
export interface GitResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

const MAX_OUTPUT = 1024 * 1024;

/** The identity of commits piccolod makes (the repository's own is not assumed to be set). */
export const GIT_IDENTITY = ["-c", "user.name=piccolod", "-c", "user.email=piccolod@localhost", "-c", "commit.gpgsign=false"];

/** Runs git in `dir`; resolves with its exit code and output (never rejects on a non-zero exit). */
export function git(dir: string, args: readonly string[], signal?: AbortSignal, bin = "git"): Promise<GitResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, ["-C", dir, ...GIT_IDENTITY, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      signal,
      env: { ...process.env, GIT_TERMINAL_PROMPT: "0", GIT_EDITOR: "true", LC_ALL: "C" },
    });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => {
      if (stdout.length < MAX_OUTPUT) stdout += d.toString();
    });
    child.stderr.on("data", (d: Buffer) => {
      if (stderr.length < MAX_OUTPUT) stderr += d.toString();
    });
    child.on("error", (e) => {
      if (e.name === "AbortError") reject(e);
      else reject(new PiccoloError("unavailable", `git could not be run (${e.message}); install git`, { reason: "HOST_PART_UNAVAILABLE" }));
    });
    child.on("close", (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

/** Runs git and returns its trimmed stdout; a non-zero exit is an internal error naming the call. */
export async function gitOk(dir: string, args: readonly string[], signal?: AbortSignal): Promise<string> {
  const r = await git(dir, args, signal);
  if (r.code !== 0) {
    throw new PiccoloError("internal", `git ${args.join(" ")} in ${dir} failed (${r.code}): ${(r.stderr || r.stdout).trim().slice(0, 500)}`);
  }
  return r.stdout.trim();
}

/** Whether `branch` is a branch name git accepts. */
export async function validBranchName(name: string): Promise<boolean> {
  if (name === "" || name.length > 200 || name.startsWith("-")) return false;
  return (await git("/", ["check-ref-format", "--branch", name])).code === 0;
}

/** Whether refs/heads/<branch> exists. */
export async function branchExists(dir: string, branch: string, signal?: AbortSignal): Promise<boolean> {
  return (await git(dir, ["show-ref", "--verify", "--quiet", `refs/heads/${branch}`], signal)).code === 0;
}
