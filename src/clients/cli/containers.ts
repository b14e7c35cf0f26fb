/**
 * piccoloctl's `containers …` and `images …` commands: flag parsers that turn docker-like flags
 * into a ContainerSpec (a malformed flag is a UsageError naming it, exit 2), the text forms of
 * containers, stats, events and images, and the commands themselves. Pull, import and build are
 * operations followed with followOperation; logs, stats and events stream until Ctrl-C.
 */
import {
  Container,
  ContainerEvent,
  ContainerEventType,
  ContainerSpec,
  ContainerState,
  ContainerStats,
  EnsureRunningAction,
  EnsureRunningResponse,
  HealthStatus,
  ImportFormat,
  ListContainersResponse,
  ListImagesResponse,
  LogEntry,
  LogStream,
  MountType,
  PortProtocol,
  RemoveContainerResponse,
  RemoveImageResponse,
  RestartPolicy,
  type Mount,
  type PortPublication,
} from "../../../gen/piccolo/containers/v1/containers.js";
import type { OperationEvent } from "../../../gen/piccolo/operations/v1/operations.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatTime, indent, jsonDocument, protoJson, shortId, table, type Encoder } from "./format.js";
import { formatBytes } from "./progress.js";

// ---------------------------------------------------------------------------------------------
// Flag parsers

const fail = (flag: string, value: string, why: string): never => {
  throw new UsageError(`${flag} ${JSON.stringify(value)}: ${why}`);
};

/** `-e K=V` / `-l k=v` values into a map; the key must be non-empty. */
export function parseKeyValues(flag: string, values: readonly string[], form = "KEY=VALUE"): Record<string, string> {
  const out: Record<string, string> = {};
  for (const v of values) {
    const i = v.indexOf("=");
    if (i <= 0) fail(flag, v, `expected ${form}`);
    out[v.slice(0, i)] = v.slice(i + 1);
  }
  return out;
}

const PROTOCOLS: Readonly<Record<string, PortProtocol>> = {
  tcp: PortProtocol.PORT_PROTOCOL_TCP,
  udp: PortProtocol.PORT_PROTOCOL_UDP,
  sctp: PortProtocol.PORT_PROTOCOL_SCTP,
};

function portNumber(flag: string, value: string, text: string, min: number): number {
  if (!/^\d{1,5}$/.test(text)) return fail(flag, value, `${JSON.stringify(text)} is not a port number`);
  const n = Number(text);
  if (n < min || n > 65535) return fail(flag, value, `port ${n} is out of range (${min}-65535)`);
  return n;
}

/** `-p [hostaddr:]hostport:containerport[/proto]` (or just `containerport[/proto]`: any free host port). */
export function parsePort(value: string, flag = "-p"): PortPublication {
  let rest = value.trim();
  let protocol = PortProtocol.PORT_PROTOCOL_TCP;
  const slash = rest.lastIndexOf("/");
  if (slash >= 0) {
    const p = PROTOCOLS[rest.slice(slash + 1).toLowerCase()];
    if (p === undefined) fail(flag, value, "the protocol must be tcp, udp or sctp");
    protocol = p!;
    rest = rest.slice(0, slash);
  }
  let hostAddress = "";
  if (rest.startsWith("[")) {
    const end = rest.indexOf("]:");
    if (end < 0) fail(flag, value, "expected [ipv6-address]:hostport:containerport");
    hostAddress = rest.slice(1, end);
    rest = rest.slice(end + 2);
    if (rest.split(":").length !== 2) fail(flag, value, "expected [ipv6-address]:hostport:containerport");
  }
  const parts = rest.split(":");
  let hostPort = 0;
  let containerText: string;
  if (parts.length === 1) containerText = parts[0]!;
  else if (parts.length === 2) {
    hostPort = portNumber(flag, value, parts[0]!, 0);
    containerText = parts[1]!;
  } else if (parts.length === 3 && !hostAddress) {
    hostAddress = parts[0]!;
    if (!hostAddress) fail(flag, value, "the host address is empty");
    hostPort = portNumber(flag, value, parts[1]!, 0);
    containerText = parts[2]!;
  } else return fail(flag, value, "expected [hostaddr:]hostport:containerport[/tcp|udp|sctp]");
  return { hostAddress, hostPort, containerPort: portNumber(flag, value, containerText, 1), protocol };
}

