/**
 * piccoloctl's command line on commander: version, health, diagnostics, ops list/get/watch/cancel,
 * containers ls/get/create/run/start/stop/restart/rm/logs/stats/events, images
 * ls/pull/import/build/rm, update status/check/apply/rollback/reboot/config, tasks
 * run/list/get/cancel and tasks service create,
 * with the global --endpoint, --token, --output and --timeout options. runCli() parses a command
 * line, runs it and returns the exit code, so it can be driven without a process. The commands
 * themselves (commands.ts) are loaded only when one runs.
 */
import { Command, CommanderError, InvalidArgumentError, Option } from "commander";
import { addAuthCommands } from "./auth-program.js";
import type { CommandContext, GlobalOptions } from "./commands.js";
import type { TextSink } from "./progress.js";
import { addTrustCommands } from "./trust-program.js";
import { addBackupCommands, addNetworkCommands, addStorageCommands } from "./storage-program.js";

/** The default endpoint when neither --endpoint nor PICCOLO_ENDPOINT is given. */
export const DEFAULT_ENDPOINT = "unix:///run/piccolod/piccolod.sock";

/** What the CLI reads and writes; main.ts passes the process's. */
export interface CliIo {
  readonly stdout: TextSink;
  readonly stderr: TextSink;
  /** Environment (PICCOLO_ENDPOINT, PICCOLO_TOKEN, PICCOLO_TLS_FINGERPRINT, …). */
  readonly env: Readonly<Record<string, string | undefined>>;
  /** Reads all of standard input (passwords for `auth login` and `auth passwd`). */
  readonly readStdin?: () => Promise<string>;
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

/** Collects a repeatable option's values in order. */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
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
    .addOption(
      new Option("--token-file <file>", "read the bearer token from a file (default: $PICCOLO_TOKEN_FILE)").default(io.env["PICCOLO_TOKEN_FILE"] || undefined),
    )
    .addOption(
      new Option("--tls-fingerprint <sha256>", "pin the daemon's TLS certificate by its SHA-256 fingerprint (default: $PICCOLO_TLS_FINGERPRINT)").default(
        io.env["PICCOLO_TLS_FINGERPRINT"] || undefined,
      ),
    )
    .addOption(
      new Option("--tls-ca <file>", "pin the daemon's TLS certificate given as a PEM file (default: $PICCOLO_TLS_CA, else the host's /var/lib/piccolod/tls/cert.pem)").default(
        io.env["PICCOLO_TLS_CA"] || undefined,
      ),
    )
    .addOption(
      new Option("--plaintext", "gRPC over TCP without TLS, for a development daemon with insecurePlaintext (default: $PICCOLO_PLAINTEXT=1)").default(
        io.env["PICCOLO_PLAINTEXT"] === "1" || undefined,
      ),
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
    const api = m.connectApi(await m.resolveApiOptions(global));
    const ac = new AbortController();
    const off = follows ? io.onInterrupt?.(() => ac.abort()) : undefined;
    try {
      setExitCode(await work(m, { api, global, stdout: io.stdout, stderr: io.stderr, signal: ac.signal, env: io.env, readStdin: io.readStdin }));
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

  addContainerCommands(program, run);
  addTaskCommands(program, run);
  addTrustCommands(program, run);
  addUpdateCommands(program, run);
  addInstallCommands(program, run);
  addAuthCommands(program, run);
  addStorageCommands(program, run);
  addNetworkCommands(program, run);
  addBackupCommands(program, run);

  return program;
}

type Run = (cmd: Command, work: (m: Commands, c: CommandContext) => Promise<number>, follows?: boolean) => Promise<void>;

/** The spec flags shared by `containers create` and `containers run`. */
function specOptions(cmd: Command): Command {
  return cmd
    .argument("<name>", "container name")
    .argument("[command...]", "command and arguments after -- (instead of --cmd), replacing the image's CMD")
    .requiredOption("--image <ref>", "image reference (must be on the host: images pull/import/build it first)")
    .option("--cmd <command>", "command line replacing the image's CMD, split into words as a shell does (quotes group)")
    .option("--entrypoint <command>", "command line replacing the image's ENTRYPOINT")
    .option("-e, --env <KEY=VALUE>", "environment variable (repeatable)", collect)
    .option("-p, --publish <[hostaddr:]hostport:containerport[/proto]>", "publish a container port on the host (repeatable)", collect)
    .option("-v, --volume <hostpath:containerpath[:ro]>", "bind-mount a host path below a data root (repeatable)", collect)
    .option("--volume-name <name:containerpath[:ro]>", "mount a named volume (repeatable)", collect)
    .option("--restart <policy>", "restart policy: no, on-failure[:N], always or unless-stopped")
    .option("--cpus <n>", "CPU limit in CPUs, e.g. 0.5")
    .option("--memory <size>", "memory limit: bytes or a number with k, m or g, e.g. 512m")
    .option("-l, --label <KEY=VALUE>", "label (repeatable)", collect)
    .option("--network <network>", 'network: "none", "host", "bridge" or a network name (default: the engine\'s)');
}

/** `containers …` and `images …`. */
function addContainerCommands(program: Command, run: Run): void {
  const ctr = program.command("containers").description("manage the host's containers through the Docker engine");

  ctr
    .command("ls")
    .description("list containers, newest first (piccolod-managed ones unless -a)")
    .option("-a, --all", "also containers piccolod did not create")
    .action((opts: { all?: boolean }, cmd: Command) => run(cmd, (m, c) => m.containersListCommand(c, opts)));

  ctr
    .command("get")
    .description("show one container and its spec")
    .argument("<name>", "container name or id")
    .action((name: string, _o, cmd: Command) => run(cmd, (m, c) => m.containersGetCommand(c, name)));

  specOptions(ctr.command("create").description("create a container from an image without starting it")).action(
    (name: string, command: string[], opts: import("./containers.js").SpecOptions, cmd: Command) =>
      run(cmd, (m, c) => m.containersCreateCommand(c, name, opts, command)),
  );

  specOptions(
    ctr.command("run").description("make a container run: create and start it, start it if stopped, or leave it running (EnsureRunning)"),
  ).action((name: string, command: string[], opts: import("./containers.js").SpecOptions, cmd: Command) =>
    run(cmd, (m, c) => m.containersRunCommand(c, name, opts, command)),
  );

  ctr
    .command("start")
    .description("start a created or stopped container")
    .argument("<name>", "container name or id")
    .action((name: string, _o, cmd: Command) => run(cmd, (m, c) => m.containersStartCommand(c, name)));

  ctr
    .command("stop")
    .description("stop a container: its stop signal, then a kill after the grace period")
    .argument("<name>", "container name or id")
    .option("-t, --time <seconds>", "grace period before the kill (0-3600; default 10)", intOption("--time", 0, 3600))
    .action((name: string, opts: { time?: number }, cmd: Command) => run(cmd, (m, c) => m.containersStopCommand(c, name, opts)));

  ctr
    .command("restart")
    .description("stop a container (if it runs) and start it again")
    .argument("<name>", "container name or id")
    .option("-t, --time <seconds>", "grace period before the kill (0-3600; default 10)", intOption("--time", 0, 3600))
    .action((name: string, opts: { time?: number }, cmd: Command) => run(cmd, (m, c) => m.containersRestartCommand(c, name, opts)));

  ctr
    .command("rm")
    .description("remove a container")
    .argument("<name>", "container name or id")
    .option("-f, --force", "kill it first if it runs")
    .option("-v, --volumes", "also remove its anonymous volumes")
    .action((name: string, opts: { force?: boolean; volumes?: boolean }, cmd: Command) =>
      run(cmd, (m, c) => m.containersRemoveCommand(c, name, opts)),
    );

  ctr
    .command("logs")
    .description("print a container's output: stdout lines to stdout, stderr lines to stderr (-f: until Ctrl-C)")
    .argument("<name>", "container name or id")
    .option("-f, --follow", "keep printing new output until the container stops or Ctrl-C (exit code 130)")
    .option("--tail <n>", "only the last n lines", intOption("--tail", 0, 4_294_967_295))
    .option("--since <time>", "only output since a time (2024-05-01T12:00:00Z), Unix seconds or a duration ago (10m)")
    .option("-t, --timestamps", "prefix each line with the time the engine received it")
    .action((name: string, opts: { follow?: boolean; tail?: number; since?: string; timestamps?: boolean }, cmd: Command) =>
      run(cmd, (m, c) => m.containersLogsCommand(c, name, opts), true),
    );

  ctr
    .command("stats")
    .description("show a container's resource usage (one sample, or one a second with --stream until Ctrl-C)")
    .argument("<name>", "container name or id")
    .option("--stream", "keep sampling every second")
    .action((name: string, opts: { stream?: boolean }, cmd: Command) => run(cmd, (m, c) => m.containersStatsCommand(c, name, opts), true));

  ctr
    .command("events")
    .description("print container events as they happen, one line each, until Ctrl-C")
    .option("-a, --all", "also events of containers piccolod did not create")
    .option("--name <name>", "only events of this container")
    .option("--since <time>", "replay events since a time or a duration ago (10m) first")
    .action((opts: { all?: boolean; name?: string; since?: string }, cmd: Command) => run(cmd, (m, c) => m.containersEventsCommand(c, opts), true));

  const img = program.command("images").description("list, pull, import, build and remove the host's images");

  img
    .command("ls")
    .description("list images, newest first")
    .argument("[reference]", 'only images matching this pattern, e.g. "app" or "registry.example/*:1.*"')
    .action((reference: string | undefined, _o, cmd: Command) => run(cmd, (m, c) => m.imagesListCommand(c, reference)));

  img
    .command("pull")
    .description("pull an image from its registry as an operation, with progress")
    .argument("<reference>", "image reference (\":latest\" when it has no tag)")
    .option("--detach", "print the operation id once it has started and exit; it keeps running")
    .action((reference: string, opts: { detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.imagesPullCommand(c, reference, opts), true));

  img
    .command("import")
    .description("load an image from a tarball on the daemon's host (below a data root) as an operation")
    .argument("<path>", "absolute path of the tarball: a `docker save` archive, or a root filesystem with --rootfs")
    .option("--tag <reference>", "name of the image (required with --rootfs; for an archive, tags its one image)")
    .option("--rootfs", "the tarball is a root filesystem (as `docker import` takes it), not an image archive")
    .option("--detach", "print the operation id once it has started and exit; it keeps running")
    .action((path: string, opts: { tag?: string; rootfs?: boolean; detach?: boolean }, cmd: Command) =>
      run(cmd, (m, c) => m.imagesImportCommand(c, path, opts), true),
    );

  img
    .command("build")
    .description("build an image from a context folder or tarball on the daemon's host (below a data root) as an operation")
    .argument("<context>", "absolute path of the build context")
    .option("--dockerfile <path>", 'path of the Dockerfile inside the context (default "Dockerfile")')
    .option("-t, --tag <reference>", "tag for the result (repeatable; at least one)", collect)
    .option("--build-arg <KEY=VALUE>", "build argument (repeatable)", collect)
    .option("-l, --label <KEY=VALUE>", "label for the image (repeatable)", collect)
    .option("--no-cache", "build every step afresh")
    .option("--detach", "print the operation id once it has started and exit; it keeps running")
    .action(
      (
        context: string,
        opts: { dockerfile?: string; tag?: string[]; buildArg?: string[]; label?: string[]; cache?: boolean; detach?: boolean },
        cmd: Command,
      ) => run(cmd, (m, c) => m.imagesBuildCommand(c, context, { ...opts, noCache: opts.cache === false }), true),
    );

  img
    .command("rm")
    .description("untag an image, and delete it when no tag is left")
    .argument("<reference>", "image reference or id")
    .option("-f, --force", "even when containers use it or it has several tags")
    .action((reference: string, opts: { force?: boolean }, cmd: Command) => run(cmd, (m, c) => m.imagesRemoveCommand(c, reference, opts)));
}

/** `update …`: A/B OS updates through update_engine. */
function addUpdateCommands(program: Command, run: Run): void {
  const upd = program.command("update").description("OS updates: A/B USR slots, update_engine, rollback and reboot");

  upd
    .command("status")
    .description("show the booted slot and version, both slots' GPT flags, update_engine's status and the configuration")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.updateStatusCommand(c)));

  upd
    .command("check")
    .description("ask the update server for the newest version on the channel")
    .option("--channel <channel>", "another channel than the configured one")
    .action((opts: { channel?: string }, cmd: Command) => run(cmd, (m, c) => m.updateCheckCommand(c, opts)));

  upd
    .command("apply")
    .description("download, verify and install an update into the other slot as an operation, with live progress")
    .argument("[version]", 'version from the server (default "latest"), or the version of a local payload')
    .option("--payload <file>", "install a payload file on the daemon's host instead (piccolo-os-update-<v>.raw.gz)")
    .option("--signature <file>", "the payload's detached OpenPGP signature (.asc)")
    .option("--sha256 <hex>", "expected SHA-256 of a local payload")
    .option("--reboot", "reboot into the new version once it is installed")
    .option("--reboot-delay <seconds>", "wait this long before that reboot (0-3600)", intOption("--reboot-delay", 0, 3600))
    .option("--detach", "print the operation id once it has started and exit; it keeps running")
    .action((version: string | undefined, opts: import("./update.js").ApplyOptions, cmd: Command) =>
      run(cmd, (m, c) => m.updateApplyCommand(c, version, opts), true),
    );

  upd
    .command("rollback")
    .description("make the other slot the next boot (refused for a slot that never booted successfully, unless --force)")
    .option("--force", "also when that slot has never booted successfully (it gets one try)")
    .option("--reboot", "reboot at once afterwards")
    .option("--detach", "print the operation id once it has started and exit")
    .action((opts: { force?: boolean; reboot?: boolean; detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.updateRollbackCommand(c, opts), true));

  upd
    .command("reboot")
    .description("reboot the host through systemd-logind, now or after a delay")
    .argument("<reason>", "why; shown to logged-in users")
    .option("--delay <seconds>", "wait this long first (0-86400)", intOption("--delay", 0, 86_400))
    .action((reason: string, opts: { delay?: number }, cmd: Command) => run(cmd, (m, c) => m.updateRebootCommand(c, reason, opts)));

  upd
    .command("config")
    .description("change the update channel, server or signing keys (unset options keep their value)")
    .option("--channel <channel>", "update channel, e.g. stable")
    .option("--server <url>", "base URL of the Piccolo update server")
    .option("--signing-key <file>", "armored public key file, replacing all configured keys (repeatable)", collect)
    .action((opts: { channel?: string; server?: string; signingKey?: string[] }, cmd: Command) => run(cmd, (m, c) => m.updateConfigCommand(c, opts)));
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

/** The agent profile flags of `tasks run` and `tasks service create`. */
function profileOptions(cmd: Command): Command {
  return cmd
    .option("--image <image>", "agent image (already on the host: images import/build)")
    .option("--command <template>", 'agent command template; "{prompt}" is replaced, e.g. \'agent exec "{prompt}"\'')
    .option("--secret <name>", "sealed secret the agent gets as the file <secret-mount-path>/<name> (repeatable)", collect)
    .option("--cpus <n>", "CPU limit in CPUs, e.g. 1.5")
    .option("--memory <size>", "memory limit: bytes or a number with k, m or g, e.g. 512m")
    .option("--mount-path <path>", "where the repository appears in the container (default /workspace)")
    .option("--secret-mount-path <path>", "where the secret files appear (default /run/secrets)")
    .option("--network <network>", 'container network: "none" (default), "host", "bridge" or a network name')
    .option("--timeout <seconds>", "seconds an agent may run (default 3600)", intOption("--timeout", 1, 604_800))
    .option("--grace <seconds>", "seconds between stop signal and kill (default 10)", intOption("--grace", 1, 3600));
}

/** `tasks …`. */
function addTaskCommands(program: Command, run: Run): void {
  const tasks = program.command("tasks").description("run coding agents on a git repository, one container and branch per task");
  profileOptions(
    tasks
      .command("run")
      .description("plan a request into tasks and run an agent per task, merging each task branch into a service branch")
      .option("--repo <path>", "the git working tree on the daemon's host (below a container data root)")
      .option("--base <branch>", "branch to start from (default: the one checked out)")
      .option("--request <text>", "the request: one task per line or Markdown bullet (built-in planner)")
      .option("--request-file <file>", 'read the request from a file ("-" for stdin)')
      .option("--prompt <template>", 'prompt template with "{task}" (built-in planner; default "{task}")')
      .option("--service-branch <branch>", "branch the tasks are merged into (default piccolo/<run id>)")
      .option("--planner-url <url>", "OpenAI-compatible API base URL for the model planner, e.g. https://host/v1")
      .option("--planner-model <model>", "model for the model planner")
      .option("--planner-secret <name>", "sealed secret holding the planner's API key")
      .option("--detach", "print the run id once it has started and exit; it keeps running"),
  ).action((opts: import("./tasks.js").ProfileOptions & { repo?: string }, cmd: Command) => run(cmd, (m, c) => m.tasksRunCommand(c, opts), true));

  tasks
    .command("list")
    .description("list task runs, newest first")
    .option("--limit <n>", "at most this many runs (default 100)", intOption("--limit", 1, 1000))
    .action((opts: { limit?: number }, cmd: Command) => run(cmd, (m, c) => m.tasksListCommand(c, opts)));

  tasks
    .command("get")
    .description("show a task run: its branches and each task's status, commit, merge and log tail")
    .argument("<id>", "task run id")
    .action((id: string, _o, cmd: Command) => run(cmd, (m, c) => m.tasksGetCommand(c, id)));

  tasks
    .command("cancel")
    .description("stop a running task run; its agent gets the grace period and the branches made so far stay")
    .argument("<id>", "task run id")
    .action((id: string, _o, cmd: Command) => run(cmd, (m, c) => m.tasksCancelCommand(c, id)));

  const service = tasks.command("service").description("long-running agent services (systemd units)");
  profileOptions(
    service
      .command("create")
      .description("write (or replace) piccolo-agent-<name>.service and enable and start it")
      .argument("<name>", "service name: lowercase letters, digits and -")
      .option("--repo <path>", "repository to mount (below a container data root)")
      .option("--prompt <text>", "the prompt the agent runs with")
      .option("--write-only", "only write the unit; do not reload, enable or start it"),
  ).action((name: string, opts: import("./tasks.js").ProfileOptions, cmd: Command) => run(cmd, (m, c) => m.tasksServiceCreateCommand(c, name, opts)));
}

/** `install env|disks|plan|run`. */
function addInstallCommands(program: Command, run: Run): void {
  const inst = program.command("install").description("install Piccolo OS from the live medium, an image or the update server onto a disk");
  inst
    .command("env")
    .description("show whether this is the live environment, the boot disk and the install images")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.installEnvCommand(c)));
  inst
    .command("disks")
    .description("list block devices and whether each may be installed to")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.installDisksCommand(c)));
  const specOptions = (c: Command): Command =>
    c
      .argument("<target>", "the whole disk to install to, e.g. /dev/sdb")
      .option("--image <path>", "image file on the daemon's host (raw, .gz, .bz2 or .zst)")
      .option("--live", "the newest install image on the live medium")
      .option("--version <version>", 'a version from the update server (or "latest"): its install image is downloaded on the daemon\'s host and checked')
      .option("--sha256 <hex>", "expected SHA-256 of the image file (default: <image>.sha256 beside it)")
      .option("--signature-file <path>", "detached OpenPGP signature, read here (default: <image>.asc beside it on the host)")
      .option("--ignition <path>", "Ignition config (JSON), read here, for the OEM partition")
      .option("--hostname <name>", "host name for a generated Ignition config")
      .option("--ssh-key <line>", "SSH public key for the core user (repeatable)", collect)
      .option("--encryption <mode>", "none or tpm2 (ROOT as LUKS2, unlocked by the TPM; prints a recovery key once)", "none");
  specOptions(inst.command("plan"))
    .description("dry run: what would be written where and what would be erased; changes nothing")
    .action((target: string, opts: import("./install.js").InstallOptions, cmd: Command) => run(cmd, (m, c) => m.installPlanCommand(c, target, opts)));
  specOptions(inst.command("run"))
    .description("plan, confirm, then install with a live progress bar")
    .option("-y, --yes", "do not ask for confirmation")
    .action((target: string, opts: import("./install.js").InstallOptions, cmd: Command) => run(cmd, (m, c) => m.installRunCommand(c, target, opts), true));
}
