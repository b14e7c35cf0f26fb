/** AuthService: the RPC layer over the token manager, the user store and the device keys. */
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import { KeyProtection, type AuthServiceService, type TokenInfo } from "../../../gen/piccolo/auth/v1/auth.js";
import type { Duration } from "../../../gen/google/protobuf/duration.js";
import { invalidArgument } from "../errors.js";
import type { ServiceImpl } from "../rpc.js";
import type { DeviceKeys } from "./keys.js";
import type { TokenManager, TokenRecord } from "./tokens.js";
import type { UserStore } from "./users.js";

/** What AuthService needs. */
export interface AuthServiceDeps {
  readonly tokens: TokenManager;
  readonly users: UserStore;
  readonly keys: DeviceKeys;
  /** Whether TCP uses TLS. */
  readonly tls: boolean;
  /** Whether TCP callers need a token. */
  readonly required: boolean;
  /** Longest token lifetime, ms. */
  readonly maxTtlMs: number;
  /** Lifetime of Login tokens when the request gives none, ms. */
  readonly loginTtlMs: number;
}

const SUBJECT = /^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$/;
const DEFAULT_TTL_MS = 3600_000;

/** Token info for the API. */
export function tokenInfo(r: TokenRecord): TokenInfo {
  return {
    id: r.id,
    role: r.role,
    subject: r.subject,
    issueTime: new Date(r.issuedAt),
    expireTime: new Date(r.expiresAt),
    revokeTime: r.revokedAt === undefined ? undefined : new Date(r.revokedAt),
    origin: r.origin,
  };
}

/** A Duration field as ms within [1 s, max]; `dflt` when unset. */
function ttl(d: Duration | undefined, field: string, dflt: number, maxMs: number): number {
  if (!d || (d.seconds === 0 && d.nanos === 0)) return Math.min(dflt, maxMs);
  const ms = d.seconds * 1000 + Math.floor(d.nanos / 1e6);
  if (!Number.isFinite(ms) || ms < 1000) throw invalidArgument(field, `must be at least 1s (got ${d.seconds}s)`);
  if (ms > maxMs) throw invalidArgument(field, `must be at most ${Math.floor(maxMs / 1000)}s (tokenMaxTtlSeconds), got ${d.seconds}s`);
  return ms;
}

/** Creates the AuthService implementation. */
export function createAuthService(deps: AuthServiceDeps): ServiceImpl<typeof AuthServiceService> {
  const { tokens, users, keys } = deps;
  return {
    async createToken(req) {
      if (req.role !== Role.ROLE_READER && req.role !== Role.ROLE_OPERATOR && req.role !== Role.ROLE_ADMIN) {
        throw invalidArgument("role", "must be ROLE_READER, ROLE_OPERATOR or ROLE_ADMIN");
      }
      const subject = req.subject === "" ? "token" : req.subject;
      if (!SUBJECT.test(subject)) {
        throw invalidArgument("subject", `expected 1-64 letters, digits, "_", ".", "@" or "-", got ${JSON.stringify(subject.slice(0, 80))}`);
      }
      const ms = ttl(req.ttl, "ttl", DEFAULT_TTL_MS, deps.maxTtlMs);
      const { token, record } = await tokens.mint(req.role, ms, subject, "token");
      return { token, info: tokenInfo(record) };
    },
    async login(req) {
      if (req.username === "") throw invalidArgument("username", "is required");
      if (req.password === "") throw invalidArgument("password", "is required");
      if (req.username.length > 64) throw invalidArgument("username", "must be at most 64 characters");
      if (req.password.length > 1024) throw invalidArgument("password", "must be at most 1024 characters");
      const ms = ttl(req.ttl, "ttl", deps.loginTtlMs, deps.maxTtlMs);
      const role = await users.login(req.username, req.password);
      const { token, record } = await tokens.mint(role, ms, req.username, "login");
      return { token, info: tokenInfo(record) };
    },
    async revokeToken(req) {
      if (req.id === "") throw invalidArgument("id", "is required");
      return { info: tokenInfo(await tokens.revoke(req.id)) };
    },
    async listTokens() {
      return { tokens: tokens.list().map(tokenInfo) };
    },
    async setPassword(req) {
      const role = await users.setPassword(req.username, req.password, req.role);
      return { username: req.username, role };
    },
    async getAuthInfo(_req, ctx) {
      const p = ctx.principal;
      const token = p?.token?.id ? tokens.list().find((t) => t.id === p.token!.id) : undefined;
      return {
        role: (p?.role as Role | undefined) ?? Role.ROLE_PUBLIC,
        token: token ? tokenInfo(token) : undefined,
        tlsFingerprintSha256: deps.tls ? keys.fingerprint : "",
        tlsCertificatePem: deps.tls ? keys.tlsCertPem : "",
        tlsEnabled: deps.tls,
        tokenSigningJwk: JSON.stringify(keys.jwk),
        keyProtection: keys.protection === "sealed" ? KeyProtection.KEY_PROTECTION_SEALED : KeyProtection.KEY_PROTECTION_FILE,
        authRequired: deps.required,
      };
    },
  };
}
