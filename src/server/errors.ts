/**
 * The daemon's closed set of domain errors and the one table that maps them to gRPC codes and
 * HTTP statuses. Managers throw PiccoloError; the gRPC server and the REST gateway both turn any
 * thrown value into a google.rpc.Status with toRpcStatus(), so nothing escapes as UNKNOWN.
 */
import { status as GrpcStatus } from "@grpc/grpc-js";
import { Any } from "../../gen/google/protobuf/any.js";
import { BadRequest, ErrorInfo, PreconditionFailure } from "../../gen/google/rpc/error_details.js";
import { Status } from "../../gen/google/rpc/status.js";

/** The kinds of failure a manager can report. */
export type ErrorKind =
  | "invalid_argument"
  | "not_found"
  | "already_exists"
  | "failed_precondition"
  | "unavailable"
  | "permission_denied"
  | "unauthenticated"
  | "cancelled"
  | "deadline_exceeded"
  | "resource_exhausted"
  | "unimplemented"
  | "internal";

/** The one mapping table: domain error kind → gRPC code → HTTP status. */
export const ERROR_TABLE: Readonly<Record<ErrorKind, { readonly grpc: GrpcStatus; readonly http: number }>> = {
  invalid_argument: { grpc: GrpcStatus.INVALID_ARGUMENT, http: 400 },
  not_found: { grpc: GrpcStatus.NOT_FOUND, http: 404 },
  already_exists: { grpc: GrpcStatus.ALREADY_EXISTS, http: 409 },
  failed_precondition: { grpc: GrpcStatus.FAILED_PRECONDITION, http: 412 },
  unavailable: { grpc: GrpcStatus.UNAVAILABLE, http: 503 },
  permission_denied: { grpc: GrpcStatus.PERMISSION_DENIED, http: 403 },
  unauthenticated: { grpc: GrpcStatus.UNAUTHENTICATED, http: 401 },
  cancelled: { grpc: GrpcStatus.CANCELLED, http: 499 },
  deadline_exceeded: { grpc: GrpcStatus.DEADLINE_EXCEEDED, http: 504 },
  resource_exhausted: { grpc: GrpcStatus.RESOURCE_EXHAUSTED, http: 429 },
  unimplemented: { grpc: GrpcStatus.UNIMPLEMENTED, http: 501 },
  internal: { grpc: GrpcStatus.INTERNAL, http: 500 },
};

const HTTP_BY_GRPC = new Map<number, number>(Object.values(ERROR_TABLE).map((e) => [e.grpc, e.http]));
HTTP_BY_GRPC.set(GrpcStatus.UNKNOWN, 500);
HTTP_BY_GRPC.set(GrpcStatus.ABORTED, 409);
HTTP_BY_GRPC.set(GrpcStatus.OUT_OF_RANGE, 400);
HTTP_BY_GRPC.set(GrpcStatus.DATA_LOSS, 500);

/** HTTP status for a gRPC code, from the same table. */
export function httpStatusFor(code: number): number {
  return code === GrpcStatus.OK ? 200 : (HTTP_BY_GRPC.get(code) ?? 500);
}

/** Error domain used in google.rpc.ErrorInfo details. */
export const ERROR_DOMAIN = "piccolo.space";

/** Options of a PiccoloError. */
export interface PiccoloErrorOptions {
  /** The request field at fault (proto field path), for invalid_argument. */
  readonly field?: string;
  /** Machine-readable reason in UPPER_SNAKE_CASE, e.g. "OPERATION_RUNNING". */
  readonly reason?: string;
  /** Extra key/values for ErrorInfo, e.g. { operation_id: "op-…" }. */
  readonly metadata?: Readonly<Record<string, string>>;
  /** The underlying error. */
  readonly cause?: unknown;
}

/** An error a manager or service reports on purpose. */
export class PiccoloError extends Error {
  override readonly name = "PiccoloError";
  readonly field: string | undefined;
  readonly reason: string | undefined;
  readonly metadata: Readonly<Record<string, string>>;

  constructor(
    readonly kind: ErrorKind,
    message: string,
    options: PiccoloErrorOptions = {},
  ) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.field = options.field;
    this.reason = options.reason;
    this.metadata = options.metadata ?? {};
  }
}

/** A request field is missing or wrong; the message is prefixed with the field's name. */
export function invalidArgument(field: string, problem: string): PiccoloError {
  return new PiccoloError("invalid_argument", `${field}: ${problem}`, { field, reason: "INVALID_FIELD" });
}