function readOnlyOf(flag: string, value: string, mode: string | undefined): boolean {
  if (mode === undefined || mode === "rw") return false;
  if (mode === "ro") return true;
  return fail(flag, value, `the mode must be ro or rw, not ${JSON.stringify(mode)}`);
}

/** `-v hostpath:containerpath[:ro|rw]`: a bind mount of an absolute host path. */
export function parseBind(value: string, flag = "-v"): Mount {
  const parts = value.split(":");
  if (parts.length < 2 || parts.length > 3) fail(flag, value, "expected /host/path:/container/path[:ro]");
  const [source, target] = parts as [string, string];
  if (!source.startsWith("/")) fail(flag, value, "the host path must be absolute (use --volume-name for a named volume)");
  if (!target.startsWith("/")) fail(flag, value, "the container path must be absolute");
  return { type: MountType.MOUNT_TYPE_BIND, source, target, readOnly: readOnlyOf(flag, value, parts[2]) };
}

/** `--volume-name name:containerpath[:ro|rw]`: a named volume (an empty name makes an anonymous one). */
export function parseVolume(value: string, flag = "--volume-name"): Mount {
  const parts = value.split(":");
  if (parts.length < 2 || parts.length > 3) fail(flag, value, "expected name:/container/path[:ro]");
  const [source, target] = parts as [string, string];
  if (source.includes("/")) fail(flag, value, "a volume name has no slashes (use -v for a host path)");
  if (!target.startsWith("/")) fail(flag, value, "the container path must be absolute");
  return { type: MountType.MOUNT_TYPE_VOLUME, source, target, readOnly: readOnlyOf(flag, value, parts[2]) };
}

/** `--restart no|on-failure[:N]|always|unless-stopped`. */
export function parseRestart(value: string, flag = "--restart"): { restartPolicy: RestartPolicy; restartMaxRetries: number } {
  const v = value.trim().toLowerCase();
  const m = /^on-failure(?::(\d+))?$/.exec(v);
  if (m) return { restartPolicy: RestartPolicy.RESTART_POLICY_ON_FAILURE, restartMaxRetries: m[1] === undefined ? 0 : Number(m[1]) };
  const simple: Record<string, RestartPolicy> = {
    no: RestartPolicy.RESTART_POLICY_NO,
    always: RestartPolicy.RESTART_POLICY_ALWAYS,
    "unless-stopped": RestartPolicy.RESTART_POLICY_UNLESS_STOPPED,
  };
  const p = simple[v];
  if (p === undefined) return fail(flag, value, "expected no, on-failure[:N], always or unless-stopped");
  return { restartPolicy: p, restartMaxRetries: 0 };
}

/** `--cpus N`: a positive decimal number of CPUs. */
export function parseCpus(value: string, flag = "--cpus"): number {
  if (!/^\d+(\.\d+)?$|^\.\d+$/.test(value.trim())) fail(flag, value, "expected a number of CPUs, e.g. 0.5 or 2");
  const n = Number(value);
  if (!(n > 0)) fail(flag, value, "must be more than 0");
  return n;
}

const MEMORY_UNITS: Readonly<Record<string, number>> = { "": 1, b: 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 };

/** `--memory BYTES|Nk|Nm|Ng` (binary units; "512m", "1.5g", "1073741824"). */
export function parseMemory(value: string, flag = "--memory"): number {
  const m = /^(\d+(?:\.\d+)?)\s*([bkmg]?)(?:i?b)?$/i.exec(value.trim());
  if (!m) return fail(flag, value, "expected bytes or a number with k, m or g, e.g. 512m");
  const bytes = Math.floor(Number(m[1]) * MEMORY_UNITS[m[2]!.toLowerCase()]!);
  if (!Number.isSafeInteger(bytes) || bytes <= 0) return fail(flag, value, "must be more than 0 bytes");
  return bytes;
}

