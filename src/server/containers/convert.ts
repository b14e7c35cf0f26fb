/**
 * Turning the engine's JSON (container list entries, inspect answers, stats samples, events,
 * images) into the API's messages. Pure functions, so what a client sees can be tested without
 * an engine.
 */
import {
  ContainerEventType,
  ContainerState,
  HealthStatus,
  MountType,
  PortProtocol,
  RestartPolicy,
  type Container,
  type ContainerEvent,
  ContainerSpec,
  type ContainerStats,
  type Image,
  type Mount,
  type PortPublication,
} from "../../../gen/piccolo/containers/v1/containers.js";
import type { ContainerInfo, ContainerInspectInfo, EngineEvent, ImageInfo, ImageInspectInfo } from "./docker.js";
import { MANAGED_LABEL, RESERVED_LABEL_PREFIX } from "./spec.js";

const STATE: Record<string, ContainerState> = {
  created: ContainerState.CONTAINER_STATE_CREATED,
  running: ContainerState.CONTAINER_STATE_RUNNING,
  paused: ContainerState.CONTAINER_STATE_PAUSED,
  restarting: ContainerState.CONTAINER_STATE_RESTARTING,
  removing: ContainerState.CONTAINER_STATE_REMOVING,
  exited: ContainerState.CONTAINER_STATE_EXITED,
  dead: ContainerState.CONTAINER_STATE_DEAD,
};

const HEALTH: Record<string, HealthStatus> = {
  starting: HealthStatus.HEALTH_STATUS_STARTING,
  healthy: HealthStatus.HEALTH_STATUS_HEALTHY,
  unhealthy: HealthStatus.HEALTH_STATUS_UNHEALTHY,
};

const RESTART: Record<string, RestartPolicy> = {
  "": RestartPolicy.RESTART_POLICY_NO,
  no: RestartPolicy.RESTART_POLICY_NO,
  "on-failure": RestartPolicy.RESTART_POLICY_ON_FAILURE,
  always: RestartPolicy.RESTART_POLICY_ALWAYS,
  "unless-stopped": RestartPolicy.RESTART_POLICY_UNLESS_STOPPED,
};

const PROTOCOL: Record<string, PortProtocol> = {
  tcp: PortProtocol.PORT_PROTOCOL_TCP,
  udp: PortProtocol.PORT_PROTOCOL_UDP,
  sctp: PortProtocol.PORT_PROTOCOL_SCTP,
};

const EVENT: Record<string, ContainerEventType> = {
  create: ContainerEventType.CONTAINER_EVENT_TYPE_CREATE,
  start: ContainerEventType.CONTAINER_EVENT_TYPE_START,
  restart: ContainerEventType.CONTAINER_EVENT_TYPE_RESTART,
  stop: ContainerEventType.CONTAINER_EVENT_TYPE_STOP,
  kill: ContainerEventType.CONTAINER_EVENT_TYPE_KILL,
  die: ContainerEventType.CONTAINER_EVENT_TYPE_DIE,
  oom: ContainerEventType.CONTAINER_EVENT_TYPE_OOM,
  pause: ContainerEventType.CONTAINER_EVENT_TYPE_PAUSE,
  unpause: ContainerEventType.CONTAINER_EVENT_TYPE_UNPAUSE,
  destroy: ContainerEventType.CONTAINER_EVENT_TYPE_DESTROY,
  rename: ContainerEventType.CONTAINER_EVENT_TYPE_RENAME,
  health_status: ContainerEventType.CONTAINER_EVENT_TYPE_HEALTH_STATUS,
};

/** The engine actions WatchEvents asks for (exec and attach events are noise to a user). */
export const WATCHED_ACTIONS = Object.keys(EVENT);

/** Docker's zero time, which inspect uses for "never". */
const ZERO_TIME = "0001-01-01T00:00:00Z";

const time = (s: string | undefined): Date | undefined => {
  if (!s || s.startsWith("0001-01-01")) return undefined;
  const d = new Date(s);
  return Number.isNaN(d.getTime()) ? undefined : d;
};

