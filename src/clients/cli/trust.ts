/**
 * piccoloctl's `trust …` and `secrets …` commands: the TPM, the device identity, quotes written as
 * files `tpm2_checkquote` takes, registration with Piccolo central (an operation followed to its
 * end), token refresh, and sealed secrets. A secret's value is read from a file or standard input,
 * never from the command line (where `ps` would show it), and is never printed.
 */
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import {
  AttestResponse,
  DeviceIdentity,
  GetTpmStatusResponse,
  ListSecretsResponse,
  Registration,
  RegistrationState,
  SealKey,
  Secret,
  type PcrSelection,
} from "../../../gen/piccolo/trust/v1/trust.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatTime, jsonDocument, table } from "./format.js";

/** A registration state without its prefix, lower case: "active", "offline_grace" … */
export function registrationStateName(s: RegistrationState): string {
  return (RegistrationState[s] ?? String(s)).replace(/^REGISTRATION_STATE_/, "").toLowerCase();
}

const sealKeyName = (k: SealKey): string => (k === SealKey.SEAL_KEY_TPM2 ? "tpm2" : k === SealKey.SEAL_KEY_HOST ? "host key" : "unknown");

/** Parses `--pcrs sha256:0,1,2+sha1:7` into a selection; UsageError naming the flag. */
export function parsePcrs(value: string): PcrSelection[] {
  return value.split("+").map((part) => {
    const m = /^([a-z0-9_]+):(\d{1,2}(?:,\d{1,2})*)$/i.exec(part.trim());
    if (!m) throw new UsageError(`--pcrs ${JSON.stringify(value)}: expected BANK:N,N,… such as sha256:0,1,2,7 (banks joined with +)`);
    return { algorithm: m[1]!.toLowerCase(), pcrs: m[2]!.split(",").map(Number) };
  });
}

/** Parses `--nonce` (hex); UsageError when it is not 1-32 bytes of hex. */
export function parseNonce(value: string): Buffer {
  if (!/^([0-9a-fA-F]{2}){1,32}$/.test(value)) throw new UsageError(`--nonce ${JSON.stringify(value)}: expected 1-32 bytes in hex`);
  return Buffer.from(value, "hex");
}

/** The registration as text lines. */
export function formatRegistration(r: Registration | undefined): string {
  return table(registrationRows(r));
}

function registrationRows(r: Registration | undefined): string[][] {
  if (!r) return [["registration:", "-"]];
  const rows: string[][] = [["registration:", registrationStateName(r.state)]];
  if (r.centralUrl) rows.push(["central:", r.centralUrl]);
  if (r.registeredAt) rows.push(["registered:", formatTime(r.registeredAt)]);
  if (r.tokenExpiresAt) rows.push(["token expires:", formatTime(r.tokenExpiresAt)]);
  if (r.graceEndsAt) rows.push(["offline grace ends:", formatTime(r.graceEndsAt)]);
  if (r.lastRefreshedAt) rows.push(["last refreshed:", formatTime(r.lastRefreshedAt)]);
  if (r.nextRefreshAt) rows.push(["next refresh:", formatTime(r.nextRefreshAt)]);
  if (r.subscriptionTier) rows.push(["subscription:", r.subscriptionTier]);
  if (r.features.length > 0) rows.push(["features:", r.features.join(", ")]);
  if (r.updateChannel) rows.push(["update channel:", r.updateChannel]);
  if (r.lastError) rows.push(["last error:", r.lastError]);
  return rows;
}

/** `trust status`: GetTpmStatus. Exit 1 when there is no TPM. */
export async function trustStatusCommand(c: CommandContext): Promise<number> {
  const s = await c.api.trust.getTpmStatus({});
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.trust.v1.GetTpmStatusResponse", GetTpmStatusResponse, s));
  else if (!s.present) c.stdout.write(`no TPM: ${s.detail}\n`);
  else {
    const l = s.lockout;
    c.stdout.write(
      table([
        ["TPM:", s.device],
        ["manufacturer:", `${s.manufacturer}${s.vendor ? ` (${s.vendor})` : ""}`],
        ["firmware:", s.firmwareVersion],
        ["spec revision:", s.specRevision],
        ["PCR banks:", s.pcrBanks.map((b) => `${b.algorithm} (${b.pcrs.length})`).join(", ") || "-"],
        ["lockout:", l ? `${l.inLockout ? "LOCKED OUT" : "no"}; ${l.failedTries}/${l.maxTries} failures, one forgotten every ${l.recoverySeconds} s` : "-"],
      ]),
    );
  }
  return s.present ? 0 : 1;
}