/** Splits a command line as a shell would for words: spaces separate, quotes and backslashes group. */
export function splitCommand(value: string, flag = "--cmd"): string[] {
  const words: string[] = [];
  let cur = "";
  let inWord = false;
  let quote: "'" | '"' | undefined;
  for (let i = 0; i < value.length; i++) {
    const ch = value[i]!;
    if (quote === "'") {
      if (ch === "'") quote = undefined;
      else cur += ch;
    } else if (quote === '"') {
      if (ch === '"') quote = undefined;
      else if (ch === "\\" && i + 1 < value.length && '"\\$`'.includes(value[i + 1]!)) cur += value[++i];
      else cur += ch;
    } else if (ch === "'" || ch === '"') {
      quote = ch;
      inWord = true;
    } else if (ch === "\\") {
      if (i + 1 >= value.length) fail(flag, value, "ends with a backslash");
      cur += value[++i];
      inWord = true;
    } else if (/\s/.test(ch)) {
      if (inWord) words.push(cur);
      cur = "";
      inWord = false;
    } else {
      cur += ch;
      inWord = true;
    }
  }
  if (quote) fail(flag, value, `unterminated ${quote} quote`);
  if (inWord) words.push(cur);
  return words;
}

const DURATION_UNITS: Readonly<Record<string, number>> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** `--since`: an RFC 3339 time (or a date), Unix seconds, or a duration ago such as "10m", "2h", "1h30m". */
export function parseSince(value: string, now = Date.now(), flag = "--since"): Date {
  const v = value.trim();
  if (/^(\d+(ms|s|m|h|d))+$/.test(v)) {
    let ms = 0;
    for (const m of v.matchAll(/(\d+)(ms|s|m|h|d)/g)) ms += Number(m[1]) * DURATION_UNITS[m[2]!]!;
    return new Date(now - ms);
  }
  if (/^\d+(\.\d+)?$/.test(v)) return new Date(Number(v) * 1000);
  const t = /^\d{4}-\d{2}-\d{2}/.test(v) ? Date.parse(v) : Number.NaN;
  if (Number.isNaN(t)) return fail(flag, value, "expected a time (2024-05-01T12:00:00Z), Unix seconds or a duration ago (10m, 2h)");
  return new Date(t);
}

/** The flags of `containers create` and `containers run`, as commander collects them. */
export interface SpecOptions {
  readonly image: string;
  readonly cmd?: string;
  readonly entrypoint?: string;
  readonly env?: readonly string[];
  readonly publish?: readonly string[];
  readonly volume?: readonly string[];
  readonly volumeName?: readonly string[];
  readonly restart?: string;
  readonly cpus?: string;
  readonly memory?: string;
  readonly label?: readonly string[];
  readonly network?: string;
}

/** Builds the spec from the flags (and a command given after `--`); UsageError naming the bad flag. */
export function specFromOptions(name: string, o: SpecOptions, command: readonly string[] = []): ContainerSpec {
  if (o.cmd !== undefined && command.length > 0) throw new UsageError("--cmd: give the command either with --cmd or after --, not both");
  if (!o.image || !o.image.trim()) throw new UsageError("--image: an image reference is required");
  const restart = o.restart === undefined ? { restartPolicy: RestartPolicy.RESTART_POLICY_UNSPECIFIED, restartMaxRetries: 0 } : parseRestart(o.restart);
  const cpus = o.cpus === undefined ? 0 : parseCpus(o.cpus);
  const memoryBytes = o.memory === undefined ? 0 : parseMemory(o.memory);
  return {
    name,
    image: o.image.trim(),
    command: o.cmd !== undefined ? splitCommand(o.cmd, "--cmd") : [...command],
    entrypoint: o.entrypoint !== undefined ? splitCommand(o.entrypoint, "--entrypoint") : [],
    env: parseKeyValues("-e", o.env ?? []),
    ports: (o.publish ?? []).map((p) => parsePort(p)),
    mounts: [...(o.volume ?? []).map((v) => parseBind(v)), ...(o.volumeName ?? []).map((v) => parseVolume(v))],
    restartPolicy: restart.restartPolicy,
    restartMaxRetries: restart.restartMaxRetries,
    resources: cpus || memoryBytes ? { cpus, memoryBytes } : undefined,
    labels: parseKeyValues("-l", o.label ?? [], "KEY=VALUE"),
    network: o.network ?? "",
    healthcheck: undefined,
    privileged: false,
    pidMode: "",
    ipcMode: "",
  };
}

// ---------------------------------------------------------------------------------------------
// Text forms

