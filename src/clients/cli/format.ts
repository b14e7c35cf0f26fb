/**
 * piccoloctl's output: proto3 JSON through the API's descriptors (one document for a unary
 * answer, one line per event for a stream) and the text forms of versions, health, operations
 * and operation results.
 */
import type { JsonValue } from "@bufbuild/protobuf";
import type { BinaryWriter } from "@bufbuild/protobuf/wire";
import type { Any } from "../../../gen/google/protobuf/any.js";
import type { Duration } from "../../../gen/google/protobuf/duration.js";
import type { Status } from "../../../gen/google/rpc/status.js";
import { BuildImageResult, ImportImageResult, PullImageResult, type Image } from "../../../gen/piccolo/containers/v1/containers.js";
import { OperationEvent, type Operation } from "../../../gen/piccolo/operations/v1/operations.js";
import {
  CheckStatus,
  HealthState,
  RunDiagnosticsResult,
  type GetHealthResponse,
  type GetVersionResponse,
  type HealthCheck,
} from "../../../gen/piccolo/system/v1/system.js";
import { apiRegistry, binaryToJson } from "../../common/proto-registry.js";
import { codeName } from "./errors.js";
import { formatBytes, formatRate, percentOf, stateName } from "./progress.js";

/** The `encode` half of a ts-proto message's functions. */
export interface Encoder<T> {
  encode(message: T, writer?: BinaryWriter): BinaryWriter;
}

/** A message as proto3 JSON, by its full type name and its ts-proto encoder. */
export function protoJson<T>(typeName: string, fns: Encoder<T>, message: T): JsonValue {
  return binaryToJson(typeName, fns.encode(message).finish());
}

/** One JSON document (indented) for a unary answer, with a trailing newline. */
export function jsonDocument<T>(typeName: string, fns: Encoder<T>, message: T): string {
  return `${JSON.stringify(protoJson(typeName, fns, message), null, 2)}\n`;
}

/** One NDJSON line for an operation event. */
export function eventJsonLine(ev: OperationEvent): string {
  return `${JSON.stringify(protoJson("piccolo.operations.v1.OperationEvent", OperationEvent, ev))}\n`;
}

/** The type URL of a RunDiagnosticsResult. */
export const DIAGNOSTICS_RESULT_URL = "type.googleapis.com/piccolo.system.v1.RunDiagnosticsResult";

/** "HEALTH_STATE_DEGRADED" → "DEGRADED". */
export function healthStateName(state: HealthState): string {
  return (HealthState[state] ?? `STATE_${state}`).replace(/^HEALTH_STATE_/, "");
}

/** "CHECK_STATUS_WARN" → "WARN". */
export function checkStatusName(status: CheckStatus): string {
  return (CheckStatus[status] ?? `STATUS_${status}`).replace(/^CHECK_STATUS_/, "");
}

/** A time as ISO 8601 UTC without milliseconds, or "-". */
export function formatTime(t: Date | undefined): string {
  return t ? t.toISOString().replace(/\.\d{3}Z$/, "Z") : "-";
}

/** Formats a google.protobuf.Duration as milliseconds with two decimals. */
export function formatMs(d: Duration | undefined): string {
  if (!d) return "-";
  return `${((d.seconds || 0) * 1000 + (d.nanos || 0) / 1e6).toFixed(2)} ms`;
}

/** Left-aligned columns separated by two spaces; the last column is not padded. */
export function table(rows: readonly (readonly string[])[]): string {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => (widths[i] = Math.max(widths[i] ?? 0, c.length)));
  return rows
    .map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join("  ").trimEnd())
    .map((l) => `${l}\n`)
    .join("");
}

/** GetVersion as text. */
export function formatVersion(v: GetVersionResponse, tlsFingerprint?: string): string {
  const os = v.os;
  const osText = os ? `${os.prettyName || os.name || os.id}${os.id || os.versionId ? ` (${[os.id, os.versionId].filter(Boolean).join(" ")})` : ""}` : "-";
  const build = [`commit ${v.commit || "unknown"}`, v.buildTime ? `built ${formatTime(v.buildTime)}` : ""].filter(Boolean).join(", ");
  return table([
    ["piccolod", `${v.version} (${build})`],
    ["node", v.nodeVersion],
    ["os", osText],
    ["kernel", v.kernel || "-"],
    ...(tlsFingerprint !== undefined ? [["tls sha256", tlsFingerprint]] : []),
  ]);
}

/** One line per check: status, name (marked when required), detail. */
export function formatChecks(checks: readonly HealthCheck[]): string {
  return table(checks.map((c) => [checkStatusName(c.status), c.required ? `${c.name} (required)` : c.name, c.detail]));
}

/** GetHealth as text: the overall state, then one line per check. */
export function formatHealth(h: GetHealthResponse): string {
  return `${healthStateName(h.state)}${h.checkTime ? ` (checked ${formatTime(h.checkTime)})` : ""}\n${formatChecks(h.checks)}`;
}