/** `trust identity`: GetDeviceIdentity. */
export async function trustIdentityCommand(c: CommandContext, opts: { readonly pem?: boolean }): Promise<number> {
  const id = await c.api.trust.getDeviceIdentity({});
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument("piccolo.trust.v1.DeviceIdentity", DeviceIdentity, id));
    return 0;
  }
  c.stdout.write(
    table([
      ["device id:", id.deviceId],
      ["EK certificate:", id.ekCertificatePem ? "present" : "none in the TPM"],
      ["attestation key:", `${id.akHandle} (name ${id.akName})`],
      ...registrationRows(id.registration),
    ]),
  );
  if (opts.pem) c.stdout.write(`\n${id.ekPublicKeyPem}${id.ekCertificatePem}${id.akPublicKeyPem}`);
  return 0;
}

/** `trust attest`: a quote, written as files for tpm2_checkquote. */
export async function trustAttestCommand(c: CommandContext, opts: { readonly nonce: string; readonly pcrs?: string; readonly outDir: string }): Promise<number> {
  const nonce = parseNonce(opts.nonce);
  const pcrSelection = opts.pcrs ? parsePcrs(opts.pcrs) : [];
  const q = await c.api.trust.attest({ nonce, pcrSelection });
  const dir = resolve(opts.outDir);
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, "ak.pem"), q.akPublicKeyPem);
  await writeFile(join(dir, "quote.msg"), q.quote);
  await writeFile(join(dir, "quote.sig"), q.signature);
  await writeFile(join(dir, "quote.pcrs"), q.pcrs);
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument("piccolo.trust.v1.AttestResponse", AttestResponse, q));
    return 0;
  }
  c.stdout.write(`quote by ${q.deviceId} over ${q.pcrSelection}, written to ${dir}\n`);
  c.stdout.write(table(q.pcrValues.map((p) => [`${p.algorithm}:${p.index}`, Buffer.from(p.value).toString("hex")])));
  c.stdout.write(
    `verify with:\n  tpm2_checkquote -u ${join(dir, "ak.pem")} -m ${join(dir, "quote.msg")} -s ${join(dir, "quote.sig")} -f ${join(dir, "quote.pcrs")} -g ${q.hashAlgorithm} -q ${Buffer.from(q.nonce).toString("hex")}\n`,
  );
  return 0;
}

/** `trust register`: RegisterDevice, followed to its end (or --detach). */
export function trustRegisterCommand(c: CommandContext, opts: { readonly detach?: boolean }): Promise<number> {
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.trust.registerDevice({}, s), detach: opts.detach });
}

/** `trust refresh`: RefreshDeviceToken. */
export async function trustRefreshCommand(c: CommandContext): Promise<number> {
  const r = await c.api.trust.refreshDeviceToken({});
  c.stdout.write(c.global.output === "json" ? jsonDocument("piccolo.trust.v1.Registration", Registration, r) : formatRegistration(r));
  return 0;
}

/** `secrets ls`. */
export async function secretsListCommand(c: CommandContext): Promise<number> {
  const l = await c.api.trust.listSecrets({});
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument("piccolo.trust.v1.ListSecretsResponse", ListSecretsResponse, l));
    return 0;
  }
  if (l.warning) c.stderr.write(`warning: ${l.warning}\n`);
  c.stdout.write(
    table([
      ["NAME", "SEALED WITH", "SIZE", "UPDATED", "LOAD WITH"],
      ...l.secrets.map((s) => [
        s.reserved ? `${s.name} (daemon)` : s.name,
        sealKeyName(s.sealedWith),
        String(s.sealedBytes),
        formatTime(s.updatedAt),
        `LoadCredentialEncrypted=${s.credentialName}:${s.path}`,
      ]),
    ]),
  );
  return 0;
}

async function readStdin(): Promise<Buffer> {
  if (process.stdin.isTTY) throw new UsageError("give the value on standard input (e.g. `piccoloctl secrets seal NAME < file`) or with --from-file");
  const chunks: Buffer[] = [];
  for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks);
}

/** `secrets seal NAME [--from-file PATH]`: the value from the file or standard input. */
export async function secretsSealCommand(c: CommandContext, name: string, opts: { readonly fromFile?: string }): Promise<number> {
  const value = opts.fromFile ? await readFile(opts.fromFile) : await readStdin();
  const s = await c.api.trust.sealSecret({ name, value });
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.trust.v1.Secret", Secret, s));
  else c.stdout.write(`sealed ${s.name} with ${sealKeyName(s.sealedWith)}: ${s.path}\nload it in a unit with LoadCredentialEncrypted=${s.credentialName}:${s.path}\n`);
  return 0;
}

/** `secrets rm NAME`. */
export async function secretsRemoveCommand(c: CommandContext, name: string): Promise<number> {
  await c.api.trust.deleteSecret({ name });
  if (c.global.output !== "json") c.stdout.write(`deleted ${name}\n`);
  else c.stdout.write("{}\n");
  return 0;
}
