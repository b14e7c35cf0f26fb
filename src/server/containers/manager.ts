/**
 * The container manager: the container life cycle, logs, stats, events and image listing over
 * the engine adapter. It checks specs against the policy before the engine is asked anything,
 * serialises changes per container name (so concurrent EnsureRunning calls create one container)
 * and port checks (so two containers cannot both claim a host port), and maps the engine's errors
 * with what it knows about the call: which container, which field.
 */
import { cpus } from "node:os";
import type { Logger } from "pino";
import {
  EnsureRunningAction,
  type Container,
  type ContainerEvent,
  type ContainerSpec,
  type ContainerStats,
  type Image,
  type LogEntry,
  type RemoveImageResponse,
} from "../../../gen/piccolo/containers/v1/containers.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";
import { containerFromInspect, containerFromSummary, eventFrom, imageFromSummary, statsFrom, WATCHED_ACTIONS } from "./convert.js";
import { DockerApiError, type ContainerInspectInfo, type DockerEngine } from "./docker.js";
import { demuxFrames, framesToLines, rawToLines } from "./logs.js";
import { addressesOverlap, checkSpec, MANAGED_LABEL, type CheckedPort, type CheckedSpec, type SpecPolicy } from "./spec.js";

/** What the manager needs. */
export interface ContainerManagerDeps {
  readonly engine: DockerEngine;
  /** Host folders bind mounts, import tarballs and build contexts must be below. */
  readonly dataRoots: readonly string[];
  /** piccolod's state folder: never mountable. */
  readonly stateDir: string;
  readonly log: Logger;
  /** CPUs a limit may give at most; defaults to the host's. */
  readonly cpuCount?: number;
}

/** Options of logs(). */
export interface LogsRequest {
  readonly follow: boolean;
  readonly tail?: number;
  readonly since?: Date;
  readonly timestamps: boolean;
}

/** Options of events(). */
export interface EventsRequest {
  readonly includeUnmanaged: boolean;
  readonly since?: Date;
  readonly name?: string;
}

/** The container manager. Every method takes the caller's abort signal. */
export interface ContainerManager {
  /** The policy specs and host paths are checked against. */
  readonly policy: SpecPolicy;
  list(includeUnmanaged: boolean, signal: AbortSignal): Promise<Container[]>;
  get(name: string, signal: AbortSignal): Promise<Container>;
  /**
   * Creates a container. `options.extraDataRoots` lets an in-process caller (the task runner)
   * bind-mount folders of its own beyond the configured data roots; no RPC can pass it.
   */
  create(spec: ContainerSpec | undefined, signal: AbortSignal, options?: { readonly extraDataRoots?: readonly string[] }): Promise<Container>;
  start(name: string, signal: AbortSignal): Promise<Container>;
  stop(name: string, graceSeconds: number, signal: AbortSignal): Promise<Container>;
  restart(name: string, graceSeconds: number, signal: AbortSignal): Promise<Container>;
  remove(name: string, options: { force: boolean; volumes: boolean }, signal: AbortSignal): Promise<{ id: string }>;
  ensureRunning(spec: ContainerSpec | undefined, signal: AbortSignal): Promise<{ container: Container; action: EnsureRunningAction }>;
  logs(name: string, request: LogsRequest, signal: AbortSignal): AsyncGenerator<LogEntry>;
  stats(name: string, stream: boolean, signal: AbortSignal): AsyncGenerator<ContainerStats>;
  events(request: EventsRequest, signal: AbortSignal): AsyncGenerator<ContainerEvent>;
  listImages(reference: string, signal: AbortSignal): Promise<Image[]>;
  removeImage(reference: string, force: boolean, signal: AbortSignal): Promise<RemoveImageResponse>;
}

/** Runs functions one at a time per key; keys with nothing queued are forgotten. */
export function createKeyedLock(): <T>(key: string, f: () => Promise<T>) => Promise<T> {
  const tails = new Map<string, Promise<unknown>>();
  return async <T>(key: string, f: () => Promise<T>): Promise<T> => {
    const prev = tails.get(key) ?? Promise.resolve();
    const run = prev.then(f, f);
    const tail = run.catch(() => undefined);
    tails.set(key, tail);
    try {
      return await run;
    } finally {
      if (tails.get(key) === tail) tails.delete(key);
    }
  };
}

