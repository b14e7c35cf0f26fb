/**
 * Checking a ContainerSpec and turning it into the engine's create request. Everything a spec
 * can get wrong is found here, before the engine is asked anything, so a refused spec leaves
 * Docker unchanged. Refusals by policy (privileged, host PID/IPC, bind mounts of protected or
 * unlisted host paths) are INVALID_ARGUMENT naming the field; a bind source that does not exist
 * is FAILED_PRECONDITION naming the field.
 */
import { realpath } from "node:fs/promises";
import { isIP } from "node:net";
import { basename, dirname, isAbsolute, join, posix, resolve } from "node:path";
import {
  MountType,
  PortProtocol,
  RestartPolicy,
  type ContainerSpec,
  type Healthcheck,
} from "../../../gen/piccolo/containers/v1/containers.js";
import type { Duration } from "../../../gen/google/protobuf/duration.js";
import { invalidArgument, PiccoloError } from "../errors.js";
import type { ContainerCreateOptions } from "./docker.js";

/** The label every container piccolod creates carries. */
export const MANAGED_LABEL = "space.piccolo.managed";
/** Label keys with this prefix are piccolod's own. */
export const RESERVED_LABEL_PREFIX = "space.piccolo.";

/** What the checks need to know about the host. */
export interface SpecPolicy {
  /** Host folders bind mounts must be below (configured as containerDataRoots). */
  readonly dataRoots: readonly string[];
  /**
   * Host paths no bind mount may expose besides /, /etc, /usr and /var/run/docker.sock (the
   * configured Docker socket, piccolod's state folder), each with what it holds.
   */
  readonly protectedPaths: readonly { readonly path: string; readonly holds: string }[];
  /** CPUs on the host: the most a CPU limit may give. */
  readonly cpuCount: number;
}

/** A port publication as checked: protocol in Docker's spelling, address "" for all. */
export interface CheckedPort {
  readonly hostAddress: string;
  readonly hostPort: number;
  readonly containerPort: number;
  readonly protocol: "tcp" | "udp" | "sctp";
}

/** A checked spec: the container's name, its engine create request, and its publications. */
export interface CheckedSpec {
  readonly name: string;
  readonly image: string;
  readonly body: ContainerCreateOptions;
  readonly ports: readonly CheckedPort[];
}

/** Container names as the engine accepts them, capped at 128 characters. */
export const CONTAINER_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,127}$/;
const VOLUME_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,127}$/;
const NETWORK_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$/;

// The image reference grammar of distribution/reference, which the engine uses.
const ALNUM = "[a-z0-9]+";
const SEPARATOR = "(?:[._]|__|[-]+)";
const PATH_COMPONENT = `${ALNUM}(?:${SEPARATOR}${ALNUM})*`;
const DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const DOMAIN = `(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[0-9a-fA-F:]+\\])(?::[0-9]+)?`;
const NAME = `(?:${DOMAIN}/)?${PATH_COMPONENT}(?:/${PATH_COMPONENT})*`;
const TAG = "[\\w][\\w.-]{0,127}";
const DIGEST = "[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}";
const REFERENCE = new RegExp(`^(${NAME})(?::(${TAG}))?(?:@(${DIGEST}))?$`);

/** Splits an image reference into repository, tag and digest; undefined when it is not one. */
export function parseImageReference(ref: string): { repository: string; tag: string; digest: string } | undefined {
  if (ref.length > 512) return undefined;
  const m = REFERENCE.exec(ref);
  if (!m || m[1]!.length > 255) return undefined;
  return { repository: m[1]!, tag: m[2] ?? "", digest: m[3] ?? "" };
}

/** Checks an image reference field; returns it. */
export function checkImageReference(value: string, field: string): string {
  if (value.trim() === "") throw invalidArgument(field, "is required");
  if (!parseImageReference(value)) {
    throw invalidArgument(field, `${JSON.stringify(value.slice(0, 80))} is not an image reference such as "registry.example:5000/app:1.2"`);
  }
  return value;
}

