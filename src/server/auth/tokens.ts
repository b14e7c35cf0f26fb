/**
 * API tokens: compact ES256 JWTs signed with the daemon's own key. Minting records each token's
 * id and claims (never the token) in <stateDir>/auth/tokens.json so it can be listed and revoked;
 * verification is cheap on the hot path: a verified token string is cached until it expires or
 * is revoked, and the public key is imported once.
 */
import { randomBytes } from "node:crypto";
import { chmod, mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { errors as joseErrors, importJWK, importPKCS8, jwtVerify, SignJWT, type CryptoKey } from "jose";
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";
import type { DeviceKeys } from "./keys.js";

/** The issuer and audience of local API tokens. */
export const TOKEN_ISSUER = "piccolod";
export const TOKEN_AUDIENCE = "piccolod-local-api";

/** Roles a token can carry, by claim name. */
export const TOKEN_ROLES: Readonly<Record<string, Role>> = {
  reader: Role.ROLE_READER,
  operator: Role.ROLE_OPERATOR,
  admin: Role.ROLE_ADMIN,
};

/** A role's short name ("reader"); "public" and "unspecified" for the others. */
export function roleName(role: Role): string {
  return Role[role]?.replace(/^ROLE_/, "").toLowerCase() ?? String(role);
}

/** Who a call comes from, once authenticated. */
export interface Principal {
  readonly role: Role;
  /** The token's subject, "root" on the unix socket, "anonymous" without a token. */
  readonly subject: string;
  /** The token, when the caller sent one. */
  readonly token?: TokenRecord;
}

/** What is kept about a minted token. */
export interface TokenRecord {
  readonly id: string;
  readonly role: Role;
  readonly subject: string;
  /** Epoch ms. */
  readonly issuedAt: number;
  readonly expiresAt: number;
  revokedAt?: number;
  /** "token" (CreateToken) or "login". */
  readonly origin: "token" | "login";
}

/** Mints, verifies, lists and revokes tokens. */
export interface TokenManager {
  /** Mints a token; `ttlMs` is already validated. */
  mint(role: Role, ttlMs: number, subject: string, origin: TokenRecord["origin"]): Promise<{ token: string; record: TokenRecord }>;
  /** Verifies a token string; throws UNAUTHENTICATED saying why (missing, expired, bad signature, revoked). */
  verify(token: string): Promise<Principal>;
  /**
   * The hot path: the principal of a token verified before (from the cache), without a promise;
   * undefined when it is not cached (call verify()). Throws as verify() does for an expired or
   * revoked one.
   */
  cached(token: string): Principal | undefined;
  /** Revokes a token by id; NOT_FOUND when no unexpired token has it. */
  revoke(id: string): Promise<TokenRecord>;
  /** Unexpired tokens, newest first. */
  list(): TokenRecord[];
}

/** An UNAUTHENTICATED error with a reason. */
export function unauthenticated(message: string, reason: string, metadata: Record<string, string> = {}): PiccoloError {
  return new PiccoloError("unauthenticated", message, { reason, metadata });
}

const CACHE_MAX = 10_000;
const ID = /^[A-Za-z0-9_-]{1,64}$/;

/** Creates the token manager and loads the token records. */
export async function createTokenManager(o: { readonly keys: DeviceKeys; readonly stateDir: string }): Promise<TokenManager> {
  const file = join(o.stateDir, "auth", "tokens.json");
  const signKey: CryptoKey = await importPKCS8(o.keys.signingKey.export({ type: "pkcs8", format: "pem" }).toString(), "ES256");
  const verifyKey = (await importJWK(o.keys.jwk, "ES256")) as CryptoKey;
  const kid = o.keys.jwk["kid"]!;
  const records = new Map<string, TokenRecord>();
  try {
    const saved = JSON.parse(await readFile(file, "utf8")) as { tokens?: TokenRecord[] };
    for (const r of saved.tokens ?? []) if (r.expiresAt > Date.now()) records.set(r.id, r);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
  }
  /** Verified token strings → who they are and when they stop being valid. */
  const cache = new Map<string, { principal: Principal; expiresAt: number; id: string }>();
  let saving: Promise<void> = Promise.resolve();
  const save = (): Promise<void> => {
    saving = saving.then(async () => {
      const now = Date.now();
      for (const [id, r] of records) if (r.expiresAt <= now) records.delete(id);
      await mkdir(dirname(file), { recursive: true, mode: 0o700 });
      const tmp = `${file}.${process.pid}.tmp`;
      await writeFile(tmp, JSON.stringify({ tokens: [...records.values()] }) + "\n", { mode: 0o600 });
      await chmod(tmp, 0o600);
      await rename(tmp, file);
    });
    return saving;
  };

  const revokedError = (r: TokenRecord): PiccoloError =>
    unauthenticated(`token ${r.id} was revoked at ${new Date(r.revokedAt!).toISOString()}`, "TOKEN_REVOKED", { token_id: r.id });
  const expiredError = (id: string, exp: number): PiccoloError =>
    unauthenticated(`token ${id} expired at ${new Date(exp).toISOString()}; get a new one`, "TOKEN_EXPIRED", { token_id: id });

  const cached = (token: string): Principal | undefined => {
    const hit = cache.get(token);
    if (!hit) return undefined;
    if (hit.expiresAt <= Date.now()) {
      cache.delete(token);
      throw expiredError(hit.id, hit.expiresAt);
    }
    const r = records.get(hit.id);
    if (r?.revokedAt !== undefined) throw revokedError(r);
    return hit.principal;
  };

  return {
    async mint(role, ttlMs, subject, origin) {
      const id = randomBytes(12).toString("base64url");
      const now = Date.now();
      const iat = Math.floor(now / 1000);
      const exp = Math.floor((now + ttlMs) / 1000);
      const record: TokenRecord = { id, role, subject, issuedAt: iat * 1000, expiresAt: exp * 1000, origin };
      const token = await new SignJWT({ role: roleName(role) })
        .setProtectedHeader({ alg: "ES256", typ: "JWT", kid })
        .setIssuer(TOKEN_ISSUER)
        .setAudience(TOKEN_AUDIENCE)
        .setSubject(subject)
        .setJti(id)
        .setIssuedAt(iat)
        .setExpirationTime(exp)
        .sign(signKey);
      records.set(id, record);
      await save();
      return { token, record };
    },

    cached,

    async verify(token) {
      const hit = cached(token);
      if (hit) return hit;
      let payload;
      try {
        ({ payload } = await jwtVerify(token, verifyKey, { algorithms: ["ES256"], issuer: TOKEN_ISSUER, audience: TOKEN_AUDIENCE, requiredClaims: ["exp", "jti", "sub"] }));
      } catch (e) {
        if (e instanceof joseErrors.JWTExpired) {
          const p = e.payload;
          throw expiredError(String(p.jti ?? "?"), Number(p.exp ?? 0) * 1000);
        }
        if (e instanceof joseErrors.JWSSignatureVerificationFailed) {
          throw unauthenticated("the token's signature does not verify with this daemon's key (forged, or from another device)", "TOKEN_BAD_SIGNATURE");
        }
        throw unauthenticated(`the token is not valid: ${(e as Error).message}`, "TOKEN_INVALID");
      }
      const role = TOKEN_ROLES[String(payload["role"])];
      const id = String(payload.jti);
      if (role === undefined) throw unauthenticated(`the token's role ${JSON.stringify(payload["role"])} is not reader, operator or admin`, "TOKEN_INVALID");
      const record = records.get(id);
      if (record?.revokedAt !== undefined) throw revokedError(record);
      const expiresAt = Number(payload.exp) * 1000;
      const principal: Principal = {
        role,
        subject: String(payload.sub),
        token: record ?? { id, role, subject: String(payload.sub), issuedAt: Number(payload.iat ?? 0) * 1000, expiresAt, origin: "token" },
      };
      if (cache.size >= CACHE_MAX) cache.delete(cache.keys().next().value!);
      cache.set(token, { principal, expiresAt, id });
      return principal;
    },

    async revoke(id) {
      if (!ID.test(id)) throw invalidArgument("id", `${JSON.stringify(id.slice(0, 80))} is not a token id`);
      const r = records.get(id);
      if (!r || r.expiresAt <= Date.now()) throw notFound("token", id);
      if (r.revokedAt === undefined) {
        r.revokedAt = Date.now();
        for (const [t, c] of cache) if (c.id === id) cache.delete(t);
        await save();
      }
      return r;
    },

    list() {
      const now = Date.now();
      return [...records.values()].filter((r) => r.expiresAt > now).sort((a, b) => b.issuedAt - a.issuedAt);
    },
  };
}
