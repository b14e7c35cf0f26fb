/**
 * The adapter to the Docker engine: the few engine calls the containers area makes, through
 * dockerode on the configured unix socket, each with the caller's abort signal. Errors leave
 * here in two shapes only: DockerApiError (the engine answered with an error status, or sent an
 * error inside a progress stream) for the manager to map with its context, and PiccoloError
 * (unavailable naming the socket, or cancelled) when the engine could not be reached or the call
 * was aborted. Streams are handed out as async iterables whose errors are mapped the same way.
 */
import { Readable } from "node:stream";
import type Docker from "dockerode";
import type {
  ContainerCreateOptions,
  ContainerInfo,
  ContainerInspectInfo,
  ContainerStats,
  ImageInfo,
  ImageInspectInfo,
  ImageRemoveInfo,
} from "dockerode";
import { PiccoloError, unavailable } from "../errors.js";

export type { ContainerCreateOptions, ContainerInfo, ContainerInspectInfo, ContainerStats, ImageInfo, ImageInspectInfo };

/** A volume as the engine's /volumes endpoints describe it. */
export interface VolumeInspectInfo {
  readonly Name: string;
  readonly Driver: string;
  readonly Mountpoint: string;
  readonly CreatedAt?: string;
  readonly Labels: Readonly<Record<string, string>> | null;
  readonly Scope?: string;
}

/** The engine answered a call with an error status (or reported an error inside a stream). */
export class DockerApiError extends Error {
  override readonly name = "DockerApiError";
  constructor(
    /** HTTP status of the answer; 0 for an error reported inside a progress stream. */
    readonly statusCode: number,
    /** The engine's own message, e.g. "No such container: web". */
    readonly dockerMessage: string,
    options?: { cause?: unknown },
  ) {
    super(dockerMessage, options);
  }
}

/** Options of containerLogs. */
export interface LogsOptions {
  readonly follow: boolean;
  readonly tail?: number;
  /** Unix seconds (fractions allowed). */
  readonly since?: number;
  readonly timestamps: boolean;
}

/** What to build from: a context folder (packed here) or a context tarball on the host. */
export type BuildContext = { readonly folder: string; readonly entries: readonly string[] } | { readonly tarball: string };

/** Options of buildImage, as the engine's /build takes them. */
export interface BuildOptions {
  readonly dockerfile: string;
  readonly tags: readonly string[];
  readonly buildArgs: Readonly<Record<string, string>>;
  readonly labels: Readonly<Record<string, string>>;
  readonly noCache: boolean;
}