/** Checks a container name or id field; returns it. */
export function checkContainerName(value: string, field: string): string {
  if (value.trim() === "") throw invalidArgument(field, "is required");
  if (!CONTAINER_NAME.test(value)) {
    throw invalidArgument(
      field,
      `${JSON.stringify(value.slice(0, 80))} is not a container name (a letter or digit, then letters, digits, "_", "." or "-"; 2 to 128 characters)`,
    );
  }
  return value;
}

const noNul = (value: string, field: string): string => {
  if (value.includes("\0")) throw invalidArgument(field, "must not contain NUL characters");
  return value;
};

const PROTOCOL: Record<number, CheckedPort["protocol"]> = {
  [PortProtocol.PORT_PROTOCOL_UNSPECIFIED]: "tcp",
  [PortProtocol.PORT_PROTOCOL_TCP]: "tcp",
  [PortProtocol.PORT_PROTOCOL_UDP]: "udp",
  [PortProtocol.PORT_PROTOCOL_SCTP]: "sctp",
};

const RESTART: Record<number, string> = {
  [RestartPolicy.RESTART_POLICY_UNSPECIFIED]: "no",
  [RestartPolicy.RESTART_POLICY_NO]: "no",
  [RestartPolicy.RESTART_POLICY_ON_FAILURE]: "on-failure",
  [RestartPolicy.RESTART_POLICY_ALWAYS]: "always",
  [RestartPolicy.RESTART_POLICY_UNLESS_STOPPED]: "unless-stopped",
};

const MIN_MEMORY = 6 * 1024 * 1024;

const nanos = (d: Duration): number => d.seconds * 1e9 + d.nanos;

/** Two host addresses clash when they are equal or either is a wildcard. */
export function addressesOverlap(a: string, b: string): boolean {
  const wild = (x: string): boolean => x === "" || x === "0.0.0.0" || x === "::";
  return wild(a) || wild(b) || a === b;
}

const isWithin = (child: string, parent: string): boolean =>
  child === parent || parent === "/" || child.startsWith(parent.endsWith("/") ? parent : `${parent}/`);

/** Why a host path may not be used, or undefined when no protected path is involved. */
function protectedReason(path: string, protectedPaths: readonly { path: string; holds: string }[], use: string): string | undefined {
  if (path === "/") return `${use} of / are refused: it is the host's whole filesystem`;
  for (const p of protectedPaths) {
    if (isWithin(path, p.path)) return `${use} of ${p.path}${path === p.path ? "" : ` (here ${path})`} are refused: it holds ${p.holds}`;
    if (isWithin(p.path, path)) return `${use} of ${path} are refused: it contains ${p.path}, which holds ${p.holds}`;
  }
  return undefined;
}

/** The path with symlinks resolved; for a path that does not exist, its folder resolved. */
async function realOrSelf(path: string): Promise<string> {
  try {
    return await realpath(path);
  } catch {
    try {
      return join(await realpath(dirname(path)), basename(path));
    } catch {
      return path;
    }
  }
}

/** The protected host paths with the reason each is refused, resolved through symlinks too. */
async function protectedList(policy: SpecPolicy): Promise<{ path: string; holds: string }[]> {
  const base = [
    { path: "/etc", holds: "the host's configuration" },
    { path: "/usr", holds: "the host's operating system" },
    { path: "/var/run/docker.sock", holds: "the Docker engine's API, which controls the host" },
    ...policy.protectedPaths.map((p) => ({ path: resolve(p.path), holds: p.holds })),
  ];
  const out = [...base];
  for (const p of base) {
    const real = await realOrSelf(p.path);
    if (real !== p.path) out.push({ path: real, holds: p.holds });
  }
  return out;
}

/**
 * Checks a host path against the policy: not a protected path, nor holding one, existing, and
 * below a data root (also after following symlinks). Returns the resolved path. `use` names what
 * the path is for in messages, e.g. "bind mounts".
 */
