/** SystemService: version, health and diagnostics. */
import { release } from "node:os";
import type { GetVersionResponse, SystemServiceService } from "../../../gen/piccolo/system/v1/system.js";
import type { OperationManager } from "../operations/manager.js";
import { streamOperation } from "../operations/service.js";
import { validate, type ServiceImpl } from "../rpc.js";
import { buildInfo } from "./build-info.js";
import type { HealthChecker } from "./health.js";
import { readOsRelease } from "./os-release.js";

/** What SystemService needs. */
export interface SystemServiceDeps {
  readonly health: HealthChecker;
  readonly ops: OperationManager;
  readonly osReleaseFiles: readonly string[];
}

/** Creates the SystemService implementation. */
export function createSystemService(deps: SystemServiceDeps): ServiceImpl<typeof SystemServiceService> {
  let version: Promise<GetVersionResponse> | undefined;
  return {
    getVersion() {
      // The answer cannot change while the daemon runs: compute it once.
      version ??= readOsRelease(deps.osReleaseFiles).then((os) => {
        const b = buildInfo();
        return { version: b.version, commit: b.commit, buildTime: b.buildTime, nodeVersion: process.version, os, kernel: release() };
      });
      return version;
    },
    getHealth() {
      return deps.health.run();
    },
    async runDiagnostics(req, ctx, sink) {
      const writeProbeMib = validate.range(req.writeProbeMib, "write_probe_mib", 1, 4096, 64);
      const op = await deps.ops.start("system.diagnostics", { writeProbeMib }, ctx.actor);
      ctx.startedOperation = { id: op.id };
      await streamOperation(deps.ops, op.id, 0, ctx, sink);
    },
  };
}