const enumName = (e: Record<number, string>, v: number, prefix: string): string => (e[v] ?? `${prefix}${v}`).replace(prefix, "");

/** "CONTAINER_STATE_RUNNING" → "running". */
export const containerStateName = (s: ContainerState): string => enumName(ContainerState, s, "CONTAINER_STATE_").toLowerCase();

/** A port publication as docker shows it: "127.0.0.1:8080->80/tcp". */
export function formatPort(p: PortPublication): string {
  const proto = p.protocol === PortProtocol.PORT_PROTOCOL_UNSPECIFIED ? "tcp" : enumName(PortProtocol, p.protocol, "PORT_PROTOCOL_").toLowerCase();
  const host = p.hostAddress.includes(":") ? `[${p.hostAddress}]` : p.hostAddress;
  return `${host ? `${host}:` : ""}${p.hostPort || "*"}->${p.containerPort}/${proto}`;
}

/** The container list as a table. */
export function formatContainerList(cs: readonly Container[]): string {
  if (cs.length === 0) return "no containers\n";
  return table([
    ["NAME", "IMAGE", "STATE", "STATUS", "PORTS"],
    ...cs.map((c) => [c.name, c.image, containerStateName(c.state), c.status || "-", (c.spec?.ports ?? []).map(formatPort).join(", ") || "-"]),
  ]);
}

const restartName = (s: ContainerSpec): string => {
  const n = enumName(RestartPolicy, s.restartPolicy, "RESTART_POLICY_").toLowerCase().replace(/_/g, "-");
  return s.restartPolicy === RestartPolicy.RESTART_POLICY_ON_FAILURE && s.restartMaxRetries ? `${n}:${s.restartMaxRetries}` : n;
};

const mountText = (m: Mount): string =>
  `${m.type === MountType.MOUNT_TYPE_VOLUME ? `volume ${m.source || "(anonymous)"}` : m.source}:${m.target}${m.readOnly ? ":ro" : ""}`;

/** One container in detail. */
export function formatContainer(c: Container): string {
  const s = c.spec;
  const rows: string[][] = [
    ["name:", c.name],
    ["id:", c.id],
    ["image:", `${c.image}${c.imageId ? ` (${shortId(c.imageId)})` : ""}`],
    ["state:", containerStateName(c.state)],
    ["status:", c.status || "-"],
    ["created:", formatTime(c.createTime)],
    ["started:", formatTime(c.startTime)],
    ["finished:", formatTime(c.finishTime)],
    ["exit code:", String(c.exitCode)],
  ];
  if (c.error) rows.push(["error:", c.error]);
  if (c.health !== HealthStatus.HEALTH_STATUS_UNSPECIFIED) rows.push(["health:", enumName(HealthStatus, c.health, "HEALTH_STATUS_").toLowerCase()]);
  rows.push(["managed:", c.managed ? "yes" : "no"], ["restarts:", String(c.restartCount)]);
  if (s) {
    if (s.entrypoint.length > 0) rows.push(["entrypoint:", JSON.stringify(s.entrypoint)]);
    rows.push(["command:", s.command.length > 0 ? JSON.stringify(s.command) : "-"]);
    rows.push(["restart:", restartName(s)]);
    if (s.network) rows.push(["network:", s.network]);
    if (s.resources && (s.resources.cpus || s.resources.memoryBytes)) {
      rows.push(["limits:", [s.resources.cpus ? `${s.resources.cpus} CPUs` : "", s.resources.memoryBytes ? formatBytes(s.resources.memoryBytes) : ""].filter(Boolean).join(", ")]);
    }
  }
  let text = table(rows);
  const list = (title: string, items: readonly string[]): void => {
    if (items.length > 0) text += `${title}:\n${indent(items.map((i) => `${i}\n`).join(""))}`;
  };
  if (s) {
    list("ports", s.ports.map(formatPort));
    list("mounts", s.mounts.map(mountText));
    list("env", Object.entries(s.env).map(([k, v]) => `${k}=${v}`));
    list("labels", Object.entries(s.labels).map(([k, v]) => `${k}=${v}`));
  }
  return text;
}

const STATS_HEADER = ["NAME", "CPU %", "MEM USAGE / LIMIT", "MEM %", "NET I/O", "BLOCK I/O", "PIDS"];

