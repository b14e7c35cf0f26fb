/**
 * Shared set-up of the update tests: the update rig (private bus, update_engine simulator, disk
 * image), the reference update server with a release signed by a throwaway key, and piccolod
 * pointed at all of it; plus snapshots of what must not change and event helpers.
 */
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { startUpdateRig, type UpdateRig, type UpdateRigOptions } from "./sim/update-engine-harness.js";
import { makeRelease, makeSigningKey, startUpdateServer, type Release, type SigningKey, type UpdateServer } from "./sim/update-server.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

/** Everything one update test file uses. */
export interface UpdateWorld {
  readonly dir: string;
  readonly rig: UpdateRig;
  readonly key: SigningKey;
  readonly otherKey: SigningKey;
  readonly release: Release;
  readonly server: UpdateServer;
  readonly keyFile: string;
  d: TestDaemon;
  cleanup(): Promise<void>;
}

/** Starts the rig, the server with release 1.1.0 (`bytes` uncompressed) and piccolod. */
export async function startUpdateWorld(o: { bytes?: number; rig?: UpdateRigOptions; daemonArgs?: string[] } = {}): Promise<UpdateWorld> {
  const dir = await mkdtemp(join(tmpdir(), "piccolod-update-"));
  const rig = await startUpdateRig({ usrMiB: 16, ...o.rig });
  const key = await makeSigningKey();
  const otherKey = await makeSigningKey("Somebody Else");
  const release = await makeRelease(join(dir, "releases"), key, "1.1.0", o.bytes ?? 6 * 1024 * 1024);
  const server = await startUpdateServer([release]);
  const keyFile = join(dir, "signing-keys.asc");
  await writeFile(keyFile, key.publicKey);
  const d = await startTestDaemon({
    extraArgs: [...rig.daemonArgs(), "--update-server", server.url, "--signing-key-files", keyFile, "--update-download-retries", "2", ...(o.daemonArgs ?? [])],
  });
  const w: UpdateWorld = {
    dir,
    rig,
    key,
    otherKey,
    release,
    server,
    keyFile,
    d,
    async cleanup() {
      await w.d?.cleanup();
      await server.close();
      await rig.cleanup();
      await key.cleanup();
      await otherKey.cleanup();
      await rm(dir, { recursive: true, force: true });
    },
  };
  return w;
}

/** SHA-256 of the disk image and the bytes of update.conf: what a refused update must not change. */
export async function snapshot(rig: UpdateRig): Promise<{ disk: string; conf: string }> {
  return {
    disk: createHash("sha256").update(await readFile(rig.disk.path)).digest("hex"),
    conf: (await readFile(rig.updateConf)).toString("base64"),
  };
}

/** Drains a stream of operation events. */
export async function drain(it: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** The phases in the order they first appear. */
export function phases(events: readonly OperationEvent[]): string[] {
  const out: string[] = [];
  for (const e of events) {
    const p = e.progress?.phase;
    if (p && out[out.length - 1] !== p) out.push(p);
  }
  return out;
}

/** The outcome event's state name and error message. */
export function outcome(events: readonly OperationEvent[]): { state: string; message: string; code: number } {
  const o = events.find((e) => e.outcome)?.outcome;
  return { state: o ? OperationState[o.state] : "none", message: o?.error?.message ?? "", code: o?.error?.code ?? 0 };
}

/** Waits until `cond` holds, polling. */
export async function until(cond: () => boolean | Promise<boolean>, what: string, timeoutMs = 60_000): Promise<void> {
  const t0 = Date.now();
  while (!(await cond())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