/** The engine calls the containers area makes. Every call takes the caller's abort signal. */
export interface DockerEngine {
  /** The socket path, for messages. */
  readonly socket: string;
  ping(signal: AbortSignal): Promise<void>;
  listContainers(options: { all: boolean; labels?: readonly string[]; status?: readonly string[] }, signal: AbortSignal): Promise<ContainerInfo[]>;
  inspectContainer(nameOrId: string, signal: AbortSignal): Promise<ContainerInspectInfo>;
  /** Creates a container; returns its id. */
  createContainer(name: string, body: ContainerCreateOptions, signal: AbortSignal): Promise<string>;
  startContainer(id: string, signal: AbortSignal): Promise<void>;
  stopContainer(id: string, graceSeconds: number, signal: AbortSignal): Promise<void>;
  restartContainer(id: string, graceSeconds: number, signal: AbortSignal): Promise<void>;
  unpauseContainer(id: string, signal: AbortSignal): Promise<void>;
  /** Freezes a running container's processes (used to quiesce apps around a backup). */
  pauseContainer(id: string, signal: AbortSignal): Promise<void>;
  removeContainer(id: string, options: { force: boolean; volumes: boolean }, signal: AbortSignal): Promise<void>;
  /** The raw log stream: multiplexed frames, or plain bytes for a container with a terminal. */
  containerLogs(id: string, options: LogsOptions, signal: AbortSignal): Promise<AsyncIterable<Buffer>>;
  /** One stats sample, taken over about a second so CPU use can be computed. */
  containerStats(id: string, signal: AbortSignal): Promise<ContainerStats>;
  /** Stats samples, one a second. */
  containerStatsStream(id: string, signal: AbortSignal): Promise<AsyncIterable<ContainerStats>>;
  /** Engine events as decoded JSON objects. */
  events(filters: Readonly<Record<string, readonly string[]>>, since: number | undefined, signal: AbortSignal): Promise<AsyncIterable<EngineEvent>>;
  listImages(options: { reference?: string }, signal: AbortSignal): Promise<ImageInfo[]>;
  inspectImage(reference: string, signal: AbortSignal): Promise<ImageInspectInfo>;
  tagImage(reference: string, repo: string, tag: string, signal: AbortSignal): Promise<void>;
  removeImage(reference: string, force: boolean, signal: AbortSignal): Promise<ImageRemoveInfo[]>;
  /** Pulls; yields the engine's JSON progress messages. */
  pullImage(reference: string, signal: AbortSignal): Promise<AsyncIterable<ProgressMessage>>;
  /** Lists volumes, optionally only those with every one of the labels ("key=value" or "key"). */
  listVolumes(options: { labels?: readonly string[] }, signal: AbortSignal): Promise<VolumeInspectInfo[]>;
  /** Inspects one volume; DockerApiError 404 when there is none. */
  inspectVolume(name: string, signal: AbortSignal): Promise<VolumeInspectInfo>;
  /** Creates a volume on the local driver. */
  createVolume(name: string, labels: Readonly<Record<string, string>>, signal: AbortSignal): Promise<VolumeInspectInfo>;
  /** Removes a volume; DockerApiError 409 when a container uses it. */
  removeVolume(name: string, signal: AbortSignal): Promise<void>;
  /** Loads a `docker save` archive; yields the engine's JSON messages. */
  loadImage(archive: Readable, signal: AbortSignal): Promise<AsyncIterable<ProgressMessage>>;
  /** Imports a root filesystem tarball as repo:tag; yields the engine's JSON messages. */
  importRootfs(tarball: Readable, repo: string, tag: string, signal: AbortSignal): Promise<AsyncIterable<ProgressMessage>>;
  /** Builds; yields the engine's JSON messages. */
  buildImage(context: BuildContext, options: BuildOptions, signal: AbortSignal): Promise<AsyncIterable<ProgressMessage>>;
}

/** One message of the engine's JSON progress streams (pull, load, import, build). */
export interface ProgressMessage {
  readonly status?: string;
  readonly id?: string;
  readonly progressDetail?: { readonly current?: number; readonly total?: number };
  readonly stream?: string;
  readonly aux?: { readonly ID?: string };
  readonly error?: string;
  readonly errorDetail?: { readonly message?: string };
}

/** One engine event, as /events sends it. */
export interface EngineEvent {
  readonly Type?: string;
  readonly Action?: string;
  readonly Actor?: { readonly ID?: string; readonly Attributes?: Readonly<Record<string, string>> };
  readonly time?: number;
  readonly timeNano?: number;
}

interface ModemError extends Error {
  statusCode?: number;
  json?: unknown;
  code?: string;
}

/** Connection-level failures: the engine is not there, or went away mid-call. */
const CONNECTION_CODES = new Set(["ECONNREFUSED", "ENOENT", "ECONNRESET", "EPIPE", "ENOTCONN", "ETIMEDOUT", "EACCES", "ECONNABORTED"]);

/**
 * Maps anything a dockerode call threw: aborts stay aborts, error statuses become DockerApiError,
 * and failures to reach the engine (or losing it mid-stream) become UNAVAILABLE naming the socket.
 */