/** The named thing does not exist. */
export function notFound(what: string, id: string): PiccoloError {
  return new PiccoloError("not_found", `${what} ${JSON.stringify(id)} not found`, { reason: "NOT_FOUND" });
}

/** A host part the daemon needs is missing or unreachable; `part` names it (e.g. "Docker engine at /var/run/docker.sock"). */
export function unavailable(part: string, cause?: unknown): PiccoloError {
  const detail = cause instanceof Error ? `: ${cause.message}` : "";
  return new PiccoloError("unavailable", `${part} is unavailable${detail}`, { reason: "HOST_PART_UNAVAILABLE", cause });
}

const ERRNO_UNAVAILABLE = new Set(["ECONNREFUSED", "ENOENT", "ECONNRESET", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "ENOTCONN"]);

interface ErrnoLike {
  code?: unknown;
  address?: unknown;
  path?: unknown;
  port?: unknown;
  syscall?: unknown;
}

/** Walks an error's cause chain and turns anything into a PiccoloError (errno values mapped, names kept). */
export function toPiccoloError(err: unknown): PiccoloError {
  const seen = new Set<unknown>();
  for (let e: unknown = err; e && !seen.has(e); e = (e as { cause?: unknown }).cause) {
    seen.add(e);
    if (e instanceof PiccoloError) return e;
    if (e instanceof Error && e.name === "AbortError") {
      return new PiccoloError("cancelled", "the call was cancelled", { cause: err });
    }
    const errno = e as ErrnoLike;
    if (typeof errno.code === "string") {
      const where = [errno.address, errno.path, errno.port].filter((x) => x !== undefined).join(":");
      if (ERRNO_UNAVAILABLE.has(errno.code) && errno.syscall === "connect") {
        return new PiccoloError("unavailable", `cannot connect to ${where || "a host part"} (${errno.code})`, {
          reason: "HOST_PART_UNAVAILABLE",
          cause: err,
        });
      }
      if (errno.code === "EACCES" || errno.code === "EPERM") {
        return new PiccoloError("permission_denied", `permission denied on ${where || "a host resource"} (${errno.code})`, {
          cause: err,
        });
      }
      if (errno.code === "ENOSPC") {
        return new PiccoloError("resource_exhausted", `no space left on ${where || "the device"}`, { cause: err });
      }
    }
  }
  const message = err instanceof Error ? err.message : String(err);
  return new PiccoloError("internal", `internal error: ${message}`, { cause: err });
}

/** A google.rpc.Status for the error (code, message, details) plus the HTTP status to use. */
export interface RpcErrorStatus {
  readonly code: GrpcStatus;
  readonly message: string;
  readonly httpStatus: number;
  readonly status: Status;
}

const pack = (typeName: string, bytes: Uint8Array): Any => ({ typeUrl: `type.googleapis.com/${typeName}`, value: bytes });

/** Maps any thrown value to the rich status both transports send. */
export function toRpcStatus(err: unknown): RpcErrorStatus {
  const e = toPiccoloError(err);
  const { grpc, http } = ERROR_TABLE[e.kind];
  const details: Any[] = [];
  const metadata: Record<string, string> = { ...e.metadata };
  if (e.field) metadata["field"] = e.field;
  details.push(
    pack(
      "google.rpc.ErrorInfo",
      ErrorInfo.encode({ reason: e.reason ?? e.kind.toUpperCase(), domain: ERROR_DOMAIN, metadata }).finish(),
    ),
  );
  if (e.kind === "invalid_argument" && e.field) {
    details.push(
      pack(
        "google.rpc.BadRequest",
        BadRequest.encode({
          fieldViolations: [{ field: e.field, description: e.message, reason: e.reason ?? "", localizedMessage: undefined }],
        }).finish(),
      ),
    );
  }
  if (e.kind === "failed_precondition" && e.metadata["operation_id"]) {
    details.push(
      pack(
        "google.rpc.PreconditionFailure",
        PreconditionFailure.encode({
          violations: [{ type: e.reason ?? "BUSY", subject: e.metadata["operation_id"], description: e.message }],
        }).finish(),
      ),
    );
  }
  return { code: grpc, message: e.message, httpStatus: http, status: { code: grpc, message: e.message, details } };
}
