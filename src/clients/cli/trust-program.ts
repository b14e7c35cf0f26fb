/**
 * The `trust …` and `secrets …` command lines of piccoloctl. The commands (trust.ts) are loaded
 * only when one runs.
 */
import type { Command } from "commander";
import type { CommandContext } from "./context.js";

/** How program.ts runs a command: connect, run `work`, record the exit code. */
type Run = (cmd: Command, work: (m: unknown, c: CommandContext) => Promise<number>, follows?: boolean) => Promise<void>;

const load = (): Promise<typeof import("./trust.js")> => import("./trust.js");

/** Adds `trust status|identity|attest|register|refresh` and `secrets ls|seal|rm`. */
export function addTrustCommands(program: Command, run: Run): void {
  const trust = program.command("trust").description("the TPM, the device identity and attestation, and registration with Piccolo central");

  trust
    .command("status")
    .description("show the TPM: manufacturer, firmware, PCR banks, lockout (exit code 1 when there is none)")
    .action((_o, cmd: Command) => run(cmd, async (_m, c) => (await load()).trustStatusCommand(c)));

  trust
    .command("identity")
    .description("show the device id (SHA-256 of the EK public key), the attestation key and the registration")
    .option("--pem", "also print the EK public key, the EK certificate and the attestation key as PEM")
    .action((opts: { pem?: boolean }, cmd: Command) => run(cmd, async (_m, c) => (await load()).trustIdentityCommand(c, opts)));

  trust
    .command("attest")
    .description("quote PCRs over a nonce with the attestation key and write the files tpm2_checkquote verifies")
    .requiredOption("--nonce <hex>", "freshness value chosen by the verifier, 1-32 bytes in hex")
    .option("--pcrs <selection>", "PCRs to quote, e.g. sha256:0,1,2,7 (default sha256:0-7)")
    .option("--out-dir <dir>", "folder for ak.pem, quote.msg, quote.sig and quote.pcrs", ".")
    .action((opts: { nonce: string; pcrs?: string; outDir: string }, cmd: Command) => run(cmd, async (_m, c) => (await load()).trustAttestCommand(c, opts)));

  trust
    .command("register")
    .description("register the device with Piccolo central (nonce, quote, token sealed to the TPM) and follow it to the end")
    .option("--detach", "print the operation id once it has started and exit; it keeps running")
    .action((opts: { detach?: boolean }, cmd: Command) => run(cmd, async (_m, c) => (await load()).trustRegisterCommand(c, opts), true));

  trust
    .command("refresh")
    .description("refresh the device token now instead of waiting for the background refresh")
    .action((_o, cmd: Command) => run(cmd, async (_m, c) => (await load()).trustRefreshCommand(c)));

  const secrets = program.command("secrets").description("TPM-sealed secrets that systemd units load with LoadCredentialEncrypted=");

  secrets
    .command("ls")
    .description("list sealed secrets (never their values) and what each is sealed with")
    .action((_o, cmd: Command) => run(cmd, async (_m, c) => (await load()).secretsListCommand(c)));

  secrets
    .command("seal")
    .description("seal a secret read from standard input (or --from-file), replacing one of the same name")
    .argument("<name>", "secret name: letters, digits, _ . -")
    .option("--from-file <path>", "read the value from this file instead of standard input")
    .action((name: string, opts: { fromFile?: string }, cmd: Command) => run(cmd, async (_m, c) => (await load()).secretsSealCommand(c, name, opts)));

  secrets
    .command("rm")
    .description("delete a sealed secret")
    .argument("<name>", "secret name")
    .action((name: string, _o, cmd: Command) => run(cmd, async (_m, c) => (await load()).secretsRemoveCommand(c, name)));
}
