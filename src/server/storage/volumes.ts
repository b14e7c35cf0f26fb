/**
 * App data volumes: Docker named volumes on the local driver, labelled as piccolod's, with the
 * containers that mount each. Shared with the backup area, which backs up their folders and
 * quiesces the containers using them.
 */
import type { Volume } from "../../../gen/piccolo/storage/v1/storage.js";
import { DockerApiError, type DockerEngine, type VolumeInspectInfo } from "../containers/docker.js";
import { MANAGED_LABEL, RESERVED_LABEL_PREFIX } from "../containers/spec.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";

const VOLUME_NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{1,127}$/;

/** Checks a volume name from a request. */
export function checkVolumeName(value: string, field: string): string {
  if (value.trim() === "") throw invalidArgument(field, "is required");
  if (!VOLUME_NAME.test(value)) {
    throw invalidArgument(
      field,
      `${JSON.stringify(value.slice(0, 80))} is not a volume name (a letter or digit, then letters, digits, "_", "." or "-"; 2 to 128 characters)`,
    );
  }
  return value;
}

/** A container that mounts a volume. */
export interface VolumeUser {
  readonly id: string;
  readonly name: string;
  /** "running", "paused", "exited", … */
  readonly state: string;
}

/** The volume operations (used by StorageService and the backup area). */
export interface VolumeManager {
  list(includeUnmanaged: boolean, signal: AbortSignal): Promise<Volume[]>;
  /** One volume; NOT_FOUND when there is none. */
  get(name: string, signal: AbortSignal): Promise<Volume>;
  create(name: string, labels: Readonly<Record<string, string>>, signal: AbortSignal): Promise<Volume>;
  remove(name: string, signal: AbortSignal): Promise<void>;
  /** The containers (any state) that mount the volume. */
  users(name: string, signal: AbortSignal): Promise<VolumeUser[]>;
}

const toVolume = (v: VolumeInspectInfo, containers: readonly string[]): Volume => {
  const labels: Record<string, string> = {};
  for (const [k, val] of Object.entries(v.Labels ?? {})) if (!k.startsWith(RESERVED_LABEL_PREFIX)) labels[k] = val;
  const created = v.CreatedAt ? new Date(v.CreatedAt) : undefined;
  return {
    name: v.Name,
    driver: v.Driver,
    mountPoint: v.Mountpoint,
    createTime: created && !Number.isNaN(created.getTime()) ? created : undefined,
    labels,
    managed: v.Labels?.[MANAGED_LABEL] === "true",
    containers: [...containers].sort(),
  };
};

/** Creates the volume manager over the Docker engine adapter. */
export function createVolumeManager(engine: DockerEngine): VolumeManager {
  const engineNotFound = (e: unknown, name: string): unknown => (e instanceof DockerApiError && e.statusCode === 404 ? notFound("volume", name) : e);

  const usersByVolume = async (signal: AbortSignal): Promise<Map<string, VolumeUser[]>> => {
    const map = new Map<string, VolumeUser[]>();
    for (const c of await engine.listContainers({ all: true }, signal)) {
      const name = (c.Names?.[0] ?? c.Id).replace(/^\//, "");
      for (const m of c.Mounts ?? []) {
        if (m.Type !== "volume" || !m.Name) continue;
        const list = map.get(m.Name) ?? [];
        list.push({ id: c.Id, name, state: c.State });
        map.set(m.Name, list);
      }
    }
    return map;
  };

  const self: VolumeManager = {
    async list(includeUnmanaged, signal) {
      const [vols, users] = await Promise.all([
        engine.listVolumes(includeUnmanaged ? {} : { labels: [`${MANAGED_LABEL}=true`] }, signal),
        usersByVolume(signal),
      ]);
      return vols.map((v) => toVolume(v, (users.get(v.Name) ?? []).map((u) => u.name))).sort((a, b) => a.name.localeCompare(b.name));
    },
    async get(name, signal) {
      let v: VolumeInspectInfo;
      try {
        v = await engine.inspectVolume(name, signal);
      } catch (e) {
        throw engineNotFound(e, name);
      }
      return toVolume(v, (await self.users(name, signal)).map((u) => u.name));
    },
    async create(name, labels, signal) {
      const l: Record<string, string> = {};
      for (const [k, v] of Object.entries(labels)) {
        if (k === "") throw invalidArgument("labels", "label keys must not be empty");
        if (k.startsWith(RESERVED_LABEL_PREFIX)) throw invalidArgument(`labels[${JSON.stringify(k)}]`, `keys starting with "${RESERVED_LABEL_PREFIX}" are reserved for piccolod`);
        if (k.includes("\0") || v.includes("\0")) throw invalidArgument("labels", "must not contain NUL characters");
        l[k] = v;
      }
      l[MANAGED_LABEL] = "true";
      // The engine's create is idempotent (an existing volume comes back as it is): check first.
      try {
        await engine.inspectVolume(name, signal);
        throw new PiccoloError("already_exists", `volume ${JSON.stringify(name)} already exists`, { reason: "ALREADY_EXISTS" });
      } catch (e) {
        if (!(e instanceof DockerApiError && e.statusCode === 404)) throw e;
      }
      return toVolume(await engine.createVolume(name, l, signal), []);
    },
    async remove(name, signal) {
      const v = await self.get(name, signal);
      if (!v.managed) {
        throw new PiccoloError("failed_precondition", `volume ${JSON.stringify(name)} was not created by piccolod; it is left alone`, { reason: "NOT_MANAGED" });
      }
      const users = await self.users(name, signal);
      if (users.length > 0) {
        throw new PiccoloError(
          "failed_precondition",
          `volume ${JSON.stringify(name)} is used by container${users.length > 1 ? "s" : ""} ${users.map((u) => `${u.name} (${u.state})`).join(", ")}; remove ${users.length > 1 ? "them" : "it"} first`,
          { reason: "VOLUME_IN_USE", metadata: { containers: users.map((u) => u.name).join(",") } },
        );
      }
      try {
        await engine.removeVolume(name, signal);
      } catch (e) {
        if (e instanceof DockerApiError && e.statusCode === 409) {
          throw new PiccoloError("failed_precondition", `volume ${JSON.stringify(name)} is in use: ${e.dockerMessage}`, { reason: "VOLUME_IN_USE" });
        }
        throw engineNotFound(e, name);
      }
    },
    async users(name, signal) {
      return (await usersByVolume(signal)).get(name) ?? [];
    },
  };
  return self;
}
