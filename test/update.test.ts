/**
 * OS updates end to end: piccolod against the update_engine simulator on a private dbus-daemon,
 * the reference update server and a GPT disk image. A full apply watched over gRPC and REST at
 * once, checked afterwards with `cgpt show` and by reading the partition back; the A/B status;
 * a second apply refused while update_engine waits for a reboot; rollback (and its refusal
 * without force); update checks; the configuration; and a reboot without logind.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { promisify } from "node:util";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { ApplyUpdateRequest, ApplyUpdateResult, RollbackUpdateRequest, RollbackUpdateResult, SetUpdateConfigRequest, Slot } from "../gen/piccolo/update/v1/update.js";
import { ORIGINAL_UPDATE_CONF } from "./sim/update-engine-harness.js";
import { cgptFlags, readDisk } from "./sim/update-engine-disk.js";
import { drain, outcome, phases, snapshot, startUpdateWorld, type UpdateWorld } from "./update-world.js";

const run = promisify(execFile);

let w: UpdateWorld;

beforeAll(async () => {
  w = await startUpdateWorld();
}, 120_000);

afterAll(async () => {
  await w?.cleanup();
});

const APPLY_PHASES = [
  "start",
  "resolve",
  "download",
  "verify_checksum",
  "verify_signature",
  "handoff",
  "checking",
  "downloading",
  "verifying",
  "finalizing",
  "reboot_required",
];

describe("before any update", () => {
  test("GetUpdateStatus shows USR-A booted and good, USR-B never booted, update_engine idle", async () => {
    const s = await w.d.grpcUnix().update.getUpdateStatus({});
    expect(s.bootedVersion).toBe("1.0.0");
    expect(s.bootedSlot).toBe(Slot.SLOT_A);
    expect(s.slots.map((x) => [x.label, x.priority, x.tries, x.successful, x.booted, x.nextBoot])).toEqual([
      ["USR-A", 1, 0, true, true, true],
      ["USR-B", 0, 0, false, false, false],
    ]);
    expect(s.slots[0]!.partitionGuid).toBe(w.rig.disk.guidA.toUpperCase());
    expect(s.engine).toMatchObject({ reachable: true, currentOperation: "UPDATE_STATUS_IDLE" });
    expect(s.rebootPending).toBe(false);
    expect(s.config).toMatchObject({ channel: "stable", server: w.server.url, signingKeyFingerprints: [w.key.fingerprint] });
    // The same over REST.
    const r = await w.d.rest().update.getUpdateStatus({});
    expect(r.slots.map((x) => x.label)).toEqual(["USR-A", "USR-B"]);
  });

  test("CheckForUpdate asks the server for the newest version on the channel", async () => {
    const c = await w.d.grpcUnix().update.checkForUpdate({ channel: "" });
    expect(c).toMatchObject({ updateAvailable: true, version: "1.1.0", sizeBytes: w.release.size, currentVersion: "1.0.0", channel: "stable", sha256: w.release.sha256 });
    expect(c.notes).toContain("1.1.0");
    const seen = w.server.requests.filter((q) => q.url.startsWith("/api/v1/updates/check"));
    expect(seen[seen.length - 1]!.url).toContain("channel=stable");
    const s = await w.d.grpcUnix().update.getUpdateStatus({});
    expect(s.lastCheck?.version).toBe("1.1.0");
    expect(s.lastCheckTime).toBeDefined();
  });

  test("CheckForUpdate on a channel the server does not have is an error naming the server", async () => {
    await expect(w.d.grpcUnix().update.checkForUpdate({ channel: "nightly" })).rejects.toMatchObject({
      code: 14,
      details: expect.stringContaining(`${w.server.url} answered HTTP 404`),
    });
    await expect(w.d.grpcUnix().update.checkForUpdate({ channel: "bad channel!" })).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^channel: /) });
  });
});

describe("a full apply", () => {
  let grpcEvents: OperationEvent[];
  let restEvents: OperationEvent[];

  beforeAll(async () => {
    // The first connection drops half way: the download must resume with a Range request.
    w.server.faults.cutOnceAt = Math.floor(w.release.size / 2);
    const stream = w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" }));
    const it = stream[Symbol.asyncIterator]();
    const first = await it.next();
    const id = (first.value as OperationEvent).operationId;
    // A REST watcher attaches while the operation runs and replays from the start.
    const restP = drain(w.d.rest().operations.watchOperation({ id, afterSequence: 0 }));
    grpcEvents = [first.value as OperationEvent];
    for (let r = await it.next(); !r.done; r = await it.next()) grpcEvents.push(r.value);
    restEvents = await restP;
  }, 180_000);

  test("succeeds, and gRPC and REST watchers both see every phase in order", () => {
    expect(outcome(grpcEvents)).toMatchObject({ state: "OPERATION_STATE_SUCCEEDED" });
    expect(phases(grpcEvents)).toEqual(APPLY_PHASES);
    expect(phases(restEvents)).toEqual(APPLY_PHASES);
    expect(restEvents.filter((e) => !e.attached).map((e) => e.sequence)).toEqual(grpcEvents.filter((e) => !e.attached).map((e) => e.sequence));
    const dl = grpcEvents.filter((e) => e.progress?.phase === "downloading").map((e) => e.progress!.percent);
    expect(dl.length).toBeGreaterThan(1);
    const result = ApplyUpdateResult.decode(grpcEvents.find((e) => e.outcome)!.outcome!.result!.value);
    expect(result).toMatchObject({ version: "1.1.0", slot: Slot.SLOT_B, sha256: w.release.sha256, signerFingerprint: w.key.fingerprint, rebootRequired: true });
  });

  test("the download was resumed with HTTP Range after the connection dropped", () => {
    const downloads = w.server.requests.filter((q) => q.url.includes("type=update") && !q.url.includes("signature"));
    expect(downloads.length).toBeGreaterThanOrEqual(2);
    expect(downloads[0]!.range).toBe("");
    expect(downloads[downloads.length - 1]!.range).toMatch(/^bytes=\d+-$/);
  });

  test("cgpt show: USR-B above USR-A, tries 1, successful 0; its contents are the payload", async () => {
    const b = await cgptFlags(w.rig.disk.path, w.rig.disk.usrB);
    const a = await cgptFlags(w.rig.disk.path, w.rig.disk.usrA);
    expect(b).toEqual({ priority: expect.any(Number), tries: 1, successful: 0 });
    expect(b.priority).toBeGreaterThan(a.priority);
    expect(a.successful).toBe(1);
    const written = await readDisk(w.rig.disk.path, w.rig.disk.offsetB, w.release.image.length);
    expect(written.equals(w.release.image)).toBe(true);
  });

  test("update.conf is back as it was, byte for byte", async () => {
    expect(await readFile(w.rig.updateConf, "utf8")).toBe(ORIGINAL_UPDATE_CONF);
  });

  test("GetUpdateStatus shows the new version in USR-B, next boot, reboot pending", async () => {
    const s = await w.d.grpcUnix().update.getUpdateStatus({});
    expect(s.rebootPending).toBe(true);
    expect(s.engine?.currentOperation).toBe("UPDATE_STATUS_UPDATED_NEED_REBOOT");
    expect(s.slots[1]).toMatchObject({ label: "USR-B", version: "1.1.0", nextBoot: true, booted: false, tries: 1, successful: false });
  });

  test("a second apply while update_engine waits for a reboot fails clearly and changes nothing", async () => {
    const before = await snapshot(w.rig);
    const ev = await drain(w.d.grpcUnix().update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" })));
    expect(outcome(ev)).toMatchObject({ state: "OPERATION_STATE_FAILED", code: 9 });
    expect(outcome(ev).message).toMatch(/waits for a reboot \(UPDATE_STATUS_UPDATED_NEED_REBOOT\); reboot or roll back first/);
    expect(await snapshot(w.rig)).toEqual(before);
  });

  test("rollback flips the priorities back (cgpt show) and resets update_engine", async () => {
    const ev = await drain(w.d.rest().update.rollbackUpdate({ force: false }));
    expect(outcome(ev).state).toBe("OPERATION_STATE_SUCCEEDED");
    const r = RollbackUpdateResult.decode(ev.find((e) => e.outcome)!.outcome!.result!.value);
    expect(r.nextBoot?.label).toBe("USR-A");
    expect(r.previous?.label).toBe("USR-B");
    const a = await cgptFlags(w.rig.disk.path, w.rig.disk.usrA);
    const b = await cgptFlags(w.rig.disk.path, w.rig.disk.usrB);
    expect(a.priority).toBeGreaterThan(b.priority);
    expect(a.successful).toBe(1);
    const s = await w.d.grpcUnix().update.getUpdateStatus({});
    expect(s.slots[0]!.nextBoot).toBe(true);
    expect(s.rebootPending).toBe(false);
    expect(s.engine?.currentOperation).toBe("UPDATE_STATUS_IDLE");
  });

  test("rolling back to USR-B, which never booted successfully, is refused unless forced", async () => {
    const before = await snapshot(w.rig);
    await expect(drain(w.d.grpcUnix().update.rollbackUpdate(RollbackUpdateRequest.fromPartial({ force: false })))).rejects.toMatchObject({
      code: 9,
      details: expect.stringContaining("USR-B has never booted successfully"),
    });
    expect(await snapshot(w.rig)).toEqual(before);
    const ev = await drain(w.d.grpcUnix().update.rollbackUpdate(RollbackUpdateRequest.fromPartial({ force: true })));
    expect(outcome(ev).state).toBe("OPERATION_STATE_SUCCEEDED");
    const b = await cgptFlags(w.rig.disk.path, w.rig.disk.usrB);
    expect(b.priority).toBeGreaterThan((await cgptFlags(w.rig.disk.path, w.rig.disk.usrA)).priority);
    expect(b.tries).toBe(1);
    // sgdisk, another reader of the same bits, agrees.
    const { stdout } = await run("sgdisk", ["-i", String(w.rig.disk.usrB), w.rig.disk.path]);
    expect(stdout).toMatch(/Attribute flags: 0012000000000000/);
  });
});

describe("configuration and reboot", () => {
  test("SetUpdateConfig changes channel, server and keys; bad values name the field and change nothing", async () => {
    const u = w.d.grpcUnix().update;
    await expect(u.setUpdateConfig(SetUpdateConfigRequest.fromPartial({ channel: "x y" }))).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^channel: /) });
    await expect(u.setUpdateConfig(SetUpdateConfigRequest.fromPartial({ server: "ftp://example" }))).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^server: /) });
    await expect(u.setUpdateConfig(SetUpdateConfigRequest.fromPartial({ signingKeys: { armoredKeys: ["not a key"] } }))).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/^signing_keys.armored_keys\[0\]: is not an ASCII-armored OpenPGP public key/),
    });
    expect((await u.getUpdateStatus({})).config).toMatchObject({ channel: "stable", signingKeyFingerprints: [w.key.fingerprint] });
    const c = await u.setUpdateConfig(SetUpdateConfigRequest.fromPartial({ channel: "beta", signingKeys: { armoredKeys: [w.key.publicKey, w.otherKey.publicKey] } }));
    expect(c).toEqual({ channel: "beta", server: w.server.url, signingKeyFingerprints: [w.key.fingerprint, w.otherKey.fingerprint] });
    const back = await w.d.rest().update.setUpdateConfig({ channel: "stable", signingKeys: { armoredKeys: [w.key.publicKey] } });
    expect(back.signingKeyFingerprints).toEqual([w.key.fingerprint]);
  });

  test("Reboot without systemd-logind on the bus is UNAVAILABLE naming it; a bad request names the field", async () => {
    const u = w.d.grpcUnix().update;
    await expect(u.reboot({ reason: "", delay: undefined })).rejects.toMatchObject({ code: 3, details: "reason: is required" });
    await expect(u.reboot({ reason: "x", delay: { seconds: 90_000, nanos: 0 } })).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^delay: /) });
    await expect(u.reboot({ reason: "test", delay: { seconds: 60, nanos: 0 } })).rejects.toMatchObject({
      code: 14,
      details: expect.stringContaining("systemd-logind (org.freedesktop.login1) is not on the system bus"),
    });
  });

  test("ApplyUpdate with a bad request names the field and starts nothing", async () => {
    const u = w.d.grpcUnix().update;
    await expect(drain(u.applyUpdate(ApplyUpdateRequest.fromPartial({})))).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^source: /) });
    await expect(drain(u.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "../etc" })))).rejects.toMatchObject({ code: 3, details: expect.stringMatching(/^version: /) });
    await expect(drain(u.applyUpdate(ApplyUpdateRequest.fromPartial({ local: { payloadPath: "/nonexistent/p.raw.gz", signaturePath: "/nonexistent/p.asc", version: "1", sha256: "" } })))).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/^local.payload_path: /),
    });
    const ops = await w.d.grpcUnix().operations.listOperations({ kind: "update.apply", state: OperationState.OPERATION_STATE_UNSPECIFIED, pageSize: 100, pageToken: "" });
    expect(ops.operations.length).toBe(2);
  });
});
