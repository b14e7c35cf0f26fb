/**
 * The interceptors every call goes through, gRPC and REST alike: the auth gate (auth/gate.ts)
 * first, then logging, then audit.
 */
import { status as GrpcStatus } from "@grpc/grpc-js";
import type { AuditLog } from "./audit.js";
import { toPiccoloError, toRpcStatus } from "./errors.js";
import type { Interceptor } from "./rpc.js";
import { readHttpBindings, compilePathTemplate } from "../common/http-rule.js";
import { apiRegistry } from "../common/proto-registry.js";
import type { DescField, DescMessage } from "@bufbuild/protobuf";
import { isoTime } from "./iso-time.js";

const codeName = (code: number): string => GrpcStatus[code] ?? String(code);

/** Logs each call's end with its duration and result; reads at debug, changes at info. */
export const loggingInterceptor: Interceptor = async (call, next) => {
  const started = performance.now();
  const { ctx } = call;
  try {
    await next();
    const level = ctx.method.mutating ? "info" : "debug";
    if (ctx.log.isLevelEnabled(level)) {
      ctx.log[level]({ rpc: ctx.method.name, actor: ctx.actor, transport: ctx.transport, ms: ms(started), code: "OK" }, "call");
    }
  } catch (e) {
    const st = toRpcStatus(e);
    const fields = {
      rpc: ctx.method.name,
      actor: ctx.actor,
      transport: ctx.transport,
      ms: ms(started),
      code: codeName(st.code),
      err: st.message,
    };
    if (st.code === GrpcStatus.INTERNAL || st.code === GrpcStatus.UNKNOWN) ctx.log.error({ ...fields, stack: (e as Error).stack }, "call failed");
    else ctx.log.info(fields, "call failed");
    throw e;
  }
};

const ms = (t0: number): number => Math.round((performance.now() - t0) * 1000) / 1000;

const targetFieldsCache = new Map<string, string[]>();
const TARGET_FIELDS = ["name", "spec.name", "reference", "path", "id", "username"];

/** The request fields that name what a method acts on: the variables of its HTTP path. */
function targetFields(path: string, service: string, name: string): string[] {
  let fields = targetFieldsCache.get(path);
  if (!fields) {
    const desc = apiRegistry.getService(service)?.methods.find((m) => m.name === name);
    fields = desc
      ? [...new Set(readHttpBindings(desc, apiRegistry).flatMap((b) => compilePathTemplate(b.pattern).variables.map((v) => v.fieldPath)))]
      : [];
    // Methods whose target travels in the body (CreateContainer, PullImage …): the first naming field.
    if (desc && fields.length === 0) {
      const has = (path: string): boolean => {
        let msg: DescMessage | undefined = desc.input;
        for (const part of path.split(".")) {
          const f: DescField | undefined = msg?.fields.find((x) => x.name === part);
          if (!f) return false;
          msg = f.fieldKind === "message" ? f.message : undefined;
        }
        return true;
      };
      fields = TARGET_FIELDS.filter(has).slice(0, 1);
    }
    targetFieldsCache.set(path, fields);
  }
  return fields;
}

const camel = (s: string): string => s.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());

/** Returns an interceptor that writes one audit record per mutating call, whatever its result. */
export function auditInterceptor(audit: AuditLog): Interceptor {
  return async (call, next) => {
    const { ctx } = call;
    if (!ctx.method.mutating) return next();
    let error: unknown;
    try {
      await next();
    } catch (e) {
      error = e;
    }
    const req = call.request as Record<string, unknown> | undefined;
    const target = targetFields(ctx.method.path, ctx.method.service, ctx.method.name)
      .map((f) => {
        let v: unknown = req;
        for (const part of f.split(".")) v = (v as Record<string, unknown> | undefined)?.[camel(part)];
        return `${f}=${String(v ?? "")}`;
      })
      .join(",");
    const st = error === undefined ? undefined : toRpcStatus(error);
    const reason = error === undefined ? undefined : toPiccoloError(error).reason;
    await audit.write({
      time: isoTime(),
      actor: ctx.actor,
      ...(ctx.principal ? { subject: ctx.principal.subject } : {}),
      ...(ctx.principal?.token ? { tokenId: ctx.principal.token.id } : {}),
      method: `${ctx.method.service}/${ctx.method.name}`,
      transport: ctx.transport,
      target,
      result: st ? codeName(st.code) : "OK",
      ...(reason ? { reason } : {}),
      ...(st ? { error: st.message } : {}),
      ...(ctx.startedOperation ? { operationId: ctx.startedOperation.id } : {}),
    });
    if (error !== undefined) throw error;
  };
}