/** The engine's "nothing to do" answer (start of a running container, stop of a stopped one). */
const notModified = (e: unknown): boolean => e instanceof DockerApiError && e.statusCode === 304;

/** Host ports a container publishes, from its inspect answer. */
export function publishedPorts(info: ContainerInspectInfo): CheckedPort[] {
  const out: CheckedPort[] = [];
  for (const [key, list] of Object.entries((info.HostConfig?.PortBindings ?? {}) as Record<string, { HostIp?: string; HostPort?: string }[] | null>)) {
    const [port = "0", proto = "tcp"] = key.split("/");
    for (const b of list ?? []) {
      const hostPort = Number(b.HostPort || 0);
      if (hostPort > 0) out.push({ hostAddress: b.HostIp ?? "", hostPort, containerPort: Number(port), protocol: proto as CheckedPort["protocol"] });
    }
  }
  return out;
}

/** Creates the container manager. */
export function createContainerManager(deps: ContainerManagerDeps): ContainerManager {
  const { engine, log } = deps;
  const policy: SpecPolicy = {
    dataRoots: deps.dataRoots,
    protectedPaths: [
      { path: engine.socket, holds: "the Docker engine's API, which controls the host" },
      { path: deps.stateDir, holds: "piccolod's state (operation journals, the audit log, sealed secrets)" },
    ],
    cpuCount: deps.cpuCount ?? cpus().length,
  };
  const lock = createKeyedLock();
  // Port checks and the creates/starts they guard run one at a time, so two calls cannot both
  // see a port free and both take it.
  const PORTS = "\0ports";

  /** Maps an engine error of a call about one container. */
  const containerError = (err: unknown, name: string): unknown => {
    if (!(err instanceof DockerApiError)) return err;
    if (err.statusCode === 404) return notFound("container", name);
    if (err.statusCode === 409) return new PiccoloError("failed_precondition", `container ${JSON.stringify(name)}: ${err.dockerMessage}`, { cause: err });
    return new PiccoloError(
      err.statusCode === 400 ? "failed_precondition" : "internal",
      `the Docker engine refused the call for container ${JSON.stringify(name)}: ${err.dockerMessage}`,
      { cause: err },
    );
  };

  const inspect = async (name: string, signal: AbortSignal): Promise<ContainerInspectInfo> => {
    try {
      return await engine.inspectContainer(name, signal);
    } catch (e) {
      throw containerError(e, name);
    }
  };

  const inspectOrNull = async (name: string, signal: AbortSignal): Promise<ContainerInspectInfo | null> => {
    try {
      return await engine.inspectContainer(name, signal);
    } catch (e) {
      if (e instanceof DockerApiError && e.statusCode === 404) return null;
      throw containerError(e, name);
    }
  };

  /** Throws FAILED_PRECONDITION naming the running container that already publishes one of `ports`. */
  const checkPortsFree = async (ports: readonly CheckedPort[], selfId: string | undefined, fieldOf: (i: number) => string, signal: AbortSignal): Promise<void> => {
    if (ports.every((p) => p.hostPort === 0)) return;
    // The engine's list shows live bindings only where a port proxy runs; the configured
    // bindings in inspect are what the engine will try to take, so compare those.
    const running = await engine.listContainers({ all: true, status: ["running", "restarting", "paused"] }, signal);
    const others = await Promise.all(
      running.filter((c) => c.Id !== selfId).map((c) => engine.inspectContainer(c.Id, signal).catch(() => null)),
    );
    for (const [i, p] of ports.entries()) {
      if (p.hostPort === 0) continue;
      for (const o of others) {
        if (!o) continue;
        const clash = publishedPorts(o).find(
          (q) => q.hostPort === p.hostPort && q.protocol === p.protocol && addressesOverlap(q.hostAddress, p.hostAddress),
        );
        if (clash) {
          const other = o.Name.replace(/^\//, "");
          throw new PiccoloError(
            "failed_precondition",
            `${fieldOf(i)}: host port ${p.hostPort}/${p.protocol} on ${p.hostAddress || "all addresses"} is already published by running container ${JSON.stringify(other)} (${o.Id.slice(0, 12)}); stop it or choose another port`,
            { field: fieldOf(i), metadata: { container: other, container_id: o.Id } },
          );
        }
      }
    }
  };

  const imageExists = async (image: string, signal: AbortSignal): Promise<boolean> => {
    try {
      await engine.inspectImage(image, signal);
      return true;
    } catch (e) {
      if (e instanceof DockerApiError && e.statusCode === 404) return false;
      throw e;
    }
  };

  /** Creates a container from a checked spec; returns its id. */
  const createChecked = async (c: CheckedSpec, signal: AbortSignal): Promise<string> => {
    const doCreate = async (): Promise<string> => {
      try {
        return await engine.createContainer(c.name, c.body, signal);
      } catch (e) {
        if (e instanceof DockerApiError && e.statusCode === 409) {
          throw new PiccoloError("already_exists", `container ${JSON.stringify(c.name)} already exists`, { cause: e, metadata: { container: c.name } });
        }
        // The engine checks some of the config before it looks for the image (a missing image
        // without a command is "No command specified"), so ask about the image itself.
        if (e instanceof DockerApiError && (e.statusCode === 404 || e.statusCode === 400) && !(await imageExists(c.image, signal))) {
          throw new PiccoloError(
            "failed_precondition",
            `spec.image: image ${JSON.stringify(c.image)} is not on this host; pull it (PullImage) or import it (ImportImage) first`,
            { cause: e, field: "spec.image", metadata: { image: c.image } },
          );
        }
        if (e instanceof DockerApiError && /No command specified/i.test(e.dockerMessage)) {
          throw invalidArgument("spec.command", `image ${JSON.stringify(c.image)} has no default command; give one`);
        }
        if (e instanceof DockerApiError && e.statusCode === 400) {
          throw new PiccoloError("invalid_argument", `spec: the Docker engine refused the spec: ${e.dockerMessage}`, { cause: e, field: "spec" });
        }
        throw containerError(e, c.name);
      }
    };
    if (c.ports.every((p) => p.hostPort === 0)) return doCreate();
    return lock(PORTS, async () => {
      await checkPortsFree(c.ports, undefined, (i) => `spec.ports[${i}].host_port`, signal);
      return doCreate();
    });
  };

  /**
   * Starts a container (a no-op when it runs), checking its host ports first. Takes what it
   * needs to know rather than an inspect answer, so a container just created needs no inspect.
   */
  const startChecked = async (
    target: { readonly id: string; readonly ports: readonly CheckedPort[]; readonly running: boolean },
    name: string,
    signal: AbortSignal,
  ): Promise<void> => {
    const doStart = async (): Promise<void> => {
      try {
        await engine.startContainer(target.id, signal);
      } catch (e) {
        if (notModified(e)) return;
        if (e instanceof DockerApiError && e.statusCode !== 404) {
          throw new PiccoloError("failed_precondition", `container ${JSON.stringify(name)} could not start: ${e.dockerMessage}`, { cause: e });
        }
        throw containerError(e, name);
      }
    };
    const ports = target.ports.filter((p) => p.hostPort !== 0);
    if (ports.length === 0 || target.running) return doStart();
    return lock(PORTS, async () => {
      await checkPortsFree(ports, target.id, (i) => `ports[${i}] (${ports[i]!.hostPort}/${ports[i]!.protocol} of container ${JSON.stringify(name)})`, signal);
      return doStart();
    });
  };

  const running = (info: ContainerInspectInfo): boolean => info.State.Running || info.State.Restarting;
  const startTarget = (info: ContainerInspectInfo) => ({ id: info.Id, ports: publishedPorts(info), running: info.State.Running });

  return {
    policy,

    async list(includeUnmanaged, signal) {
      const list = await engine.listContainers({ all: true, labels: includeUnmanaged ? [] : [`${MANAGED_LABEL}=true`] }, signal);
      return list.map(containerFromSummary).sort((a, b) => (b.createTime?.getTime() ?? 0) - (a.createTime?.getTime() ?? 0));
    },

    async get(name, signal) {
      return containerFromInspect(await inspect(name, signal));
    },

    async create(spec, signal, options) {
      const extra = options?.extraDataRoots ?? [];
      const checked = await checkSpec(spec, "spec", extra.length > 0 ? { ...policy, dataRoots: [...policy.dataRoots, ...extra] } : policy);
      return lock(checked.name, async () => {
        const id = await createChecked(checked, signal);
        log.info({ container: checked.name, id: id.slice(0, 12), image: checked.image }, "container created");
        return containerFromInspect(await inspect(id, signal));
      });
    },

    async start(name, signal) {
      return lock(name, async () => {
        const info = await inspect(name, signal);
        await startChecked(startTarget(info), name, signal);
        return containerFromInspect(await inspect(info.Id, signal));
      });
    },

    async stop(name, graceSeconds, signal) {
      return lock(name, async () => {
        const info = await inspect(name, signal);
        try {
          await engine.stopContainer(info.Id, graceSeconds, signal);
        } catch (e) {
          if (!notModified(e)) throw containerError(e, name);
        }
        return containerFromInspect(await inspect(info.Id, signal));
      });
    },

    async restart(name, graceSeconds, signal) {
      return lock(name, async () => {
        const info = await inspect(name, signal);
        if (!running(info)) {
          await startChecked(startTarget(info), name, signal);
        } else {
          try {
            await engine.restartContainer(info.Id, graceSeconds, signal);
          } catch (e) {
            throw containerError(e, name);
          }
        }
        return containerFromInspect(await inspect(info.Id, signal));
      });
    },

    async remove(name, o, signal) {
      return lock(name, async () => {
        const info = await inspect(name, signal);
        try {
          await engine.removeContainer(info.Id, o, signal);
        } catch (e) {
          if (e instanceof DockerApiError && e.statusCode === 409) {
            throw new PiccoloError(
              "failed_precondition",
              `container ${JSON.stringify(name)} is running; stop it first or remove it with force`,
              { cause: e, metadata: { container: name } },
            );
          }
          throw containerError(e, name);
        }
        log.info({ container: name, id: info.Id.slice(0, 12), volumes: o.volumes }, "container removed");
        return { id: info.Id };
      });
    },

    async ensureRunning(spec, signal) {
      const checked = await checkSpec(spec, "spec", policy);
      return lock(checked.name, async () => {
        const existing = await inspectOrNull(checked.name, signal);
        if (existing) {
          if (existing.Config.Image !== checked.image) {
            throw new PiccoloError(
              "failed_precondition",
              `spec.image: container ${JSON.stringify(checked.name)} exists with image ${JSON.stringify(existing.Config.Image)}, not ${JSON.stringify(checked.image)}; remove it first to run the new image`,
              { field: "spec.image", metadata: { container: checked.name } },
            );
          }
          if (existing.State.Running && !existing.State.Paused) {
            return { container: containerFromInspect(existing), action: EnsureRunningAction.ENSURE_RUNNING_ACTION_ALREADY_RUNNING };
          }
          if (existing.State.Paused) {
            try {
              await engine.unpauseContainer(existing.Id, signal);
            } catch (e) {
              throw containerError(e, checked.name);
            }
          } else {
            await startChecked(startTarget(existing), checked.name, signal);
          }
          return { container: containerFromInspect(await inspect(existing.Id, signal)), action: EnsureRunningAction.ENSURE_RUNNING_ACTION_STARTED };
        }
        const id = await createChecked(checked, signal);
        try {
          await startChecked({ id, ports: checked.ports, running: false }, checked.name, signal);
        } catch (e) {
          // Leave nothing behind: a container that never ran is removed again.
          try {
            await engine.removeContainer(id, { force: true, volumes: true }, AbortSignal.timeout(10_000));
          } catch (cleanup) {
            log.error({ container: checked.name, err: (cleanup as Error).message }, "could not remove the container whose start failed");
            throw e;
          }
          if (e instanceof PiccoloError) {
            throw new PiccoloError(e.kind, `${e.message}; the container was removed again`, { cause: e, field: e.field, metadata: e.metadata });
          }
          throw e;
        }
        log.info({ container: checked.name, id: id.slice(0, 12), image: checked.image }, "container created and started");
        return { container: containerFromInspect(await inspect(id, signal)), action: EnsureRunningAction.ENSURE_RUNNING_ACTION_CREATED };
      });
    },

    async *logs(name, r, signal) {
      const info = await inspect(name, signal);
      let source: AsyncIterable<Buffer>;
      try {
        source = await engine.containerLogs(
          info.Id,
          {
            follow: r.follow,
            timestamps: r.timestamps,
            ...(r.tail !== undefined ? { tail: r.tail } : {}),
            ...(r.since ? { since: r.since.getTime() / 1000 } : {}),
          },
          signal,
        );
      } catch (e) {
        throw containerError(e, name);
      }
      yield* info.Config.Tty ? rawToLines(source, r.timestamps) : framesToLines(demuxFrames(source), r.timestamps);
    },

    async *stats(name, stream, signal) {
      const info = await inspect(name, signal);
      const cname = info.Name.replace(/^\//, "");
      if (!stream) {
        try {
          yield statsFrom(await engine.containerStats(info.Id, signal), info.Id, cname);
        } catch (e) {
          throw containerError(e, name);
        }
        return;
      }
      let samples: AsyncIterable<unknown>;
      try {
        samples = await engine.containerStatsStream(info.Id, signal);
      } catch (e) {
        throw containerError(e, name);
      }
      for await (const s of samples) yield statsFrom(s, info.Id, cname);
    },

    async *events(r, signal) {
      const filters: Record<string, string[]> = { type: ["container"], event: WATCHED_ACTIONS };
      if (!r.includeUnmanaged) filters["label"] = [`${MANAGED_LABEL}=true`];
      if (r.name) filters["container"] = [r.name];
      const since = r.since ? r.since.getTime() / 1000 : undefined;
      for await (const e of await engine.events(filters, since, signal)) {
        const ev = eventFrom(e);
        if (ev) yield ev;
      }
    },

    async listImages(reference, signal) {
      const list = await engine.listImages({ reference: reference || undefined }, signal);
      return list.map(imageFromSummary).sort((a, b) => (b.createTime?.getTime() ?? 0) - (a.createTime?.getTime() ?? 0));
    },

    async removeImage(reference, force, signal) {
      let res;
      try {
        res = await engine.removeImage(reference, force, signal);
      } catch (e) {
        if (e instanceof DockerApiError && e.statusCode === 404) throw notFound("image", reference);
        if (e instanceof DockerApiError && e.statusCode === 409) {
          // "… - container 2ff352088596 is using its referenced image 45b6ea834273": name the container.
          const id = /container ([0-9a-f]{12,64})/.exec(e.dockerMessage)?.[1];
          const user = id ? await engine.inspectContainer(id, signal).catch(() => null) : null;
          const who = user ? `container ${JSON.stringify(user.Name.replace(/^\//, ""))} (${id!.slice(0, 12)}) uses it` : e.dockerMessage;
          throw new PiccoloError("failed_precondition", `image ${JSON.stringify(reference)} cannot be removed: ${who}; remove that first or use force`, {
            cause: e,
            metadata: user ? { container: user.Name.replace(/^\//, "") } : {},
          });
        }
        throw e instanceof DockerApiError
          ? new PiccoloError("internal", `the Docker engine refused to remove image ${JSON.stringify(reference)}: ${e.dockerMessage}`, { cause: e })
          : e;
      }
      log.info({ image: reference }, "image removed");
      return {
        untagged: res.map((r) => r.Untagged).filter((x): x is string => !!x),
        deleted: res.map((r) => r.Deleted).filter((x): x is string => !!x),
      };
    },
  };
}
