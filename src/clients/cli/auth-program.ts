/** The `piccoloctl auth …` command tree (the commands themselves are in auth.ts, loaded when one runs). */
import type { Command } from "commander";
import type { CommandContext } from "./context.js";

/** Runs a command: connects, calls `work` with the loaded commands module, records the exit code. */
type Run = (cmd: Command, work: (m: typeof import("./commands.js"), c: CommandContext) => Promise<number>, follows?: boolean) => Promise<void>;

/** Adds `auth token|login|passwd|revoke|tokens|fingerprint|whoami`. */
export function addAuthCommands(program: Command, run: Run): void {
  const auth = program.command("auth").description("tokens, passwords and the daemon's TLS fingerprint");

  auth
    .command("token")
    .description("mint a token (as root on the unix socket, or with an admin token); prints the token alone on stdout")
    .requiredOption("--role <role>", "reader, operator or admin")
    .option("--ttl <duration>", "how long it is valid: 90s, 30m, 1h, 7d (default 1h)")
    .option("--subject <name>", 'who or what it is for, shown in the audit log (default "token")')
    .action((opts: { role: string; ttl?: string; subject?: string }, cmd: Command) => run(cmd, (m, c) => m.authTokenCommand(c, opts)));

  auth
    .command("login")
    .description("log in with a password (first line of stdin, or $PICCOLO_PASSWORD); prints the token alone on stdout")
    .option("--user <name>", 'user name (default "admin")')
    .option("--ttl <duration>", "how long the token is valid (default: the daemon's loginTokenTtlSeconds)")
    .action((opts: { user?: string; ttl?: string }, cmd: Command) => run(cmd, (m, c) => m.authLoginCommand(c, opts)));

  auth
    .command("passwd")
    .description("set a user's password (first line of stdin, or $PICCOLO_PASSWORD); creates the user")
    .argument("[user]", 'user name (default "admin")')
    .option("--role <role>", "the user's role: reader, operator or admin (default: unchanged; admin for a new user)")
    .action((user: string | undefined, opts: { role?: string }, cmd: Command) => run(cmd, (m, c) => m.authPasswdCommand(c, user, opts)));

  auth
    .command("revoke")
    .description("revoke a token before it expires")
    .argument("<id>", "token id (from auth token or auth tokens)")
    .action((id: string, _o, cmd: Command) => run(cmd, (m, c) => m.authRevokeCommand(c, id)));

  auth
    .command("tokens")
    .description("list the tokens that have not expired")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.authTokensCommand(c)));

  auth
    .command("fingerprint")
    .description("print the SHA-256 fingerprint of the daemon's TLS certificate, to pin with --tls-fingerprint elsewhere")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.authFingerprintCommand(c)));

  auth
    .command("whoami")
    .description("show the caller's role and token, the TLS fingerprint and how the keys are kept")
    .action((_o, cmd: Command) => run(cmd, (m, c) => m.authWhoamiCommand(c)));
}