/** One stats sample as a table row. */
export function statsRow(s: ContainerStats): string[] {
  return [
    s.name,
    `${s.cpuPercent.toFixed(2)}%`,
    `${formatBytes(s.memoryUsageBytes)} / ${formatBytes(s.memoryLimitBytes)}`,
    `${s.memoryPercent.toFixed(2)}%`,
    `${formatBytes(s.networkRxBytes)} / ${formatBytes(s.networkTxBytes)}`,
    `${formatBytes(s.blockReadBytes)} / ${formatBytes(s.blockWriteBytes)}`,
    String(s.pids),
  ];
}

/** One event as a line: time, type, name, image and what the type adds. */
export function formatEvent(e: ContainerEvent): string {
  const type = e.type === ContainerEventType.CONTAINER_EVENT_TYPE_UNSPECIFIED ? e.action : enumName(ContainerEventType, e.type, "CONTAINER_EVENT_TYPE_").toLowerCase().replace(/_/g, "-");
  const extra: string[] = [];
  if (e.type === ContainerEventType.CONTAINER_EVENT_TYPE_DIE) extra.push(`exit code ${e.exitCode}`);
  if (e.type === ContainerEventType.CONTAINER_EVENT_TYPE_KILL && e.signal) extra.push(`signal ${e.signal}`);
  if (e.type === ContainerEventType.CONTAINER_EVENT_TYPE_HEALTH_STATUS) extra.push(enumName(HealthStatus, e.health, "HEALTH_STATUS_").toLowerCase());
  return `${formatTime(e.time)}  ${type}  ${e.containerName || shortId(e.containerId)}  ${e.image || "-"}${extra.length ? `  ${extra.join(", ")}` : ""}\n`;
}

/** The image list as a table. */
export function formatImageList(r: ListImagesResponse): string {
  if (r.images.length === 0) return "no images\n";
  return table([
    ["ID", "TAGS", "SIZE", "CREATED"],
    ...r.images.map((i) => [shortId(i.id), i.repoTags.length > 0 ? i.repoTags.join(", ") : "<none>", formatBytes(i.sizeBytes), formatTime(i.createTime)]),
  ]);
}

// ---------------------------------------------------------------------------------------------
// Commands

/** One NDJSON line for a streamed message. */
const jsonLine = <T>(typeName: string, fns: Encoder<T>, m: T): string => `${JSON.stringify(protoJson(typeName, fns, m))}\n`;

const T = "piccolo.containers.v1.";

/**
 * Runs `each` for every message of a stream until it ends (0) or Ctrl-C stops it (130); other
 * errors are thrown.
 */
async function drain<M>(c: CommandContext, stream: (signal: AbortSignal) => AsyncIterable<M>, each: (m: M) => void): Promise<number> {
  try {
    for await (const m of stream(c.signal)) each(m);
  } catch (err) {
    if (c.signal.aborted) return 130;
    throw err;
  }
  return c.signal.aborted ? 130 : 0;
}

const printContainer = (c: CommandContext, ctr: Container, text: string): void => {
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}Container`, Container, ctr) : text);
};

/** `containers ls [-a]`. */
export async function containersListCommand(c: CommandContext, opts: { readonly all?: boolean }): Promise<number> {
  const r = await c.api.containers.listContainers({ includeUnmanaged: opts.all === true });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}ListContainersResponse`, ListContainersResponse, r) : formatContainerList(r.containers));
  return 0;
}

/** `containers get NAME`. */
export async function containersGetCommand(c: CommandContext, name: string): Promise<number> {
  const ctr = await c.api.containers.getContainer({ name });
  printContainer(c, ctr, formatContainer(ctr));
  return 0;
}

/** `containers create NAME --image I …`: CreateContainer. */
export async function containersCreateCommand(c: CommandContext, name: string, opts: SpecOptions, command: readonly string[]): Promise<number> {
  const spec = specFromOptions(name, opts, command);
  const ctr = await c.api.containers.createContainer({ spec });
  printContainer(c, ctr, `created ${ctr.name} (${shortId(ctr.id)})\n`);
  return 0;
}