/** A duration the way `docker ps` says it ("Less than a second", "3 minutes", "About an hour"). */
export function humanDuration(ms: number): string {
  const s = Math.round(ms / 1000);
  if (s < 1) return "Less than a second";
  if (s === 1) return "1 second";
  if (s < 60) return `${s} seconds`;
  const m = Math.round(s / 60);
  if (m === 1) return "About a minute";
  if (m < 60) return `${m} minutes`;
  const h = Math.round(s / 3600);
  if (h === 1) return "About an hour";
  if (h < 48) return `${h} hours`;
  if (h < 24 * 7 * 2) return `${Math.round(h / 24)} days`;
  if (h < 24 * 30 * 2) return `${Math.round(h / 24 / 7)} weeks`;
  if (h < 24 * 365 * 2) return `${Math.round(h / 24 / 30)} months`;
  return `${Math.round(h / 24 / 365)} years`;
}

const userLabels = (labels: Readonly<Record<string, string>> | null | undefined): Record<string, string> =>
  Object.fromEntries(Object.entries(labels ?? {}).filter(([k]) => !k.startsWith(RESERVED_LABEL_PREFIX)));


/** A container from a list entry: the summary fields ListContainers documents. */
export function containerFromSummary(c: ContainerInfo): Container {
  const name = (c.Names?.[0] ?? "").replace(/^\//, "");
  return {
    id: c.Id,
    name,
    image: c.Image,
    imageId: c.ImageID,
    state: STATE[c.State] ?? ContainerState.CONTAINER_STATE_UNSPECIFIED,
    status: c.Status,
    createTime: new Date(c.Created * 1000),
    startTime: undefined,
    finishTime: undefined,
    exitCode: 0,
    error: "",
    health: /\(healthy\)/.test(c.Status)
      ? HealthStatus.HEALTH_STATUS_HEALTHY
      : /\(unhealthy\)/.test(c.Status)
        ? HealthStatus.HEALTH_STATUS_UNHEALTHY
        : /\(health: starting\)/.test(c.Status)
          ? HealthStatus.HEALTH_STATUS_STARTING
          : HealthStatus.HEALTH_STATUS_UNSPECIFIED,
    managed: c.Labels?.[MANAGED_LABEL] === "true",
    restartCount: 0,
    spec: ContainerSpec.fromPartial({ name, image: c.Image, labels: userLabels(c.Labels) }),
  };
}

/** One line for people, the way `docker ps` says it. */
function statusLine(info: ContainerInspectInfo, now: number): string {
  const st = info.State;
  const started = time(st.StartedAt);
  const finished = time(st.FinishedAt);
  const health = st.Health?.Status && st.Health.Status !== "none" ? ` (${st.Health.Status === "starting" ? "health: starting" : st.Health.Status})` : "";
  switch (st.Status) {
    case "running":
      return `Up ${humanDuration(now - (started?.getTime() ?? now))}${health}`;
    case "paused":
      return `Up ${humanDuration(now - (started?.getTime() ?? now))} (Paused)`;
    case "restarting":
      return `Restarting (${st.ExitCode}) ${humanDuration(now - (finished?.getTime() ?? now))} ago`;
    case "exited":
      return finished ? `Exited (${st.ExitCode}) ${humanDuration(now - finished.getTime())} ago` : "Created";
    case "created":
      return "Created";
    case "removing":
      return "Removal In Progress";
    case "dead":
      return "Dead";
    default:
      return st.Status;
  }
}

const durationOf = (ns: number | undefined): { seconds: number; nanos: number } | undefined =>
  ns ? { seconds: Math.floor(ns / 1e9), nanos: ns % 1e9 } : undefined;

/** The spec a container has in the engine, read back from its inspect answer. */
export function specFromInspect(info: ContainerInspectInfo): ContainerSpec {
  const hc = info.HostConfig;
  const ports: PortPublication[] = [];
  for (const [key, list] of Object.entries((hc.PortBindings ?? {}) as Record<string, { HostIp?: string; HostPort?: string }[] | null>)) {
    const [port = "0", proto = "tcp"] = key.split("/");
    for (const b of list ?? []) {
      ports.push({
        hostAddress: b.HostIp ?? "",
        hostPort: Number(b.HostPort || 0),
        containerPort: Number(port),
        protocol: PROTOCOL[proto] ?? PortProtocol.PORT_PROTOCOL_TCP,
      });
    }
  }
  const mounts: Mount[] = (info.Mounts ?? [])
    .filter((m) => m.Type === "bind" || m.Type === "volume")
    .map((m) => ({
      type: m.Type === "bind" ? MountType.MOUNT_TYPE_BIND : MountType.MOUNT_TYPE_VOLUME,
      source: m.Type === "bind" ? m.Source : (m.Name ?? ""),
      target: m.Destination,
      readOnly: !m.RW,
    }));
  const env: Record<string, string> = {};
  for (const kv of info.Config.Env ?? []) {
    const eq = kv.indexOf("=");
    if (eq > 0) env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  const entrypoint = info.Config.Entrypoint;
  const test = info.Config.Healthcheck?.Test ?? [];
  const hcCommand = test[0] === "CMD" ? test.slice(1) : test[0] === "CMD-SHELL" ? ["/bin/sh", "-c", test.slice(1).join(" ")] : [];
  const h = info.Config.Healthcheck as { Interval?: number; Timeout?: number; Retries?: number; StartPeriod?: number } | undefined;
  const network = hc.NetworkMode === "default" ? "" : (hc.NetworkMode ?? "");
  return {
    name: info.Name.replace(/^\//, ""),
    image: info.Config.Image,
    command: info.Config.Cmd ?? [],
    entrypoint: Array.isArray(entrypoint) ? entrypoint : entrypoint ? [entrypoint] : [],
    env,
    ports,
    mounts,
    restartPolicy: RESTART[hc.RestartPolicy?.Name ?? ""] ?? RestartPolicy.RESTART_POLICY_UNSPECIFIED,
    restartMaxRetries: hc.RestartPolicy?.MaximumRetryCount ?? 0,
    resources: { cpus: (hc.NanoCpus ?? 0) / 1e9, memoryBytes: hc.Memory ?? 0 },
    labels: userLabels(info.Config.Labels),
    network,
    healthcheck:
      hcCommand.length > 0
        ? {
            command: hcCommand,
            interval: durationOf(h?.Interval),
            timeout: durationOf(h?.Timeout),
            retries: h?.Retries ?? 0,
            startPeriod: durationOf(h?.StartPeriod),
          }
        : undefined,
    privileged: hc.Privileged ?? false,
    pidMode: hc.PidMode ?? "",
    ipcMode: hc.IpcMode ?? "",
  };
}

/** A container from its inspect answer, every field filled. */
export function containerFromInspect(info: ContainerInspectInfo, now = Date.now()): Container {
  const st = info.State;
  return {
    id: info.Id,
    name: info.Name.replace(/^\//, ""),
    image: info.Config.Image,
    imageId: info.Image,
    state: STATE[st.Status] ?? ContainerState.CONTAINER_STATE_UNSPECIFIED,
    status: statusLine(info, now),
    createTime: time(info.Created),
    startTime: st.StartedAt === ZERO_TIME ? undefined : time(st.StartedAt),
    finishTime: st.FinishedAt === ZERO_TIME ? undefined : time(st.FinishedAt),
    exitCode: st.ExitCode,
    error: st.Error ?? "",
    health: HEALTH[st.Health?.Status ?? ""] ?? HealthStatus.HEALTH_STATUS_UNSPECIFIED,
    managed: info.Config.Labels?.[MANAGED_LABEL] === "true",
    restartCount: info.RestartCount,
    spec: specFromInspect(info),
  };
}

/** The engine's stats sample, loosely typed: its shape differs between cgroup v1 and v2. */
interface RawStats {
  read?: string;
  id?: string;
  name?: string;
  cpu_stats?: { cpu_usage?: { total_usage?: number; percpu_usage?: number[] }; system_cpu_usage?: number; online_cpus?: number };
  precpu_stats?: { cpu_usage?: { total_usage?: number }; system_cpu_usage?: number };
  memory_stats?: { usage?: number; limit?: number; stats?: Record<string, number> };
  networks?: Record<string, { rx_bytes?: number; tx_bytes?: number }>;
  blkio_stats?: { io_service_bytes_recursive?: { op?: string; value?: number }[] | null };
  pids_stats?: { current?: number };
}

/** A stats sample, computed the way `docker stats` computes it. */
export function statsFrom(raw: unknown, id: string, name: string): ContainerStats {
  const s = raw as RawStats;
  const cpuDelta = (s.cpu_stats?.cpu_usage?.total_usage ?? 0) - (s.precpu_stats?.cpu_usage?.total_usage ?? 0);
  const systemDelta = (s.cpu_stats?.system_cpu_usage ?? 0) - (s.precpu_stats?.system_cpu_usage ?? 0);
  const online = s.cpu_stats?.online_cpus || s.cpu_stats?.cpu_usage?.percpu_usage?.length || 0;
  const cpuPercent = systemDelta > 0 && cpuDelta > 0 ? (cpuDelta / systemDelta) * online * 100 : 0;
  const mem = s.memory_stats ?? {};
  // Page cache is not the container's own use: cgroup v1 calls it total_inactive_file, v2 inactive_file.
  const cache = mem.stats?.["total_inactive_file"] ?? mem.stats?.["inactive_file"] ?? 0;
  const usage = Math.max(0, (mem.usage ?? 0) - (cache < (mem.usage ?? 0) ? cache : 0));
  const limit = mem.limit ?? 0;
  let rx = 0;
  let tx = 0;
  for (const n of Object.values(s.networks ?? {})) {
    rx += n.rx_bytes ?? 0;
    tx += n.tx_bytes ?? 0;
  }
  let read = 0;
  let write = 0;
  for (const e of s.blkio_stats?.io_service_bytes_recursive ?? []) {
    const op = (e.op ?? "").toLowerCase();
    if (op === "read") read += e.value ?? 0;
    if (op === "write") write += e.value ?? 0;
  }
  const t = time(s.read);
  return {
    id: s.id ?? id,
    name: (s.name ?? name).replace(/^\//, ""),
    time: t ?? new Date(),
    cpuPercent,
    onlineCpus: online,
    memoryUsageBytes: usage,
    memoryLimitBytes: limit,
    memoryPercent: limit > 0 ? (usage / limit) * 100 : 0,
    networkRxBytes: rx,
    networkTxBytes: tx,
    blockReadBytes: read,
    blockWriteBytes: write,
    pids: s.pids_stats?.current ?? 0,
  };
}

/** A container event from an engine event; undefined for events that are not about a container. */
export function eventFrom(e: EngineEvent): ContainerEvent | undefined {
  if (e.Type !== "container" || !e.Action) return undefined;
  const attrs = e.Actor?.Attributes ?? {};
  const verb = e.Action.split(":")[0]!.trim();
  const health = verb === "health_status" ? (HEALTH[e.Action.slice(e.Action.indexOf(":") + 1).trim()] ?? HealthStatus.HEALTH_STATUS_UNSPECIFIED) : HealthStatus.HEALTH_STATUS_UNSPECIFIED;
  const ms = e.timeNano ? Math.floor(e.timeNano / 1e6) : (e.time ?? 0) * 1000;
  return {
    time: new Date(ms),
    type: EVENT[verb] ?? ContainerEventType.CONTAINER_EVENT_TYPE_UNSPECIFIED,
    action: e.Action,
    containerId: e.Actor?.ID ?? "",
    containerName: attrs["name"] ?? "",
    image: attrs["image"] ?? "",
    managed: attrs[MANAGED_LABEL] === "true",
    exitCode: verb === "die" ? Number(attrs["exitCode"] ?? 0) : 0,
    health,
    signal: verb === "kill" ? (attrs["signal"] ?? "") : "",
  };
}

const realTags = (tags: readonly string[] | null | undefined): string[] => (tags ?? []).filter((t) => !t.startsWith("<none>"));

/** An image from a list entry. */
export function imageFromSummary(i: ImageInfo): Image {
  return {
    id: i.Id,
    repoTags: realTags(i.RepoTags),
    repoDigests: realTags(i.RepoDigests),
    sizeBytes: i.Size,
    createTime: new Date(i.Created * 1000),
    labels: { ...(i.Labels ?? {}) },
  };
}

/** An image from its inspect answer. */
export function imageFromInspect(i: ImageInspectInfo): Image {
  return {
    id: i.Id,
    repoTags: realTags(i.RepoTags),
    repoDigests: realTags(i.RepoDigests),
    sizeBytes: i.Size,
    createTime: time(i.Created),
    labels: { ...(i.Config?.Labels ?? {}) },
  };
}
