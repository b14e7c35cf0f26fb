#!/usr/bin/env node
/**
 * piccoloctl's entry point: runs the command line against the process's streams and environment,
 * lets Ctrl-C stop following a stream (the operation keeps running), and exits with the
 * command's code once the output is flushed.
 */
import { runCli } from "./program.js";

const flushed = (s: NodeJS.WriteStream): Promise<void> => new Promise((resolve) => s.write("", () => resolve()));

/** Runs piccoloctl with the process's arguments and exits. */
async function main(): Promise<void> {
  // A closed pipe (e.g. `piccoloctl ops watch … | head`) is not an error worth a stack trace.
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") process.exit(process.exitCode ?? 0);
  });
  let code: number;
  try {
    code = await runCli(process.argv.slice(2), {
      stdout: process.stdout,
      stderr: process.stderr,
      env: process.env,
      readStdin: async () => {
        const chunks: Buffer[] = [];
        for await (const c of process.stdin) chunks.push(c as Buffer);
        return Buffer.concat(chunks).toString("utf8");
      },
      onInterrupt: (handler) => {
        let count = 0;
        const onSigint = (): void => {
          // A second Ctrl-C while stopping quits at once.
          if (++count > 1) process.exit(130);
          handler();
        };
        process.on("SIGINT", onSigint);
        return () => void process.off("SIGINT", onSigint);
      },
    });
  } catch (err) {
    process.stderr.write(`piccoloctl: internal error: ${(err as Error).stack ?? String(err)}\n`);
    code = 70;
  }
  process.exitCode = code;
  await Promise.all([flushed(process.stdout), flushed(process.stderr)]);
  // Do not wait for idle channels or timers to wind down.
  process.exit(code);
}

void main();
