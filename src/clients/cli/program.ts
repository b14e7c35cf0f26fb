/**
 * piccoloctl's command line on commander: version, health, diagnostics and ops list/get/watch/cancel,
 * with the global --endpoint, --token, --output and --timeout options. runCli() parses a command
 * line, runs it and returns the exit code, so it can be driven without a process. The commands
 * themselves (commands.ts) are loaded only when one runs.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import type { CommandContext, GlobalOptions } from "./commands.js";
import type { TextSink } from "./progress.js";

/** The default endpoint when neither --endpoint nor PICCOLO_ENDPOINT is given. */
export const DEFAULT_ENDPOINT = "unix:///run/piccolod/piccolod.sock";

/** What the CLI reads and writes; main.ts passes the process's. */
export interface CliIo {
  readonly stdout: TextSink;
  readonly stderr: TextSink;
  /** Environment (PICCOLO_ENDPOINT, PICCOLO_TOKEN). */
  readonly env: Readonly<Record<string, string | undefined>>;
  /** Registers a Ctrl-C handler for the duration of a command; returns the unregister function. */
  readonly onInterrupt?: (handler: () => void) => () => void;
}

/** An integer option parser with bounds; commander reports its message as a usage error. */
export function intOption(name: string, min: number, max: number): (value: string) => number {
  return (value) => {
    if (!/^\d+$/.test(value.trim())) throw new InvalidArgumentError(`${name} must be a whole number from ${min} to ${max}.`);
    const n = Number(value);
    if (n < min || n > max) throw new InvalidArgumentError(`${name} must be from ${min} to ${max}.`);
    return n;
  };
}

type Commands = typeof import("./commands.js");

/** Builds the command tree; each command reports its exit code through `setExitCode`. */
export function createProgram(io: CliIo, setExitCode: (code: number) => void): Command {
  const program = new Command("piccoloctl");
  program
    .description("Control piccolod, the root daemon of Piccolo OS, over gRPC or its REST gateway.")
    .addOption(
      new Option("--endpoint <endpoint>", "unix:///path.sock or host:port (gRPC), or http://host:port (REST gateway)").default(
        io.env["PICCOLO_ENDPOINT"] || DEFAULT_ENDPOINT,
        `$PICCOLO_ENDPOINT, else ${DEFAULT_ENDPOINT}`,
      ),
    )
    .addOption(
      new Option("--token <token>", "bearer token sent with every call (default: $PICCOLO_TOKEN)").default(io.env["PICCOLO_TOKEN"] || undefined),
    )
    .addOption(new Option("-o, --output <format>", "output format").choices(["text", "json"]).default("text"))
    .addOption(
      new Option("--timeout <ms>", "deadline of each call in ms (default 30000 for calls, none for streams; 0 for none)").argParser(
        intOption("--timeout", 0, 86_400_000),
      ),
    )
    .showHelpAfterError("(run piccoloctl --help for usage)")
    .exitOverride()
    .configureOutput({
      writeOut: (s) => void io.stdout.write(s),
      writeErr: (s) => void io.stderr.write(s),
      outputError: (s, write) => write(`piccoloctl: ${s.replace(/^error: /, "")}`),
    });

  /**
   * Loads the commands, connects, runs `work` and records the exit code. When `follows` (a
   * stream), Ctrl-C aborts the command's signal instead of ending the process.
   */
  const run = async (cmd: Command, work: (m: Commands, c: CommandContext) => Promise<number>, follows = false): Promise<void> => {
    const global = cmd.optsWithGlobals<GlobalOptions>();
    const m = await import("./commands.js");
    const api = m.connectApi({ endpoint: global.endpoint, token: global.token || undefined, timeoutMs: global.timeout });
    const ac = new AbortController();
    const off = follows ? io.onInterrupt?.(() => ac.abort()) : undefined;
    try {
      setExitCode(await work(m, { api, global, stdout: io.stdout, stderr: io.stderr, signal: ac.signal }));
    } finally {
      off?.();
      api.close();
    }
  };

  program
    .command("version")
    .description("show the daemon's version and the host's operating system")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.versionCommand(c)));

  program
    .command("health")
    .description("run the quick health checks (exit code 1 when unhealthy)")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.healthCommand(c)));

  program
    .command("diagnostics")
    .description("run the deeper diagnostics as an operation and follow it to the end")
    .option("--write-probe-mib <n>", "size of the state folder write probe in MiB (1-4096; default 64)", intOption("--write-probe-mib", 1, 4096))
    .option("--detach", "print the operation id once it has started and exit; it keeps running")
    .action((opts: { writeProbeMib?: number; detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.diagnosticsCommand(c, opts), true));

  const ops = program.command("ops").description("list, inspect, watch and cancel long-running operations");

  ops
    .command("list")
    .description("list operations, newest first")
    .option("--kind <kind>", 'only this kind, e.g. "system.diagnostics"')
    .option("--state <state>", "only this state: pending, running, succeeded, failed, cancelled or interrupted")
    .option("--limit <n>", "at most this many operations (default 50)", intOption("--limit", 1, 100_000))
    .action((opts: { kind?: string; state?: string; limit?: number }, cmd: Command) => run(cmd, (m, c) => m.opsListCommand(c, opts)));

  ops
    .command("get")
    .description("show one operation")
    .argument("<id>", "operation id")
    .action((id: string, _o, cmd: Command) => run(cmd, (m, c) => m.opsGetCommand(c, id)));

  ops
    .command("watch")
    .description("follow an operation to its end, re-attaching after a dropped connection or a daemon restart")
    .argument("<id>", "operation id")
    .option("--after <n>", "only events after this sequence number (default 0: the whole history)", intOption("--after", 0, Number.MAX_SAFE_INTEGER))
    .action((id: string, opts: { after?: number }, cmd: Command) => run(cmd, (m, c) => m.opsWatchCommand(c, id, opts), true));

  ops
    .command("cancel")
    .description("ask a running operation to stop (it ends CANCELLED once it has cleaned up)")
    .argument("<id>", "operation id")
    .action((id: string, _o, cmd: Command) => run(cmd, (m, c) => m.opsCancelCommand(c, id)));

  return program;
}

/** Parses `args` (without node and the script), runs the command and returns the exit code. */
export async function runCli(args: readonly string[], io: CliIo): Promise<number> {
  let code = 0;
  const program = createProgram(io, (c) => (code = c));
  try {
    await program.parseAsync([...args], { from: "user" });
    return code;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    const { describeError } = await import("./errors.js");
    const d = describeError(err, program.opts<Partial<GlobalOptions>>().endpoint ?? DEFAULT_ENDPOINT);
    io.stderr.write(`piccoloctl: ${d.text}\n`);
    return d.exitCode;
  }
}