export async function checkHostPath(source: string, field: string, policy: SpecPolicy, use: string): Promise<string> {
  if (source === "") throw invalidArgument(field, "is required");
  noNul(source, field);
  if (!isAbsolute(source)) throw invalidArgument(field, `${JSON.stringify(source)} is not an absolute host path`);
  const normal = resolve(source);
  const protectedPaths = await protectedList(policy);
  const early = protectedReason(normal, protectedPaths, use);
  if (early) throw invalidArgument(field, early);
  const given = policy.dataRoots.map((r) => resolve(r));
  const roots = [...given, ...(await Promise.all(given.map(realOrSelf)))];
  const outside = (p: string): PiccoloError =>
    invalidArgument(
      field,
      `${normal}${p !== normal ? ` (which leads to ${p})` : ""} is outside the data roots (${policy.dataRoots.join(", ") || "none configured"}); ${use} must be below one of them`,
    );
  if (!roots.some((r) => isWithin(normal, r))) throw outside(normal);
  let real: string;
  try {
    real = await realpath(normal);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") {
      throw new PiccoloError("failed_precondition", `${field}: ${normal} does not exist on the host; create it first`, { field });
    }
    throw invalidArgument(field, `${normal} cannot be resolved (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  // A symlink below a data root may point anywhere: check where it leads as well.
  const late = protectedReason(real, protectedPaths, use);
  if (late) throw invalidArgument(field, real === normal ? late : `${normal} leads to ${real}; ${late}`);
  if (!roots.some((r) => isWithin(real, r))) throw outside(real);
  return real;
}

function checkHealthcheck(h: Healthcheck, field: string): NonNullable<ContainerCreateOptions["Healthcheck"]> {
  if (h.command.length === 0) throw invalidArgument(`${field}.command`, "is required");
  h.command.forEach((c, i) => noNul(c, `${field}.command[${i}]`));
  const dur = (d: Duration | undefined, name: string, min: number): number | undefined => {
    if (!d) return undefined;
    const n = nanos(d);
    if (!Number.isFinite(n) || n < min * 1e9 || n > 24 * 3600 * 1e9) {
      throw invalidArgument(`${field}.${name}`, `must be between ${min} s and 24 h`);
    }
    return n;
  };
  if (h.retries > 100) throw invalidArgument(`${field}.retries`, `must be at most 100 (got ${h.retries})`);
  return {
    Test: ["CMD", ...h.command],
    Interval: dur(h.interval, "interval", 1),
    Timeout: dur(h.timeout, "timeout", 1),
    StartPeriod: dur(h.startPeriod, "start_period", 0),
    Retries: h.retries || undefined,
  } as NonNullable<ContainerCreateOptions["Healthcheck"]>;
}

/**
 * Checks a spec (field names prefixed with `prefix`, e.g. "spec") and builds the engine's create
 * request. Throws PiccoloError naming the first field at fault.
 */
export async function checkSpec(spec: ContainerSpec | undefined, prefix: string, policy: SpecPolicy): Promise<CheckedSpec> {
  if (!spec) throw invalidArgument(prefix, "is required");
  const f = (name: string): string => `${prefix}.${name}`;
  const name = checkContainerName(spec.name, f("name"));
  const image = checkImageReference(spec.image, f("image"));

  // Policy refusals first: they are what a caller most needs to hear about.
  if (spec.privileged) {
    throw invalidArgument(f("privileged"), "privileged containers are refused: they control the host");
  }
  const pidMode = spec.pidMode.trim();
  if (pidMode === "host") throw invalidArgument(f("pid_mode"), `"host" is refused: the host's PID namespace exposes every process on the host`);
  if (pidMode !== "" && !/^container:[a-zA-Z0-9][a-zA-Z0-9_.-]+$/.test(pidMode)) {
    throw invalidArgument(f("pid_mode"), `expected "" or "container:<name>" (got ${JSON.stringify(pidMode.slice(0, 64))})`);
  }
  const ipcMode = spec.ipcMode.trim();
  if (ipcMode === "host") throw invalidArgument(f("ipc_mode"), `"host" is refused: the host's IPC namespace exposes its shared memory`);
  if (ipcMode !== "" && !["private", "shareable", "none"].includes(ipcMode) && !/^container:[a-zA-Z0-9][a-zA-Z0-9_.-]+$/.test(ipcMode)) {
    throw invalidArgument(f("ipc_mode"), `expected "", "private", "shareable", "none" or "container:<name>" (got ${JSON.stringify(ipcMode.slice(0, 64))})`);
  }

  spec.command.forEach((c, i) => noNul(c, `${f("command")}[${i}]`));
  spec.entrypoint.forEach((c, i) => noNul(c, `${f("entrypoint")}[${i}]`));
  const env: string[] = [];
  for (const [k, v] of Object.entries(spec.env)) {
    if (k === "" || k.includes("=") || k.includes("\0")) {
      throw invalidArgument(`${f("env")}[${JSON.stringify(k)}]`, 'a variable name must be non-empty without "=" or NUL');
    }
    noNul(v, `${f("env")}[${JSON.stringify(k)}]`);
    env.push(`${k}=${v}`);
  }

  const labels: Record<string, string> = {};
  for (const [k, v] of Object.entries(spec.labels)) {
    if (k === "") throw invalidArgument(f("labels"), "label keys must not be empty");
    if (k.startsWith(RESERVED_LABEL_PREFIX)) {
      throw invalidArgument(`${f("labels")}[${JSON.stringify(k)}]`, `keys starting with "${RESERVED_LABEL_PREFIX}" are reserved for piccolod`);
    }
    labels[noNul(k, f("labels"))] = noNul(v, `${f("labels")}[${JSON.stringify(k)}]`);
  }
  labels[MANAGED_LABEL] = "true";

  const ports: CheckedPort[] = [];
  const exposed: Record<string, object> = {};
  const bindings: Record<string, { HostIp: string; HostPort: string }[]> = {};
  spec.ports.forEach((p, i) => {
    const pf = `${f("ports")}[${i}]`;
    const protocol = PROTOCOL[p.protocol];
    if (!protocol) throw invalidArgument(`${pf}.protocol`, `unknown protocol ${p.protocol}`);
    if (!Number.isInteger(p.containerPort) || p.containerPort < 1 || p.containerPort > 65535) {
      throw invalidArgument(`${pf}.container_port`, `must be between 1 and 65535 (got ${p.containerPort})`);
    }
    if (!Number.isInteger(p.hostPort) || p.hostPort > 65535) {
      throw invalidArgument(`${pf}.host_port`, `must be between 0 and 65535 (got ${p.hostPort})`);
    }
    const addr = p.hostAddress.trim();
    if (addr !== "" && isIP(addr) === 0) throw invalidArgument(`${pf}.host_address`, `${JSON.stringify(addr.slice(0, 64))} is not an IP address`);
    const port: CheckedPort = { hostAddress: addr, hostPort: p.hostPort, containerPort: p.containerPort, protocol };
    const dup = ports.findIndex(
      (q) => q.hostPort !== 0 && q.hostPort === port.hostPort && q.protocol === port.protocol && addressesOverlap(q.hostAddress, port.hostAddress),
    );
    if (dup >= 0 && port.hostPort !== 0) {
      throw invalidArgument(`${pf}.host_port`, `${port.hostPort}/${protocol} is already published by ${f("ports")}[${dup}]`);
    }
    ports.push(port);
    const key = `${p.containerPort}/${protocol}`;
    exposed[key] = {};
    (bindings[key] ??= []).push({ HostIp: addr, HostPort: p.hostPort === 0 ? "" : String(p.hostPort) });
  });

  const mounts: { Type: "bind" | "volume"; Source: string; Target: string; ReadOnly: boolean }[] = [];
  for (const [i, m] of spec.mounts.entries()) {
    const mf = `${f("mounts")}[${i}]`;
    if (!m.target || !posix.isAbsolute(m.target)) throw invalidArgument(`${mf}.target`, "must be an absolute path inside the container");
    noNul(m.target, `${mf}.target`);
    const target = posix.normalize(m.target).replace(/(.)\/+$/, "$1");
    if (target === "/") throw invalidArgument(`${mf}.target`, 'must not be "/"');
    const clash = mounts.findIndex((x) => x.Target === target);
    if (clash >= 0) throw invalidArgument(`${mf}.target`, `${target} is already the target of ${f("mounts")}[${clash}]`);
    if (m.type === MountType.MOUNT_TYPE_BIND) {
      const source = await checkHostPath(m.source, `${mf}.source`, policy, "bind mounts");
      mounts.push({ Type: "bind", Source: source, Target: target, ReadOnly: m.readOnly });
    } else if (m.type === MountType.MOUNT_TYPE_VOLUME) {
      if (m.source !== "" && !VOLUME_NAME.test(m.source)) {
        throw invalidArgument(`${mf}.source`, `${JSON.stringify(m.source.slice(0, 64))} is not a volume name (letters, digits, "_", "." or "-"; 2 to 128 characters)`);
      }
      mounts.push({ Type: "volume", Source: m.source, Target: target, ReadOnly: m.readOnly });
    } else {
      throw invalidArgument(`${mf}.type`, "must be MOUNT_TYPE_BIND or MOUNT_TYPE_VOLUME");
    }
  }

  const restart = RESTART[spec.restartPolicy];
  if (!restart) throw invalidArgument(f("restart_policy"), `unknown restart policy ${spec.restartPolicy}`);
  if (spec.restartMaxRetries !== 0 && restart !== "on-failure") {
    throw invalidArgument(f("restart_max_retries"), "only applies to RESTART_POLICY_ON_FAILURE");
  }
  if (spec.restartMaxRetries > 10_000) throw invalidArgument(f("restart_max_retries"), "must be at most 10000");

  const cpus = spec.resources?.cpus ?? 0;
  if (!Number.isFinite(cpus) || (cpus !== 0 && (cpus < 0.01 || cpus > policy.cpuCount))) {
    throw invalidArgument(f("resources.cpus"), `must be 0 (no limit) or between 0.01 and ${policy.cpuCount}, the CPUs of this host (got ${cpus})`);
  }
  const memory = spec.resources?.memoryBytes ?? 0;
  if (memory !== 0 && memory < MIN_MEMORY) {
    throw invalidArgument(f("resources.memory_bytes"), `must be 0 (no limit) or at least ${MIN_MEMORY} (6 MiB) (got ${memory})`);
  }

  const network = spec.network.trim();
  if (network !== "" && !NETWORK_NAME.test(network)) {
    throw invalidArgument(f("network"), `${JSON.stringify(network.slice(0, 64))} is not a network name`);
  }

  const body: ContainerCreateOptions = {
    Image: image,
    ...(spec.command.length > 0 ? { Cmd: [...spec.command] } : {}),
    ...(spec.entrypoint.length > 0 ? { Entrypoint: [...spec.entrypoint] } : {}),
    Env: env,
    Labels: labels,
    ExposedPorts: exposed,
    ...(spec.healthcheck ? { Healthcheck: checkHealthcheck(spec.healthcheck, f("healthcheck")) } : {}),
    HostConfig: {
      PortBindings: bindings,
      Mounts: mounts,
      RestartPolicy: { Name: restart, MaximumRetryCount: restart === "on-failure" ? spec.restartMaxRetries : 0 },
      NanoCpus: Math.round(cpus * 1e9),
      Memory: memory,
      Privileged: false,
      ...(network !== "" ? { NetworkMode: network } : {}),
      ...(pidMode !== "" ? { PidMode: pidMode } : {}),
      ...(ipcMode !== "" ? { IpcMode: ipcMode } : {}),
    },
  };
  return { name, image, body, ports };
}