export function engineError(err: unknown, socket: string, signal?: AbortSignal): Error {
  if (err instanceof PiccoloError || err instanceof DockerApiError) return err;
  const e = err as ModemError;
  if (signal?.aborted || e?.name === "AbortError") {
    return new PiccoloError("cancelled", "the call was cancelled", { cause: err });
  }
  if (typeof e?.statusCode === "number") {
    const json = e.json as { message?: unknown } | string | Buffer | undefined;
    let message = "";
    if (json && typeof json === "object" && !Buffer.isBuffer(json) && typeof json.message === "string") message = json.message;
    else if (typeof json === "string") message = json;
    else if (Buffer.isBuffer(json)) message = json.toString("utf8");
    // Without a JSON body (stream calls) only dockerode's own text is left: drop its
    // "(HTTP code 500) server error - " prefix so the engine's words come through.
    return new DockerApiError(e.statusCode, (message || e.message.replace(/^\(HTTP code \d+\) [^-]*- /, "")).trim(), { cause: err });
  }
  const code = typeof e?.code === "string" ? e.code : "";
  const why = code === "EACCES" ? "permission denied" : code === "ENOENT" ? "no socket there" : e?.message || String(err);
  if (CONNECTION_CODES.has(code) || /socket hang up|aborted|premature close/i.test(e?.message ?? "")) {
    return unavailable(`Docker engine at ${socket}`, new Error(`${why}${code && !why.includes(code) ? ` (${code})` : ""}`));
  }
  return err instanceof Error ? err : new Error(String(err));
}

/** Yields a stream's chunks, mapping its errors and destroying it when the consumer stops. */
async function* chunks(stream: NodeJS.ReadableStream, socket: string, signal: AbortSignal): AsyncGenerator<Buffer> {
  const r = stream as Readable;
  // Losing the engine mid-response ends an HTTP body with an error, but a socket closed
  // between chunks can also end it "cleanly" without the terminating chunk: check for that.
  const incomplete = (): boolean => (r as unknown as { complete?: boolean }).complete === false;
  try {
    for await (const c of r) yield Buffer.isBuffer(c) ? c : Buffer.from(c as string);
    if (incomplete() && !signal.aborted) throw Object.assign(new Error("aborted"), { code: "ECONNRESET" });
  } catch (err) {
    throw engineError(err, socket, signal);
  } finally {
    r.destroy();
  }
}

/** Most bytes a single JSON line from the engine may take before the stream is refused. */
const MAX_LINE = 8 * 1024 * 1024;

/** Splits a byte stream into JSON lines and decodes each. */
export async function* jsonLines<T>(source: AsyncIterable<Buffer>): AsyncGenerator<T> {
  let buf = "";
  for await (const chunk of source) {
    buf += chunk.toString("utf8");
    let nl: number;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line !== "") yield JSON.parse(line) as T;
    }
    if (buf.length > MAX_LINE) throw new Error(`the engine sent a line longer than ${MAX_LINE} bytes`);
  }
  if (buf.trim() !== "") yield JSON.parse(buf) as T;
}

/** Throws the error a progress stream reports in-band; passes other messages on. */
async function* checkedProgress(source: AsyncIterable<ProgressMessage>): AsyncGenerator<ProgressMessage> {
  for await (const m of source) {
    if (m.error !== undefined || m.errorDetail?.message !== undefined) {
      throw new DockerApiError(0, (m.errorDetail?.message ?? m.error ?? "").trim());
    }
    yield m;
  }
}

