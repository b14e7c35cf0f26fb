/**
 * The auth gate: one interceptor for the gRPC server and the REST gateway alike. Calls on the
 * unix socket are ADMIN; calls on TCP need a bearer token whose role includes the role the RPC
 * declares with (piccolo.common.v1.min_role) in the proto. Every denial is UNAUTHENTICATED (no,
 * expired, forged or revoked token) or PERMISSION_DENIED (a role too low, or an RPC that declares
 * none), and writes an audit record.
 */
import type { Logger } from "pino";
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import { declaredRole, roleAllows } from "../../common/access.js";
import type { AuditLog } from "../audit.js";
import { PiccoloError, toRpcStatus } from "../errors.js";
import type { CallContext, Interceptor, MethodEntry, Transport } from "../rpc.js";
import { roleName, unauthenticated, type Principal, type TokenManager } from "./tokens.js";
import { status as GrpcStatus } from "@grpc/grpc-js";
import { isoTime } from "../iso-time.js";

/** The unix socket's principal. */
export const ROOT_PRINCIPAL: Principal = { role: Role.ROLE_ADMIN, subject: "root" };
/** A TCP caller without a token. */
export const ANONYMOUS: Principal = { role: Role.ROLE_PUBLIC, subject: "anonymous" };

/** A call to authorise, as the transports see it. */
export interface GateCall {
  /** "/pkg.Service/Method". */
  readonly method: string;
  /** The least role it needs. */
  readonly need: Role;
  readonly transport: Transport;
  readonly actor: string;
  /** The authorization header or metadata value, if any. */
  readonly authorization: string | undefined;
}

/** The gate. */
export interface AuthGate {
  /** The interceptor for registered methods (authenticates the call unless the transport already did). */
  readonly interceptor: Interceptor;
  /**
   * Authenticates a call and sets ctx.principal; for transports to run before decoding the
   * request. Returns undefined when it could decide at once (the unix socket, a cached token),
   * a promise when it had to verify a signature or write a denial to the audit log.
   */
  authenticate(ctx: CallContext): Promise<void> | undefined;
  /** Authorises a call outside the registry (server reflection); throws the denial. */
  authorize(call: GateCall): Promise<Principal>;
}

const codeName = (code: number): string => GrpcStatus[code] ?? String(code);

/** Creates the gate. With `required` false (development only) TCP callers are ADMIN without a token. */
export function createAuthGate(o: { readonly tokens: TokenManager; readonly audit: AuditLog; readonly required: boolean; readonly log: Logger }): AuthGate {
  const needs = new Map<string, Role>();
  const needOf = (m: MethodEntry): Role => {
    let r = needs.get(m.path);
    if (r === undefined) needs.set(m.path, (r = declaredRole(m.desc)));
    return r;
  };

  const check = async (c: GateCall): Promise<Principal> => {
    if (c.transport === "grpc-unix") return ROOT_PRINCIPAL;
    if (!o.required) return { role: Role.ROLE_ADMIN, subject: "auth-disabled" };
    const header = c.authorization;
    let principal = ANONYMOUS;
    if (header !== undefined && header !== "") {
      const m = /^Bearer\s+(\S+)\s*$/i.exec(header);
      if (!m) throw unauthenticated('the authorization header must be "Bearer <token>"', "TOKEN_INVALID");
      principal = await o.tokens.verify(m[1]!);
    }
    if (c.need === Role.ROLE_UNSPECIFIED) {
      throw new PiccoloError("permission_denied", `${c.method} declares no role and is served on the unix socket only`, { reason: "ROLE_UNDECLARED" });
    }
    if (roleAllows(principal.role, c.need)) return principal;
    if (principal === ANONYMOUS) {
      throw unauthenticated(`${c.method} needs a token of role ${roleName(c.need)} or higher: send "authorization: Bearer <token>" (piccoloctl auth token, or Login)`, "TOKEN_MISSING");
    }
    throw new PiccoloError(
      "permission_denied",
      `${c.method} needs role ${roleName(c.need)} or higher; the token of ${principal.subject} has role ${roleName(principal.role)}`,
      { reason: "ROLE_TOO_LOW", metadata: { need: roleName(c.need), have: roleName(principal.role) } },
    );
  };

  const authorize = async (c: GateCall): Promise<Principal> => {
    try {
      return await check(c);
    } catch (e) {
      const st = toRpcStatus(e);
      const reason = e instanceof PiccoloError ? e.reason : undefined;
      await o.audit.write({
        time: isoTime(),
        actor: c.actor,
        method: c.method.replace(/^\//, ""),
        transport: c.transport,
        target: "",
        result: codeName(st.code),
        ...(reason ? { reason } : {}),
        error: st.message,
      });
      o.log.info({ rpc: c.method, actor: c.actor, transport: c.transport, code: codeName(st.code), reason }, "call denied");
      throw e;
    }
  };

  const authenticate = (ctx: CallContext): Promise<void> | undefined => {
    const need = needOf(ctx.method);
    // The hot path, without a promise: root, or a token already verified whose role suffices.
    if (ctx.transport === "grpc-unix") {
      ctx.principal = ROOT_PRINCIPAL;
      return undefined;
    }
    const m = o.required ? /^Bearer\s+(\S+)\s*$/i.exec(ctx.metadata["authorization"] ?? "") : null;
    if (m && need !== Role.ROLE_UNSPECIFIED) {
      let p: Principal | undefined;
      try {
        p = o.tokens.cached(m[1]!);
      } catch {
        p = undefined; // expired or revoked: the slow path says so and audits it
      }
      if (p && roleAllows(p.role, need)) {
        ctx.principal = p;
        return undefined;
      }
    }
    return authorize({ method: ctx.method.path, need, transport: ctx.transport, actor: ctx.actor, authorization: ctx.metadata["authorization"] }).then((p) => {
      ctx.principal = p;
    });
  };

  return {
    authorize,
    authenticate,
    interceptor: async (call, next) => {
      if (!call.ctx.principal) await authenticate(call.ctx);
      return next();
    },
  };
}
