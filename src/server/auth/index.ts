/**
 * Authentication of the local API, assembled: the device keys (token signing and TLS), tokens,
 * users, the gate every call goes through, and AuthService.
 */
import type { Logger } from "pino";
import type { AuditLog } from "../audit.js";
import type { Config } from "../config.js";
import type { ServiceImpl } from "../rpc.js";
import type { CredentialStore } from "../trust/credentials.js";
import type { AuthServiceService } from "../../../gen/piccolo/auth/v1/auth.js";
import { createAuthGate, type AuthGate } from "./gate.js";
import { loadDeviceKeys, type DeviceKeys } from "./keys.js";
import { createAuthService } from "./service.js";
import { createTokenManager, type TokenManager } from "./tokens.js";
import { openUserStore, type UserStore } from "./users.js";

/** The auth parts the daemon wires in. */
export interface Auth {
  readonly keys: DeviceKeys;
  readonly tokens: TokenManager;
  readonly gate: AuthGate;
  readonly service: ServiceImpl<typeof AuthServiceService>;
  /** TLS key and certificate for the TCP listeners; undefined with insecurePlaintext. */
  readonly tls: { readonly key: string; readonly cert: string } | undefined;
}

/** The state authentication keeps on disk, loaded (keys unsealed, token records and users read). */
export interface AuthState {
  readonly keys: DeviceKeys;
  readonly tokens: TokenManager;
  readonly users: UserStore;
}

/**
 * Loads the keys (making them on first start), the token records and the users. Unsealing runs
 * systemd-creds, so the daemon starts this early and does other start-up work meanwhile.
 */
export async function loadAuthState(o: { readonly config: Config; readonly credentials: CredentialStore; readonly log: Logger }): Promise<AuthState> {
  const { config } = o;
  const keys = await loadDeviceKeys({
    stateDir: config.stateDir,
    credentials: o.credentials,
    protection: config.keyProtection,
    altNames: config.tlsAltNames,
    log: o.log,
  });
  const [tokens, users] = await Promise.all([
    createTokenManager({ keys, stateDir: config.stateDir }),
    openUserStore({ stateDir: config.stateDir, policy: { maxFailures: config.loginMaxFailures, lockMs: config.loginLockSeconds * 1000 } }),
  ]);
  return { keys, tokens, users };
}

/** Sets up authentication from the configuration and the loaded state. */
export function createAuth(o: { readonly config: Config; readonly state: AuthState; readonly audit: AuditLog; readonly log: Logger }): Auth {
  const { config, log } = o;
  const { keys, tokens, users } = o.state;
  const required = !config.authDisabled;
  const tls = !config.insecurePlaintext;
  const gate = createAuthGate({ tokens, audit: o.audit, required, log });
  const service = createAuthService({
    tokens,
    users,
    keys,
    tls,
    required,
    maxTtlMs: config.tokenMaxTtlSeconds * 1000,
    loginTtlMs: config.loginTokenTtlSeconds * 1000,
  });
  if (!required) log.warn("authDisabled: TCP callers are ADMIN without a token (development only, loopback only)");
  if (!tls) log.warn("insecurePlaintext: the TCP listeners speak plaintext (development only, loopback only)");
  return { keys, tokens, gate, service, tls: tls ? { key: keys.tlsKeyPem, cert: keys.tlsCertPem } : undefined };
}