/** Creates the engine adapter over dockerode on a unix socket. */
export function createDockerEngine(socket: string): DockerEngine {
  // dockerode and the SSH stack it pulls in cost ~15 MB and ~150 ms at start-up; load them on the
  // first engine call instead, so a host without Docker never pays for them.
  let docker!: Docker;
  let loading: Promise<void> | undefined;
  const load = (): Promise<void> =>
    (loading ??= import("dockerode").then((m) => {
      docker = new m.default({ socketPath: socket });
    }));
  const call = async <T>(signal: AbortSignal, f: () => Promise<T>): Promise<T> => {
    signal.throwIfAborted();
    await load();
    try {
      return await f();
    } catch (err) {
      throw engineError(err, socket, signal);
    }
  };
  const stream = async (signal: AbortSignal, f: () => Promise<NodeJS.ReadableStream>): Promise<AsyncIterable<Buffer>> =>
    chunks(await call(signal, f), socket, signal);
  const progress = async (signal: AbortSignal, f: () => Promise<NodeJS.ReadableStream>): Promise<AsyncIterable<ProgressMessage>> =>
    checkedProgress(jsonLines<ProgressMessage>(await stream(signal, f)));

  return {
    socket,
    async ping(signal) {
      await call(signal, () => docker.ping({ abortSignal: signal } as never) as unknown as Promise<unknown>);
    },
    listContainers(o, signal) {
      const filters: Record<string, string[]> = {};
      if (o.labels?.length) filters["label"] = [...o.labels];
      if (o.status?.length) filters["status"] = [...o.status];
      return call(signal, () => docker.listContainers({ all: o.all, filters, abortSignal: signal } as Docker.ContainerListOptions));
    },
    inspectContainer(nameOrId, signal) {
      return call(signal, () => docker.getContainer(nameOrId).inspect({ abortSignal: signal }));
    },
    async createContainer(name, body, signal) {
      // dockerode sends every option as a query parameter too unless _query/_body split them.
      const opts = { _query: { name }, _body: body, abortSignal: signal } as unknown as ContainerCreateOptions;
      const c = await call(signal, () => docker.createContainer(opts));
      return c.id;
    },
    async startContainer(id, signal) {
      await call(signal, () => docker.getContainer(id).start({ abortSignal: signal }));
    },
    async stopContainer(id, graceSeconds, signal) {
      await call(signal, () => docker.getContainer(id).stop({ t: graceSeconds, abortSignal: signal }));
    },
    async restartContainer(id, graceSeconds, signal) {
      await call(signal, () => docker.getContainer(id).restart({ t: graceSeconds, abortSignal: signal }));
    },
    async unpauseContainer(id, signal) {
      await call(signal, () => docker.getContainer(id).unpause({ abortSignal: signal }));
    },
    async pauseContainer(id, signal) {
      await call(signal, () => docker.getContainer(id).pause({ abortSignal: signal }));
    },
    async removeContainer(id, o, signal) {
      await call(signal, () => docker.getContainer(id).remove({ force: o.force, v: o.volumes, abortSignal: signal }));
    },
    async containerLogs(id, o, signal) {
      const opts = {
        follow: o.follow,
        stdout: true,
        stderr: true,
        timestamps: o.timestamps,
        ...(o.tail !== undefined ? { tail: o.tail } : {}),
        ...(o.since !== undefined ? { since: o.since } : {}),
        abortSignal: signal,
      };
      // Without follow dockerode buffers the whole answer and hands back a Buffer.
      const res = (await call(signal, () => docker.getContainer(id).logs(opts as never) as unknown as Promise<unknown>)) as
        | NodeJS.ReadableStream
        | Buffer;
      if (Buffer.isBuffer(res)) return Readable.from([res]);
      return chunks(res, socket, signal);
    },
    containerStats(id, signal) {
      // The typings leave the abort signal out of the stats options; dockerode passes it on.
      return call(signal, () => docker.getContainer(id).stats({ stream: false, abortSignal: signal } as { stream: false }));
    },
    async containerStatsStream(id, signal) {
      const s = await stream(signal, () => docker.getContainer(id).stats({ stream: true, abortSignal: signal } as { stream: true }));
      return jsonLines<ContainerStats>(s);
    },
    async events(filters, since, signal) {
      const opts = { filters: filters as Record<string, string[]>, ...(since !== undefined ? { since } : {}), abortSignal: signal };
      return jsonLines<EngineEvent>(await stream(signal, () => docker.getEvents(opts)));
    },
    listImages(o, signal) {
      return call(signal, () =>
        docker.listImages({ ...(o.reference ? { filters: { reference: [o.reference] } } : {}), abortSignal: signal }),
      );
    },
    inspectImage(reference, signal) {
      // dockerode's Image.inspect drops the abort signal; dial the same request with it.
      return call(
        signal,
        () =>
          new Promise<ImageInspectInfo>((resolve, reject) =>
            docker.modem.dial(
              {
                path: `/images/${encodeURIComponent(reference)}/json`,
                method: "GET",
                abortSignal: signal,
                statusCodes: { 200: true, 404: "no such image", 500: "server error" },
              } as never,
              (err: unknown, data: unknown) => (err ? reject(err as Error) : resolve(data as ImageInspectInfo)),
            ),
          ),
      );
    },
    async tagImage(reference, repo, tag, signal) {
      await call(signal, () => docker.getImage(reference).tag({ repo, tag, abortSignal: signal }));
    },
    removeImage(reference, force, signal) {
      return call(signal, () => docker.getImage(reference).remove({ force, abortSignal: signal }) as Promise<ImageRemoveInfo[]>);
    },
    async listVolumes(o, signal) {
      const filters = o.labels?.length ? { label: [...o.labels] } : {};
      const res = await call(signal, () => docker.listVolumes({ filters, abortSignal: signal } as never) as unknown as Promise<unknown>);
      return ((res as { Volumes?: VolumeInspectInfo[] | null }).Volumes ?? []) as VolumeInspectInfo[];
    },
    inspectVolume(name, signal) {
      return call(signal, () => docker.getVolume(name).inspect({ abortSignal: signal } as never) as unknown as Promise<VolumeInspectInfo>);
    },
    createVolume(name, labels, signal) {
      // dockerode's createVolume answers with a handle only, and would put the signal in the body.
      return call(
        signal,
        () =>
          new Promise<VolumeInspectInfo>((resolve, reject) =>
            docker.modem.dial(
              {
                path: "/volumes/create?",
                method: "POST",
                options: { Name: name, Driver: "local", Labels: { ...labels } },
                abortSignal: signal,
                statusCodes: { 200: true, 201: true, 500: "server error" },
              } as never,
              (err: unknown, data: unknown) => (err ? reject(err as Error) : resolve(data as VolumeInspectInfo)),
            ),
          ),
      );
    },
    async removeVolume(name, signal) {
      await call(signal, () => docker.getVolume(name).remove({ abortSignal: signal } as never) as unknown as Promise<unknown>);
    },
    pullImage(reference, signal) {
      return progress(signal, () => docker.pull(reference, { abortSignal: signal }) as Promise<NodeJS.ReadableStream>);
    },
    loadImage(archive, signal) {
      // quiet: the engine's own progress bars are not needed, piccolod counts the bytes it sends.
      return progress(signal, () => docker.loadImage(archive, { quiet: true, abortSignal: signal } as never) as unknown as Promise<NodeJS.ReadableStream>);
    },
    importRootfs(tarball, repo, tag, signal) {
      return progress(signal, () => docker.importImage(tarball, { repo, tag, abortSignal: signal }));
    },
    buildImage(context, o, signal) {
      const src = "folder" in context ? { context: context.folder, src: [...context.entries] } : context.tarball;
      const opts = {
        dockerfile: o.dockerfile,
        t: [...o.tags],
        buildargs: { ...o.buildArgs },
        labels: { ...o.labels },
        nocache: o.noCache,
        // Intermediate containers go away even when a step fails.
        rm: true,
        forcerm: true,
        abortSignal: signal,
      };
      return progress(signal, () => docker.buildImage(src as never, opts as never) as unknown as Promise<NodeJS.ReadableStream>);
    },
  };
}