/** A RunDiagnosticsResult as text. */
export function formatDiagnosticsResult(r: RunDiagnosticsResult): string {
  return (
    `${healthStateName(r.state)}\n${formatChecks(r.checks)}` +
    `write throughput: ${formatRate(r.writeBytesPerSecond)}, fsync latency: ${formatMs(r.fsyncLatency)}\n`
  );
}

/** "sha256:0123456789ab…" → "0123456789ab". */
export function shortId(id: string): string {
  return id.replace(/^sha256:/, "").slice(0, 12);
}

/** One image in a result: id, tags and size. */
function imageLines(image: Image | undefined): string[][] {
  if (!image) return [["image:", "-"]];
  return [
    ["image:", image.id],
    ["tags:", image.repoTags.length > 0 ? image.repoTags.join(", ") : "<none>"],
    ["size:", formatBytes(image.sizeBytes)],
  ];
}

/** A PullImageResult as text: the image, the bytes downloaded and one line per layer. */
export function formatPullImageResult(r: PullImageResult): string {
  const rows = [...imageLines(r.image), ["downloaded:", `${formatBytes(r.bytesTotal)} (${r.bytesTotal} bytes) in ${r.layers.length} layers`]];
  if (r.status) rows.push(["status:", r.status]);
  let text = table(rows);
  if (r.layers.length > 0) {
    text += "layers:\n";
    text += indent(table(r.layers.map((l) => [l.id, l.alreadyPresent ? "already present" : formatBytes(l.sizeBytes)])));
  }
  return text;
}

/** An ImportImageResult as text: the bytes read and each image imported. */
export function formatImportImageResult(r: ImportImageResult): string {
  let text = table([["read:", `${formatBytes(r.bytesRead)} (${r.bytesRead} bytes)`]]);
  for (const image of r.images) text += table(imageLines(image));
  return text;
}

/** A BuildImageResult as text: the image and the steps run. */
export function formatBuildImageResult(r: BuildImageResult): string {
  return table([...imageLines(r.image), ["steps:", String(r.steps)]]);
}

const RESULT_FORMATS: Readonly<Record<string, (value: Uint8Array) => string>> = {
  [DIAGNOSTICS_RESULT_URL]: (v) => formatDiagnosticsResult(RunDiagnosticsResult.decode(v)),
  "type.googleapis.com/piccolo.containers.v1.PullImageResult": (v) => formatPullImageResult(PullImageResult.decode(v)),
  "type.googleapis.com/piccolo.containers.v1.ImportImageResult": (v) => formatImportImageResult(ImportImageResult.decode(v)),
  "type.googleapis.com/piccolo.containers.v1.BuildImageResult": (v) => formatBuildImageResult(BuildImageResult.decode(v)),
};

/** An operation result (google.protobuf.Any) as text: known types in their own form, others as JSON. */
export function formatResult(result: Any): string {
  const known = RESULT_FORMATS[result.typeUrl];
  if (known) return known(result.value);
  const typeName = result.typeUrl.slice(result.typeUrl.lastIndexOf("/") + 1);
  if (apiRegistry.getMessage(typeName)) return `${typeName} ${JSON.stringify(binaryToJson(typeName, result.value), null, 2)}\n`;
  return `${typeName} (${result.value.length} bytes)\n`;
}

/** A google.rpc.Status as "CODE_NAME: message". */
export function formatStatus(s: Status): string {
  return `${codeName(s.code)}: ${s.message}`;
}

/** The progress column of an operation: "42% phase" or "-". */
function progressCell(op: Operation): string {
  const p = op.progress;
  return p ? `${percentOf(p)}%${p.phase ? ` ${p.phase}` : ""}` : "-";
}

/** A list of operations as a table, newest first. */
export function formatOperationList(ops: readonly Operation[]): string {
  if (ops.length === 0) return "no operations\n";
  return table([
    ["ID", "KIND", "STATE", "PROGRESS", "CREATED", "ACTOR"],
    ...ops.map((o) => [o.id, o.kind, stateName(o.state), progressCell(o), formatTime(o.createTime), o.actor || "-"]),
  ]);
}

/** One operation in detail. */
export function formatOperation(op: Operation): string {
  const p = op.progress;
  const rows: string[][] = [
    ["id:", op.id],
    ["kind:", op.kind],
    ["state:", stateName(op.state)],
    ["actor:", op.actor || "-"],
    ["created:", formatTime(op.createTime)],
    ["started:", formatTime(op.startTime)],
    ["ended:", formatTime(op.endTime)],
    ["last sequence:", String(op.lastSequence)],
    ["progress:", p ? `${percentOf(p)}% ${p.phase}${p.message ? `: ${p.message}` : ""}` : "-"],
    ["cancellable:", op.cancellable ? "yes" : "no"],
    ["exclusive:", op.exclusive ? "yes" : "no"],
  ];
  if (op.error) rows.push(["error:", formatStatus(op.error)]);
  let text = table(rows);
  if (op.result) text += `result:\n${indent(formatResult(op.result))}`;
  return text;
}

/** Indents every line by two spaces. */
export function indent(text: string): string {
  return text.replace(/^(?=.)/gm, "  ");
}