/** `containers run NAME --image I …`: EnsureRunning, printing what it did. */
export async function containersRunCommand(c: CommandContext, name: string, opts: SpecOptions, command: readonly string[]): Promise<number> {
  const spec = specFromOptions(name, opts, command);
  const r = await c.api.containers.ensureRunning({ spec });
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument(`${T}EnsureRunningResponse`, EnsureRunningResponse, r));
    return 0;
  }
  const ctr = r.container;
  const id = ctr ? ` (${shortId(ctr.id)})` : "";
  const what: Record<number, string> = {
    [EnsureRunningAction.ENSURE_RUNNING_ACTION_CREATED]: "created and started",
    [EnsureRunningAction.ENSURE_RUNNING_ACTION_STARTED]: "started",
    [EnsureRunningAction.ENSURE_RUNNING_ACTION_ALREADY_RUNNING]: "already running; nothing changed",
  };
  c.stdout.write(`${ctr?.name || name}${id}: ${what[r.action] ?? enumName(EnsureRunningAction, r.action, "ENSURE_RUNNING_ACTION_")}\n`);
  return 0;
}

const stateLine = (verb: string, ctr: Container): string => `${verb} ${ctr.name}: ${containerStateName(ctr.state)}${ctr.status ? ` (${ctr.status})` : ""}\n`;

/** `containers start NAME`. */
export async function containersStartCommand(c: CommandContext, name: string): Promise<number> {
  const ctr = await c.api.containers.startContainer({ name });
  printContainer(c, ctr, stateLine("started", ctr));
  return 0;
}

/** `containers stop NAME [-t SECONDS]`. */
export async function containersStopCommand(c: CommandContext, name: string, opts: { readonly time?: number }): Promise<number> {
  const ctr = await c.api.containers.stopContainer({ name, gracePeriodSeconds: opts.time });
  printContainer(c, ctr, stateLine("stopped", ctr));
  return 0;
}

/** `containers restart NAME [-t SECONDS]`. */
export async function containersRestartCommand(c: CommandContext, name: string, opts: { readonly time?: number }): Promise<number> {
  const ctr = await c.api.containers.restartContainer({ name, gracePeriodSeconds: opts.time });
  printContainer(c, ctr, stateLine("restarted", ctr));
  return 0;
}

/** `containers rm NAME [-f] [-v]`. */
export async function containersRemoveCommand(c: CommandContext, name: string, opts: { readonly force?: boolean; readonly volumes?: boolean }): Promise<number> {
  const r = await c.api.containers.removeContainer({ name, force: opts.force === true, volumes: opts.volumes === true });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}RemoveContainerResponse`, RemoveContainerResponse, r) : `removed ${name} (${shortId(r.id)})\n`);
  return 0;
}

/** `containers logs NAME [-f] [--tail N] [--since TIME] [-t]`: stdout lines to stdout, stderr lines to stderr. */
export function containersLogsCommand(
  c: CommandContext,
  name: string,
  opts: { readonly follow?: boolean; readonly tail?: number; readonly since?: string; readonly timestamps?: boolean },
): Promise<number> {
  const since = opts.since === undefined ? undefined : parseSince(opts.since);
  const json = c.global.output === "json";
  const timestamps = opts.timestamps === true;
  return drain(
    c,
    (signal) => c.api.containers.streamLogs({ name, follow: opts.follow === true, tail: opts.tail, since, timestamps }, signal),
    (e) => {
      if (json) {
        c.stdout.write(jsonLine(`${T}LogEntry`, LogEntry, e));
        return;
      }
      const line = `${timestamps && e.time ? `${e.time.toISOString()} ` : ""}${e.line}\n`;
      (e.stream === LogStream.LOG_STREAM_STDERR ? c.stderr : c.stdout).write(line);
    },
  );
}

/** `containers stats NAME [--stream]`. */
export function containersStatsCommand(c: CommandContext, name: string, opts: { readonly stream?: boolean }): Promise<number> {
  const json = c.global.output === "json";
  let header = false;
  return drain(
    c,
    (signal) => c.api.containers.getStats({ name, stream: opts.stream === true }, signal),
    (s) => {
      if (json) {
        c.stdout.write(opts.stream ? jsonLine(`${T}ContainerStats`, ContainerStats, s) : jsonDocument(`${T}ContainerStats`, ContainerStats, s));
        return;
      }
      // Column widths fixed from the header so the streamed rows line up.
      const rows = header ? [statsRow(s)] : [STATS_HEADER, statsRow(s)];
      const widths = [24, 8, 24, 8, 24, 24, 5];
      for (const r of rows) c.stdout.write(`${r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]!))).join("  ")}\n`);
      header = true;
    },
  );
}

/** `containers events [-a] [--name NAME] [--since TIME]`: one line per event until Ctrl-C. */
export function containersEventsCommand(c: CommandContext, opts: { readonly all?: boolean; readonly name?: string; readonly since?: string }): Promise<number> {
  const since = opts.since === undefined ? undefined : parseSince(opts.since);
  const json = c.global.output === "json";
  return drain(
    c,
    (signal) => c.api.containers.watchEvents({ includeUnmanaged: opts.all === true, name: opts.name ?? "", since }, signal),
    (e) => c.stdout.write(json ? jsonLine(`${T}ContainerEvent`, ContainerEvent, e) : formatEvent(e)),
  );
}

/** `images ls [REFERENCE]`. */
export async function imagesListCommand(c: CommandContext, reference: string | undefined): Promise<number> {
  const r = await c.api.containers.listImages({ reference: reference ?? "" });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}ListImagesResponse`, ListImagesResponse, r) : formatImageList(r));
  return 0;
}

