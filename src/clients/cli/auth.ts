/**
 * The `piccoloctl auth …` commands: mint a token (over the unix socket, as root), log in with a
 * password, set a password, list and revoke tokens, and show the daemon's TLS fingerprint and
 * who the caller is.
 */
import {
  CreateTokenResponse,
  GetAuthInfoResponse,
  KeyProtection,
  ListTokensResponse,
  LoginResponse,
  RevokeTokenResponse,
  type TokenInfo,
} from "../../../gen/piccolo/auth/v1/auth.js";
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import type { Duration } from "../../../gen/google/protobuf/duration.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { formatTime, jsonDocument, table } from "./format.js";

/** Parses --role: reader, operator or admin. */
export function parseRole(value: string): Role {
  const r = { reader: Role.ROLE_READER, operator: Role.ROLE_OPERATOR, admin: Role.ROLE_ADMIN }[value.trim().toLowerCase().replace(/^role_/, "")];
  if (r === undefined) throw new UsageError(`--role ${JSON.stringify(value)}: expected reader, operator or admin`);
  return r;
}

/** A role's short name. */
export function roleText(role: Role): string {
  return (Role[role] ?? String(role)).replace(/^ROLE_/, "").toLowerCase();
}

/** Parses --ttl: "90s", "30m", "1h", "7d" or a number of seconds. */
export function parseTtl(value: string): Duration {
  const m = /^\s*(\d+)\s*(s|m|h|d)?\s*$/i.exec(value);
  if (!m) throw new UsageError(`--ttl ${JSON.stringify(value)}: expected a duration such as 90s, 30m, 1h or 7d`);
  const n = Number(m[1]) * { s: 1, m: 60, h: 3600, d: 86400 }[(m[2] ?? "s").toLowerCase() as "s" | "m" | "h" | "d"];
  if (n < 1) throw new UsageError("--ttl must be at least 1s");
  return { seconds: n, nanos: 0 };
}

function tokenLine(i: TokenInfo | undefined): string {
  if (!i) return "";
  return `token ${i.id} (role ${roleText(i.role)}, for ${i.subject}) expires ${formatTime(i.expireTime)}; revoke it with: piccoloctl auth revoke ${i.id}\n`;
}

/** Reads a password from $PICCOLO_PASSWORD or standard input (the first line). */
async function password(c: CommandContext): Promise<string> {
  const fromEnv = c.env?.["PICCOLO_PASSWORD"];
  if (fromEnv) return fromEnv;
  if (!c.readStdin) throw new UsageError("give the password on standard input or in $PICCOLO_PASSWORD");
  const text = await c.readStdin();
  const first = text.split(/\r?\n/)[0] ?? "";
  if (first === "") throw new UsageError("no password on standard input (or in $PICCOLO_PASSWORD)");
  return first;
}

/** `auth token --role R [--ttl D] [--subject S]`: CreateToken; prints the token alone on stdout. */
export async function authTokenCommand(c: CommandContext, opts: { role: string; ttl?: string; subject?: string }): Promise<number> {
  const res = await c.api.auth.createToken({ role: parseRole(opts.role), ttl: opts.ttl ? parseTtl(opts.ttl) : undefined, subject: opts.subject ?? "" });
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.auth.v1.CreateTokenResponse", CreateTokenResponse, res));
  else {
    c.stdout.write(`${res.token}\n`);
    c.stderr.write(tokenLine(res.info));
  }
  return 0;
}

/** `auth login [--user U] [--ttl D]`: Login with the password from stdin or $PICCOLO_PASSWORD. */
export async function authLoginCommand(c: CommandContext, opts: { user?: string; ttl?: string }): Promise<number> {
  const res = await c.api.auth.login({ username: opts.user ?? "admin", password: await password(c), ttl: opts.ttl ? parseTtl(opts.ttl) : undefined });
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.auth.v1.LoginResponse", LoginResponse, res));
  else {
    c.stdout.write(`${res.token}\n`);
    c.stderr.write(tokenLine(res.info));
  }
  return 0;
}

/** `auth passwd [USER] [--role R]`: SetPassword with the password from stdin or $PICCOLO_PASSWORD. */
export async function authPasswdCommand(c: CommandContext, user: string | undefined, opts: { role?: string }): Promise<number> {
  const res = await c.api.auth.setPassword({
    username: user ?? "admin",
    password: await password(c),
    role: opts.role ? parseRole(opts.role) : Role.ROLE_UNSPECIFIED,
  });
  c.stdout.write(c.global.output === "json" ? `${JSON.stringify({ username: res.username, role: Role[res.role] })}\n` : `password of ${res.username} (role ${roleText(res.role)}) set\n`);
  return 0;
}

/** `auth revoke ID`: RevokeToken. */
export async function authRevokeCommand(c: CommandContext, id: string): Promise<number> {
  const res = await c.api.auth.revokeToken({ id });
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.auth.v1.RevokeTokenResponse", RevokeTokenResponse, res));
  else c.stdout.write(`token ${id} revoked at ${formatTime(res.info?.revokeTime)}\n`);
  return 0;
}

/** `auth tokens`: ListTokens. */
export async function authTokensCommand(c: CommandContext): Promise<number> {
  const res = await c.api.auth.listTokens({});
  if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.auth.v1.ListTokensResponse", ListTokensResponse, res));
  else {
    c.stdout.write(
      table([
        ["ID", "ROLE", "SUBJECT", "ORIGIN", "EXPIRES", "REVOKED"],
        ...res.tokens.map((t) => [t.id, roleText(t.role), t.subject, t.origin, formatTime(t.expireTime), t.revokeTime ? formatTime(t.revokeTime) : "-"]),
      ]),
    );
  }
  return 0;
}

/** `auth fingerprint`: the TLS certificate's SHA-256 fingerprint (exit 1 when TCP has no TLS). */
export async function authFingerprintCommand(c: CommandContext): Promise<number> {
  const info = await c.api.auth.getAuthInfo({});
  if (c.global.output === "json") {
    c.stdout.write(`${JSON.stringify({ tlsFingerprintSha256: info.tlsFingerprintSha256, tlsEnabled: info.tlsEnabled })}\n`);
  } else if (info.tlsEnabled) c.stdout.write(`${info.tlsFingerprintSha256}\n`);
  else c.stderr.write("the daemon's TCP listeners run without TLS (insecurePlaintext)\n");
  return info.tlsEnabled ? 0 : 1;
}

/** `auth whoami`: the caller's role and token, and the daemon's TLS and key protection. */
export async function authWhoamiCommand(c: CommandContext): Promise<number> {
  const info = await c.api.auth.getAuthInfo({});
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument("piccolo.auth.v1.GetAuthInfoResponse", GetAuthInfoResponse, { ...info, tlsCertificatePem: "" }));
    return 0;
  }
  const keys = { [KeyProtection.KEY_PROTECTION_SEALED]: "sealed (systemd-creds)", [KeyProtection.KEY_PROTECTION_FILE]: "file (mode 0600)" }[info.keyProtection as 1 | 2] ?? "-";
  c.stdout.write(
    table([
      ["role", roleText(info.role)],
      ["token", info.token ? `${info.token.id} (for ${info.token.subject}, expires ${formatTime(info.token.expireTime)})` : "-"],
      ["tls", info.tlsEnabled ? info.tlsFingerprintSha256 : "off (insecurePlaintext)"],
      ["keys", keys],
      ["auth", info.authRequired ? "token required on TCP" : "off (authDisabled)"],
    ]),
  );
  return 0;
}
