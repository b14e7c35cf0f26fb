/**
 * Updates that must fail and change nothing: a payload with one flipped byte, a signature by a
 * key that is not configured, a download cut short every time, the server answering 404 and 500,
 * a second apply while one runs, and a local payload with a wrong checksum — each fails with a
 * clear message before any D-Bus call where verification is at fault, leaving the disk image and
 * update.conf byte-identical. Then update_engine failing (hash mismatch reported by it), update_engine
 * killed mid-update, and piccolod killed mid-update: the operation ends FAILED or INTERRUPTED and
 * update.conf is restored at once or at the next start.
 */
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { ApplyUpdateRequest } from "../gen/piccolo/update/v1/update.js";
import { ORIGINAL_UPDATE_CONF } from "./sim/update-engine-harness.js";
import { cgptFlags } from "./sim/update-engine-disk.js";
import { drain, outcome, phases, snapshot, startUpdateWorld, until, type UpdateWorld } from "./update-world.js";

let w: UpdateWorld;

beforeAll(async () => {
  w = await startUpdateWorld();
}, 120_000);

afterAll(async () => {
  await w?.cleanup();
});

const apply = (req: Partial<ApplyUpdateRequest>): Promise<OperationEvent[]> => drain(w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial(req)));

/** D-Bus method calls the simulator has logged so far. */
const dbusCalls = (): number => (w.rig.sim.output().match(/call (GetStatus|AttemptUpdate|ResetStatus)/g) ?? []).length;

/** Runs a refused apply and checks nothing changed and nothing reached update_engine. */
async function refused(req: Partial<ApplyUpdateRequest>, message: RegExp, lastPhase: string): Promise<void> {
  const before = await snapshot(w.rig);
  const calls = dbusCalls();
  const ev = await apply(req);
  const o = outcome(ev);
  expect(o.state).toBe("OPERATION_STATE_FAILED");
  expect(o.message).toMatch(message);
  expect(phases(ev).pop()).toBe(lastPhase);
  expect(dbusCalls()).toBe(calls);
  expect(await snapshot(w.rig)).toEqual(before);
}

describe("verification failures change nothing and never reach update_engine", () => {
  afterEach(() => {
    for (const k of Object.keys(w.server.faults)) delete (w.server.faults as Record<string, unknown>)[k];
  });

  test("a payload with one flipped byte", async () => {
    w.server.faults.flipByteAt = 5000;
    await refused({ version: "1.1.0" }, /payload's SHA-256 [0-9a-f]{64} does not match the manifest's [0-9a-f]{64}; the download was deleted; nothing was handed to update_engine/, "verify_checksum");
  });

  test("a signature by a key that is not configured", async () => {
    const sig = join(w.dir, "other.asc");
    await w.otherKey.sign(w.release.payload, sig);
    w.server.faults.signature = await readFile(sig, "utf8");
    await refused({ version: "1.1.0" }, /signed by key [0-9A-F]+, which is not one of the configured Piccolo signing keys/, "verify_signature");
  });

  test("a download that is cut short on every attempt", async () => {
    w.server.faults.truncateAt = Math.floor(w.release.size / 3);
    await refused({ version: "1.1.0" }, new RegExp(`failed after 3 attempts at byte ${Math.floor(w.release.size / 3)} of ${w.release.size}`), "download");
  });

  test("the server answers 404 for an unknown version, and 500", async () => {
    await refused({ version: "7.7.7" }, /has no version "7.7.7" on channel "stable" \(HTTP 404\)/, "resolve");
    w.server.faults.status = { code: 500, count: 1 };
    await refused({ version: "latest" }, /answered HTTP 500/, "resolve");
  });

  test("a local payload with a wrong checksum, and one with a valid signature of another key", async () => {
    await refused(
      { local: { payloadPath: w.release.payload, signaturePath: w.release.signature, version: "1.1.0", sha256: "0".repeat(64) } },
      /does not match the given 0{64}; nothing was handed/,
      "verify_checksum",
    );
    const sig = join(w.dir, "other-local.asc");
    await w.otherKey.sign(w.release.payload, sig);
    await refused({ local: { payloadPath: w.release.payload, signaturePath: sig, version: "1.1.0", sha256: "" } }, /not one of the configured Piccolo signing keys/, "verify_signature");
    const bad = join(w.dir, "garbage.asc");
    await writeFile(bad, "this is not a signature\n");
    await refused({ local: { payloadPath: w.release.payload, signaturePath: bad, version: "1.1.0", sha256: "" } }, /signature/, "verify_signature");
  });
});

describe("while an update runs", () => {
  test("a second apply is FAILED_PRECONDITION naming the running operation", async () => {
    await w.rig.restartSim({ rate: 2 * 1024 * 1024 });
    const first = w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" }))[Symbol.asyncIterator]();
    const head = (await first.next()).value as OperationEvent;
    await expect(apply({ version: "1.1.0" })).rejects.toMatchObject({ code: 9, details: expect.stringContaining(head.operationId) });
    // A rollback needs the same lock.
    await expect(drain(w.d.grpcUnix().update.rollbackUpdate({ force: true, reboot: false }))).rejects.toMatchObject({ code: 9, details: expect.stringContaining(head.operationId) });
    const rest: OperationEvent[] = [head];
    for (let r = await first.next(); !r.done; r = await first.next()) rest.push(r.value);
    expect(outcome(rest).state).toBe("OPERATION_STATE_SUCCEEDED");
    // Put the disk and update_engine back for the next tests.
    await drain(w.d.grpcUnix().update.rollbackUpdate({ force: false, reboot: false }));
  });
});