/** Follows an image operation that `first` starts. */
function followImageOperation(c: CommandContext, first: (signal: AbortSignal) => AsyncIterable<OperationEvent>, detach: boolean | undefined): Promise<number> {
  return followOperation({
    ...followOptionsFrom(c),
    first,
    detach: detach === true,
  });
}

/** `images pull REF`. */
export function imagesPullCommand(c: CommandContext, reference: string, opts: { readonly detach?: boolean }): Promise<number> {
  return followImageOperation(c, (s) => c.api.containers.pullImage({ reference }, s), opts.detach);
}

/** `images import PATH [--tag T] [--rootfs]`. */
export function imagesImportCommand(c: CommandContext, path: string, opts: { readonly tag?: string; readonly rootfs?: boolean; readonly detach?: boolean }): Promise<number> {
  if (!path.startsWith("/")) throw new UsageError(`PATH ${JSON.stringify(path)}: must be an absolute path on the daemon's host`);
  if (opts.rootfs && !opts.tag) throw new UsageError("--tag: required with --rootfs (it names the new image)");
  const format = opts.rootfs ? ImportFormat.IMPORT_FORMAT_ROOTFS : ImportFormat.IMPORT_FORMAT_ARCHIVE;
  return followImageOperation(c, (s) => c.api.containers.importImage({ path, format, reference: opts.tag ?? "" }, s), opts.detach);
}

/** `images build CONTEXT [--dockerfile F] --tag T… [--build-arg K=V]… [--no-cache]`. */
export function imagesBuildCommand(
  c: CommandContext,
  contextPath: string,
  opts: { readonly dockerfile?: string; readonly tag?: readonly string[]; readonly buildArg?: readonly string[]; readonly label?: readonly string[]; readonly noCache?: boolean; readonly detach?: boolean },
): Promise<number> {
  if (!contextPath.startsWith("/")) throw new UsageError(`CONTEXT ${JSON.stringify(contextPath)}: must be an absolute path on the daemon's host`);
  const tags = opts.tag ?? [];
  if (tags.length === 0) throw new UsageError("--tag: at least one tag is required");
  const request = {
    contextPath,
    dockerfile: opts.dockerfile ?? "",
    tags: [...tags],
    buildArgs: parseKeyValues("--build-arg", opts.buildArg ?? []),
    noCache: opts.noCache === true,
    labels: parseKeyValues("-l", opts.label ?? []),
  };
  return followImageOperation(c, (s) => c.api.containers.buildImage(request, s), opts.detach);
}

/** `images rm REF [-f]`. */
export async function imagesRemoveCommand(c: CommandContext, reference: string, opts: { readonly force?: boolean }): Promise<number> {
  const r = await c.api.containers.removeImage({ reference, force: opts.force === true });
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}RemoveImageResponse`, RemoveImageResponse, r));
  else c.stdout.write([...r.untagged.map((u) => `untagged: ${u}\n`), ...r.deleted.map((d) => `deleted: ${d}\n`)].join("") || `removed ${reference}\n`);
  return 0;
}
