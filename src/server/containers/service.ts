/** ContainerService: the RPC layer over the container manager and the image operations. */
import type { ContainerServiceService } from "../../../gen/piccolo/containers/v1/containers.js";
import { invalidArgument } from "../errors.js";
import type { OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import type { ServiceImpl } from "../rpc.js";
import { BUILD_KIND, IMPORT_KIND, prepareBuild, prepareImport, preparePull, PULL_KIND } from "./images.js";
import type { ContainerManager } from "./manager.js";
import { checkContainerName, checkImageReference } from "./spec.js";

/** What ContainerService needs. */
export interface ContainerServiceDeps {
  readonly containers: ContainerManager;
  readonly ops: OperationManager;
}

/** The engine's default stop grace period, used when a request leaves it unset. */
const DEFAULT_GRACE_SECONDS = 10;

const grace = (value: number | undefined, field: string): number => {
  if (value === undefined) return DEFAULT_GRACE_SECONDS;
  if (!Number.isInteger(value) || value < 0 || value > 3600) throw invalidArgument(field, `must be between 0 and 3600 (got ${value})`);
  return value;
};

/** Creates the ContainerService implementation. */
export function createContainerService(deps: ContainerServiceDeps): ServiceImpl<typeof ContainerServiceService> {
  const { containers, ops } = deps;
  return {
    async listContainers(req, ctx) {
      return { containers: await containers.list(req.includeUnmanaged, ctx.signal) };
    },
    getContainer(req, ctx) {
      return containers.get(checkContainerName(req.name, "name"), ctx.signal);
    },
    createContainer(req, ctx) {
      return containers.create(req.spec, ctx.signal);
    },
    startContainer(req, ctx) {
      return containers.start(checkContainerName(req.name, "name"), ctx.signal);
    },
    stopContainer(req, ctx) {
      return containers.stop(checkContainerName(req.name, "name"), grace(req.gracePeriodSeconds, "grace_period_seconds"), ctx.signal);
    },
    restartContainer(req, ctx) {
      return containers.restart(checkContainerName(req.name, "name"), grace(req.gracePeriodSeconds, "grace_period_seconds"), ctx.signal);
    },
    removeContainer(req, ctx) {
      return containers.remove(checkContainerName(req.name, "name"), { force: req.force, volumes: req.volumes }, ctx.signal);
    },
    ensureRunning(req, ctx) {
      return containers.ensureRunning(req.spec, ctx.signal);
    },
    async streamLogs(req, ctx, sink) {
      const name = checkContainerName(req.name, "name");
      const request = { follow: req.follow, tail: req.tail, since: req.since, timestamps: req.timestamps };
      for await (const entry of containers.logs(name, request, ctx.signal)) await sink.send(entry);
    },
    async getStats(req, ctx, sink) {
      for await (const s of containers.stats(checkContainerName(req.name, "name"), req.stream, ctx.signal)) await sink.send(s);
    },
    async watchEvents(req, ctx, sink) {
      const name = req.name === "" ? undefined : checkContainerName(req.name, "name");
      for await (const e of containers.events({ includeUnmanaged: req.includeUnmanaged, since: req.since, name }, ctx.signal)) await sink.send(e);
    },
    async listImages(req, ctx) {
      if (req.reference.length > 512 || /[\s\0]/.test(req.reference)) {
        throw invalidArgument("reference", "must be an image reference pattern without spaces");
      }
      return { images: await containers.listImages(req.reference, ctx.signal) };
    },
    async pullImage(req, ctx, sink) {
      const op = await ops.start(PULL_KIND, preparePull(req), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async importImage(req, ctx, sink) {
      const op = await ops.start(IMPORT_KIND, await prepareImport(req, containers.policy), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    async buildImage(req, ctx, sink) {
      const op = await ops.start(BUILD_KIND, await prepareBuild(req, containers.policy), ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(ops, op.id, 0, ctx, sink);
    },
    removeImage(req, ctx) {
      return containers.removeImage(checkImageReference(req.reference, "reference"), req.force, ctx.signal);
    },
  };
}