describe("update_engine failing or going away", () => {
  test("update_engine's own failure (hash mismatch) ends FAILED with its reason; update.conf restored", async () => {
    await w.rig.restartSim({ fail: "bad-hash" });
    const ev = await apply({ version: "1.1.0" });
    expect(outcome(ev)).toMatchObject({ state: "OPERATION_STATE_FAILED" });
    expect(outcome(ev).message).toContain("update_engine failed the update: kActionCodePayloadHashMismatchError (code 10)");
    expect(await readFile(w.rig.updateConf, "utf8")).toBe(ORIGINAL_UPDATE_CONF);
  });

  test("update_engine killed mid-update: FAILED naming it, update.conf restored at once", async () => {
    await w.rig.restartSim({ rate: 1024 * 1024 });
    const flagsBefore = await cgptFlags(w.rig.disk.path, w.rig.disk.usrB);
    const events: OperationEvent[] = [];
    const done = (async () => {
      for await (const e of w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" }))) events.push(e);
    })();
    await until(() => events.some((e) => e.progress?.phase === "downloading"), "update_engine to download");
    expect(await readFile(w.rig.updateConf, "utf8")).not.toBe(ORIGINAL_UPDATE_CONF);
    await w.rig.sim.kill9();
    await done;
    expect(outcome(events).state).toBe("OPERATION_STATE_FAILED");
    expect(outcome(events).message).toMatch(/update_engine \(com.coreos.update1\) (left the system bus|stopped answering) while it was at UPDATE_STATUS_DOWNLOADING/);
    expect(await readFile(w.rig.updateConf, "utf8")).toBe(ORIGINAL_UPDATE_CONF);
    // The half-written slot was not marked to boot.
    expect(await cgptFlags(w.rig.disk.path, w.rig.disk.usrB)).toEqual(flagsBefore);
    expect((await w.d.grpcUnix().update.getUpdateStatus({})).slots[0]!.nextBoot).toBe(true);
  });

  test("update_engine crashing by itself mid-download: FAILED, update.conf restored", async () => {
    await w.rig.restartSim({ fail: "crash-mid-download", rate: 2 * 1024 * 1024 });
    const ev = await apply({ version: "1.1.0" });
    expect(outcome(ev).state).toBe("OPERATION_STATE_FAILED");
    expect(outcome(ev).message).toMatch(/com.coreos.update1/);
    expect(await readFile(w.rig.updateConf, "utf8")).toBe(ORIGINAL_UPDATE_CONF);
  });

  test("cancelled while update_engine downloads: CANCELLED saying update_engine may finish, update.conf restored at once", async () => {
    await w.rig.restartSim({ rate: 1024 * 1024 });
    const events: OperationEvent[] = [];
    const done = (async () => {
      for await (const e of w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" }))) events.push(e);
    })();
    await until(() => events.some((e) => e.progress?.phase === "downloading"), "update_engine to download");
    await w.d.grpcUnix().operations.cancelOperation({ id: events[0]!.operationId });
    await done;
    expect(outcome(events).state).toBe("OPERATION_STATE_CANCELLED");
    expect(outcome(events).message).toMatch(/stopped following update_engine at UPDATE_STATUS_DOWNLOADING; .* may still finish the update/);
    expect(await readFile(w.rig.updateConf, "utf8")).toBe(ORIGINAL_UPDATE_CONF);
    // Let the simulator finish (it was told nothing), then put things back for the next test.
    await until(async () => (await w.d.grpcUnix().update.getUpdateStatus({})).engine?.currentOperation !== "UPDATE_STATUS_DOWNLOADING", "update_engine to finish");
    await drain(w.d.grpcUnix().update.rollbackUpdate({ force: false, reboot: false })).catch(() => undefined);
  });

  test("piccolod killed mid-update: INTERRUPTED at the next start, update.conf restored then", async () => {
    await w.rig.restartSim({ rate: 1024 * 1024 });
    const events: OperationEvent[] = [];
    const stream = w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" }));
    const done = (async () => {
      try {
        for await (const e of stream) events.push(e);
      } catch {
        // the daemon dies under the stream
      }
    })();
    await until(() => events.some((e) => e.progress?.phase === "downloading"), "update_engine to download");
    const id = events[0]!.operationId;
    await w.d.kill9();
    await done;
    expect(await readFile(w.rig.updateConf, "utf8")).toContain("SERVER=http://127.0.0.1:");
    await w.d.restart();
    expect(await readFile(w.rig.updateConf, "utf8")).toBe(ORIGINAL_UPDATE_CONF);
    const op = await w.d.grpcUnix().operations.getOperation({ id });
    expect(op.state).toBe(OperationState.OPERATION_STATE_INTERRUPTED);
    expect(op.error?.message).toContain(`restored ${w.rig.updateConf} to what it was before the update`);
  });
});
