/**
 * The update manager: status of the A/B slots and of update_engine, update checks against the
 * Piccolo update server, the update configuration (channel, server, signing keys), reboots, and
 * the `update.apply` and `update.rollback` operation kinds.
 *
 * An apply fetches the payload itself (resumable, retried), checks its SHA-256 against the
 * manifest and its detached OpenPGP signature with gpgv against the configured keys — all before
 * anything is said to update_engine — then serves it from a loopback Omaha responder, points
 * SERVER= in update.conf at it, calls AttemptUpdate and follows StatusUpdate signals (GetStatus
 * polling as a fallback) to UPDATED_NEED_REBOOT. update.conf is restored on every path, and at
 * the next start when piccolod died in between.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { mkdir, readFile, rm, stat } from "node:fs/promises";
import { isAbsolute, join } from "node:path";
import type { Logger } from "pino";
import { Any } from "../../../gen/google/protobuf/any.js";
import type { Operation } from "../../../gen/piccolo/operations/v1/operations.js";
import {
  ApplyUpdateRequest,
  ApplyUpdateResult,
  RollbackUpdateRequest,
  RollbackUpdateResult,
  Slot,
  type CheckForUpdateResponse,
  type GetUpdateStatusResponse,
  type SetUpdateConfigRequest,
  type SlotStatus,
  type UpdateConfig,
} from "../../../gen/piccolo/update/v1/update.js";
import { invalidArgument, PiccoloError, unavailable } from "../errors.js";
import type { OperationKind, WorkerContext } from "../operations/manager.js";
import { readOsRelease } from "../system/os-release.js";
import { findBootDisk } from "../system/health.js";
import { download } from "../releases/download.js";
import { fetchManifest, fetchSignature, VERSION_RE, type Manifest } from "../releases/manifest.js";
import { createOpenPgpVerifier, parsePublicKey, readKeyFiles, type PublicKey, type SignatureCheck, type SignatureVerifier, type VerifiedSignature } from "../verify/openpgp.js";
import { connectUpdateEngine, EngineOp, scheduleReboot, type EngineState, type UpdateEngineClient } from "./engine.js";
import { readSlots, setSlotFlags, type SlotTable, type UsrSlot } from "./gpt.js";
import { ACTION_CODES, startOmahaResponder, type OmahaEvent } from "./omaha.js";
import { createUpdateConf, readJson, writeFileAtomic, type UpdateConf } from "./update-conf.js";

/** Operation kinds. */
export const APPLY_KIND = "update.apply";
export const ROLLBACK_KIND = "update.rollback";

/** What the manager needs. */
export interface UpdateManagerDeps {
  readonly stateDir: string;
  readonly systemBusAddress: string;
  /** Boot disk holding USR-A/USR-B; "" finds it from mountinfo. */
  readonly disk: string;
  readonly mountInfoFile: string;
  readonly kernelCmdlineFile: string;
  readonly updateConfFile: string;
  readonly osReleaseFiles: readonly string[];
  readonly defaultServer: string;
  readonly defaultChannel: string;
  /** Files with the signing keys (armored, or binary keyrings), read at start. */
  readonly signingKeyFiles: readonly string[];
  /** Download attempts after the first. */
  readonly downloadRetries: number;
  /** How long update_engine may go without a status change before the apply fails. */
  readonly engineStallMs: number;
  readonly gpgv?: string;
  readonly log: Logger;
  /** The device's bearer token for the update server, from the trust area when it has one. */
  readonly deviceToken?: () => Promise<string | undefined>;
}

/** The stored configuration (overrides of the defaults). */
interface StoredConfig {
  channel?: string;
  server?: string;
  signingKeys?: string[];
}

/** Small state the area keeps. */
interface StoredState {
  /** Version piccolod installed in each slot, by label. */
  slotVersions: Record<string, string>;
  lastCheck?: { time: string; response: Record<string, unknown> };
}

/** The update manager. */
export interface UpdateManager {
  /** Loads the configuration and restores an update.conf a dead daemon left pointed at itself. */
  init(): Promise<void>;
  status(): Promise<GetUpdateStatusResponse>;
  check(channel: string): Promise<CheckForUpdateResponse>;
  setConfig(req: SetUpdateConfigRequest): Promise<UpdateConfig>;
  reboot(reason: string, delayMs: number): Promise<Date>;
  /** Validates an ApplyUpdate request before an operation starts (fields, keys, local files). */
  prepareApply(req: ApplyUpdateRequest): Promise<ApplyUpdateRequest>;
  /** Refuses a rollback to a slot that never booted successfully (without force) before an operation starts. */
  prepareRollback(req: RollbackUpdateRequest): Promise<RollbackUpdateRequest>;
  readonly applyKind: OperationKind<ApplyUpdateRequest>;
  readonly rollbackKind: OperationKind<RollbackUpdateRequest>;
  /** Checks signatures against the Piccolo signing keys configured here (the installer uses it too). */
  readonly verifier: SignatureVerifier;
  /** The update server, channel and headers to ask it with, as configured now (the installer asks it too). */
  releaseSource(): Promise<{ server: string; channel: string; headers: Record<string, string> }>;
}

const CHANNEL_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Checks an update server URL; returns the problem or undefined. */
export function serverProblem(s: string): string | undefined {
  let u: URL;
  try {
    u = new URL(s);
  } catch {
    return "must be an http or https URL";
  }
  if (u.protocol !== "http:" && u.protocol !== "https:") return "must be an http or https URL";
  if (u.search || u.hash || u.username || u.password) return "must not have a query, fragment or credentials";
  return undefined;
}

const pack = (typeName: string, value: Uint8Array): Any => Any.fromPartial({ typeUrl: `type.googleapis.com/${typeName}`, value });

// Phases of update.apply and their share of the whole, in percent.
const APPLY_PHASES: readonly (readonly [string, number])[] = [
  ["resolve", 2],
  ["download", 38],
  ["verify_checksum", 2],
  ["verify_signature", 2],
  ["handoff", 2],
  ["checking", 2],
  ["downloading", 40],
  ["verifying", 5],
  ["finalizing", 5],
  ["reboot_required", 2],
];

function phaseOf(name: string, withReboot: boolean): { index: number; count: number; start: number; weight: number } {
  const list = withReboot ? [...APPLY_PHASES, ["reboot", 0] as const] : APPLY_PHASES;
  let start = 0;
  for (let i = 0; i < list.length; i++) {
    const [n, w] = list[i]!;
    if (n === name) return { index: i + 1, count: list.length, start, weight: w };
    start += w;
  }
  return { index: 0, count: list.length, start: 100, weight: 0 };
}

const ENGINE_PHASE: Readonly<Record<string, string>> = {
  [EngineOp.CHECKING]: "checking",
  [EngineOp.AVAILABLE]: "checking",
  [EngineOp.DOWNLOADING]: "downloading",
  [EngineOp.VERIFYING]: "verifying",
  [EngineOp.FINALIZING]: "finalizing",
};

/** Creates the update manager. */
export function createUpdateManager(deps: UpdateManagerDeps): UpdateManager {
  const dir = join(deps.stateDir, "update");
  const configFile = join(dir, "config.json");
  const stateFile = join(dir, "state.json");
  const payloadDir = join(dir, "payloads");
  const conf: UpdateConf = createUpdateConf(deps.updateConfFile, join(dir, "update.conf.saved"));
  let stored: StoredConfig = {};
  let defaultKeys: PublicKey[] = [];
  const log = deps.log;

  const keysNow = (): PublicKey[] => (stored.signingKeys ? stored.signingKeys.map((k) => parsePublicKey(k)) : defaultKeys);
  const verifier = createOpenPgpVerifier({ keys: keysNow, gpgv: deps.gpgv });
  const configNow = (): UpdateConfig => {
    let fingerprints: string[] = [];
    try {
      fingerprints = keysNow().map((k) => k.fingerprint);
    } catch {
      fingerprints = [];
    }
    return { channel: stored.channel ?? deps.defaultChannel, server: stored.server ?? deps.defaultServer, signingKeyFingerprints: fingerprints };
  };
  const loadState = (): Promise<StoredState> => readJson<StoredState>(stateFile, { slotVersions: {} });
  const saveState = async (s: StoredState): Promise<void> => {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFileAtomic(stateFile, JSON.stringify(s, null, 2) + "\n");
  };

  const diskPath = async (): Promise<string> => {
    if (deps.disk) return deps.disk;
    const r = await findBootDisk(deps.mountInfoFile);
    if ("error" in r) throw unavailable(`the boot disk (${r.error})`);
    return r.disk;
  };
  const slots = async (): Promise<SlotTable> => readSlots(await diskPath(), deps.kernelCmdlineFile);
  const bootedVersion = async (): Promise<string> => (await readOsRelease(deps.osReleaseFiles)).versionId;

  const authHeaders = async (): Promise<Record<string, string>> => {
    const token = deps.deviceToken ? await deps.deviceToken() : undefined;
    return token ? { authorization: `Bearer ${token}` } : {};
  };

  /** The configured update server and channel, and the headers to ask it with (the device token). */
  const releaseSource = async (): Promise<{ server: string; channel: string; headers: Record<string, string> }> => {
    const c = configNow();
    return { server: c.server, channel: c.channel, headers: await authHeaders() };
  };

  /** GET /api/v1/updates/check on the configured server. */
  const manifestOf = async (channel: string, version: string | undefined, signal?: AbortSignal): Promise<Manifest> =>
    fetchManifest(await releaseSource(), { channel, version, currentVersion: await bootedVersion() }, signal);

  const slotStatus = (s: UsrSlot, t: SlotTable, version: string): SlotStatus => ({
    slot: s.name === "A" ? Slot.SLOT_A : Slot.SLOT_B,
    label: s.label,
    partitionNumber: s.number,
    partitionGuid: s.guid,
    priority: s.priority,
    tries: s.tries,
    successful: s.successful,
    version,
    booted: t.booted?.label === s.label,
    nextBoot: t.next?.label === s.label,
  });

  const engineStatus = async (): Promise<{ state?: EngineState; error?: string }> => {
    const e = connectUpdateEngine(deps.systemBusAddress);
    try {
      return { state: await e.getStatus() };
    } catch (err) {
      return { error: (err as Error).message };
    } finally {
      e.close();
    }
  };

  /** Restores update.conf if a saved original is there; says what it did. */
  const restoreConf = async (): Promise<string> => {
    try {
      return (await conf.restore()) ? `restored ${deps.updateConfFile} to what it was before the update` : "";
    } catch (e) {
      return `could not restore ${deps.updateConfFile}: ${(e as Error).message}`;
    }
  };

  const applyKind: OperationKind<ApplyUpdateRequest> = {
    kind: APPLY_KIND,
    requestType: "piccolo.update.v1.ApplyUpdateRequest",
    encodeRequest: (r) => ApplyUpdateRequest.encode(r).finish(),
    exclusive: true,
    single: true,
    cancellable: true,
    run: (req, ctx) => runApply(req, ctx),
    async recover(op: Operation, rlog: Logger) {
      const restored = await restoreConf();
      if (restored) rlog.warn({ op: op.id }, restored);
      return restored || `${deps.updateConfFile} was not changed`;
    },
  };

  async function runApply(req: ApplyUpdateRequest, ctx: WorkerContext): Promise<Any> {
    const withReboot = req.reboot;
    const report = (phase: string, fraction: number, message: string, extra: { bytesDone?: number; bytesTotal?: number } = {}): void => {
      const p = phaseOf(phase, withReboot);
      ctx.progress({ phase, phaseIndex: p.index, phaseCount: p.count, percent: p.start + p.weight * Math.max(0, Math.min(1, fraction)), message, ...extra });
    };
    const keys = keysNow();
    const channel = configNow().channel;
    await mkdir(payloadDir, { recursive: true, mode: 0o700 });

    // resolve
    let version: string;
    let payloadPath: string;
    let expectedSha = "";
    let size: number;
    let signature: Buffer;
    let manifest: Manifest | undefined;
    if (req.local) {
      report("resolve", 0, `using the local payload ${req.local.payloadPath}`);
      version = req.local.version;
      payloadPath = req.local.payloadPath;
      expectedSha = req.local.sha256.toLowerCase();
      size = (await stat(payloadPath)).size;
      signature = await readFile(req.local.signaturePath);
    } else {
      const want = req.version && req.version !== "latest" ? req.version : undefined;
      report("resolve", 0, `asking ${configNow().server} for ${want ?? "the newest version"} on channel ${channel}`);
      manifest = await manifestOf(channel, want, ctx.signal);
      version = manifest.version;
      expectedSha = manifest.payload.sha256;
      size = manifest.payload.size;
      payloadPath = join(payloadDir, `piccolo-os-update-${version}.raw.gz`);
      signature = await fetchSignature(await releaseSource(), manifest.payload.signatureUrl, ctx.signal);
    }
    report("resolve", 1, `version ${version}, ${size} bytes`, { bytesTotal: size });

    // A download feeds the hashes and gpgv as the bytes arrive (the network is slower than both);
    // a local file is hashed by one read while gpgv reads it by itself.
    const sha256 = createHash("sha256");
    const sha1 = createHash("sha1");
    const sigField = req.local ? "local.signature_path" : "the payload's signature";
    let sig: SignatureCheck | undefined;
    let fileCheck: Promise<VerifiedSignature> | undefined;
    const checkAbort = new AbortController();
    const fileSignal = AbortSignal.any([ctx.signal, checkAbort.signal]);
    try {
      if (manifest) {
        sig = await verifier.startCheck(signature, sigField);
        const check = sig;
        const r = await download({
          url: manifest.payload.url,
          dest: payloadPath,
          size,
          headers: await authHeaders(),
          retries: deps.downloadRetries,
          signal: ctx.signal,
          tap: async (chunk) => {
            sha256.update(chunk);
            sha1.update(chunk);
            await check.write(chunk);
          },
          progress: (done, total, note) => report("download", total > 0 ? done / total : 0, note ?? `downloading ${version}`, { bytesDone: done, bytesTotal: total }),
        });
        report("download", 1, `downloaded ${size} bytes in ${r.attempts} attempt(s)${r.resumedFrom ? `, resumed from byte ${r.resumedFrom}` : ""}`, { bytesDone: size, bytesTotal: size });
      } else {
        fileCheck = verifier.verifyFile(payloadPath, signature, sigField, fileSignal);
        fileCheck.catch(() => undefined);
        let done = 0;
        for await (const chunk of createReadStream(payloadPath, { highWaterMark: 1 << 20, signal: ctx.signal })) {
          sha256.update(chunk as Buffer);
          sha1.update(chunk as Buffer);
          done += (chunk as Buffer).length;
          report("verify_checksum", done / size, `reading ${payloadPath}`, { bytesDone: done, bytesTotal: size });
        }
        if (done !== size) throw new PiccoloError("failed_precondition", `${payloadPath} changed size while it was read`);
      }
      // verify_checksum
      if (manifest) report("verify_checksum", 0, "comparing the SHA-256 with the manifest's");
      const gotSha = sha256.digest("hex");
      if (expectedSha) {
        if (gotSha !== expectedSha) {
          if (manifest) await rm(payloadPath, { force: true });
          throw new PiccoloError(
            "failed_precondition",
            `the payload's SHA-256 ${gotSha} does not match the ${manifest ? "manifest's" : "given"} ${expectedSha}; ${manifest ? "the download was deleted; " : ""}nothing was handed to update_engine`,
          );
        }
        report("verify_checksum", 1, `SHA-256 ${gotSha} matches`);
      } else report("verify_checksum", 1, `no checksum given; SHA-256 is ${gotSha} (the signature covers every byte)`);
      // verify_signature
      report("verify_signature", 0, `checking the detached OpenPGP signature against ${keys.length} signing key(s)`);
      let signer: string;
      try {
        signer = (await (sig ? sig.finish() : fileCheck!)).fingerprint;
      } catch (e) {
        if (manifest) await rm(payloadPath, { force: true });
        // A refused payload is a precondition of the update that failed, whatever the check calls it.
        if (e instanceof PiccoloError) {
          const kind = e.reason === "BAD_SIGNATURE" ? "failed_precondition" : e.kind;
          throw new PiccoloError(kind, `${e.message}; nothing was handed to update_engine`, { cause: e, reason: e.reason });
        }
        throw e;
      } finally {
        sig = undefined;
      }
      report("verify_signature", 1, `signed by ${signer}`);

      // handoff
      const result = await handOff(ctx, report, { version, payloadPath, size, sha1: sha1.digest("base64"), sha256: Buffer.from(gotSha, "hex").toString("base64") });
      const state = await loadState();
      state.slotVersions[result.slot.label] = version;
      await saveState(state);
      if (manifest) await rm(payloadPath, { force: true });
      report("reboot_required", 1, `reboot required: ${version} is in ${result.slot.label} and boots next`);
      let rebootScheduled = false;
      if (withReboot) {
        const delay = (Number(req.rebootDelay?.seconds ?? 0) + (req.rebootDelay?.nanos ?? 0) / 1e9) * 1000;
        const when = await scheduleReboot(deps.systemBusAddress, `Piccolo OS ${version} installed; rebooting into it`, delay);
        rebootScheduled = true;
        report("reboot", 1, `reboot scheduled for ${when.toISOString()}`);
      }
      return pack(
        "piccolo.update.v1.ApplyUpdateResult",
        ApplyUpdateResult.encode({
          version,
          slot: result.slot.name === "A" ? Slot.SLOT_A : Slot.SLOT_B,
          sha256: gotSha,
          signerFingerprint: signer,
          rebootRequired: true,
          rebootScheduled,
          sizeBytes: size,
        }).finish(),
      );
    } finally {
      sig?.abort();
      checkAbort.abort();
    }
  }

  /** Serves the payload on loopback, points update.conf at it, drives update_engine to NEED_REBOOT. */
  async function handOff(
    ctx: WorkerContext,
    report: (phase: string, fraction: number, message: string, extra?: { bytesDone?: number; bytesTotal?: number }) => void,
    o: { version: string; payloadPath: string; size: number; sha1: string; sha256: string },
  ): Promise<{ slot: UsrSlot }> {
    report("handoff", 0, "checking the boot disk and update_engine");
    const before = await slots();
    const target = before.booted?.label === "USR-A" ? before.b : before.booted?.label === "USR-B" ? before.a : undefined;
    if (!target) throw new PiccoloError("failed_precondition", `the kernel command line (${deps.kernelCmdlineFile}) names neither USR-A nor USR-B as booted; cannot tell the passive slot`);
    if (o.size > target.bytes * 2) {
      // A compressed payload that large cannot fit; update_engine would fail late.
      ctx.log.warn({ size: o.size, slot: target.bytes }, "payload is large for the passive partition");
    }
    const engine: UpdateEngineClient = connectUpdateEngine(deps.systemBusAddress);
    const events: OmahaEvent[] = [];
    let responder: Awaited<ReturnType<typeof startOmahaResponder>> | undefined;
    try {
      const initial = await engine.getStatus();
      if (initial.currentOperation === EngineOp.NEED_REBOOT) {
        throw new PiccoloError(
          "failed_precondition",
          `update_engine already has an update${initial.newVersion ? ` (${initial.newVersion})` : ""} installed and waits for a reboot (${EngineOp.NEED_REBOOT}); reboot or roll back first`,
        );
      }
      if (initial.currentOperation !== EngineOp.IDLE) {
        throw new PiccoloError("failed_precondition", `update_engine is busy (${initial.currentOperation}); wait until it is idle`);
      }
      let wake: (() => void) | undefined;
      let latest: EngineState = initial;
      let gone = "";
      let changed = Date.now();
      const seen = new Set<string>();
      let signals = 0;
      const onStatus = (s: EngineState): void => {
        signals++;
        if (s.currentOperation !== latest.currentOperation || s.progress !== latest.progress) changed = Date.now();
        latest = s;
        seen.add(s.currentOperation);
        const phase = ENGINE_PHASE[s.currentOperation];
        if (phase === "downloading") {
          report(phase, s.progress, `update_engine downloading ${o.version} into ${target.label}`, { bytesDone: Math.round(s.progress * o.size), bytesTotal: o.size });
        } else if (phase) report(phase, phase === "checking" ? 0.5 : 0.5, `update_engine: ${s.currentOperation}`);
        wake?.();
      };
      await engine.watch(onStatus, (why) => {
        gone = why;
        wake?.();
      });
      responder = await startOmahaResponder({ version: o.version, payloadPath: o.payloadPath, size: o.size, sha1Base64: o.sha1, sha256Base64: o.sha256 }, (e) => {
        events.push(e);
        wake?.();
      });
      await conf.pointAt(responder.url);
      report("handoff", 1, `SERVER=${responder.url} in ${deps.updateConfFile}; calling AttemptUpdate`);
      ctx.signal.throwIfAborted();
      await engine.attemptUpdate();
      const errorReason = (): string => {
        const ev = events.find((e) => e.errorCode !== undefined && e.result === 0);
        return ev ? `${ACTION_CODES[ev.errorCode!] ?? "error"} (code ${ev.errorCode})` : "no reason given";
      };
      // Follow it: signals, and GetStatus every second in case a signal is missed.
      const onAbort = (): void => wake?.();
      ctx.signal.addEventListener("abort", onAbort, { once: true });
      for (;;) {
        if (ctx.signal.aborted) {
          throw new PiccoloError(
            "cancelled",
            `stopped following update_engine at ${latest.currentOperation}; it has no way to be stopped over D-Bus and may still finish the update (see piccoloctl update status, and roll back if needed)`,
          );
        }
        if (gone) throw new PiccoloError("unavailable", `${gone} while it was at ${latest.currentOperation}; the update did not finish and ${target.label} is not marked to boot`, { reason: "HOST_PART_UNAVAILABLE" });
        if (latest.currentOperation === EngineOp.NEED_REBOOT) break;
        if (latest.currentOperation === EngineOp.ERROR_EVENT || (latest.currentOperation === EngineOp.IDLE && seen.size > 0 && [...seen].some((s) => s !== EngineOp.IDLE))) {
          // Give the error event ping a moment to arrive.
          for (let i = 0; i < 20 && !events.some((e) => e.errorCode !== undefined); i++) await new Promise((r) => setTimeout(r, 100));
          throw new PiccoloError("failed_precondition", `update_engine failed the update: ${errorReason()}`);
        }
        if (Date.now() - changed > deps.engineStallMs) {
          throw new PiccoloError("unavailable", `update_engine made no progress for ${deps.engineStallMs / 1000} s (at ${latest.currentOperation}, ${responder.checks} update check(s) seen)`, { reason: "HOST_PART_UNAVAILABLE" });
        }
        await new Promise<void>((resolve) => {
          const t = setTimeout(resolve, 1000);
          wake = () => {
            clearTimeout(t);
            resolve();
          };
        });
        wake = undefined;
        if (!gone && latest.currentOperation !== EngineOp.NEED_REBOOT) {
          try {
            const before = signals;
            const polled = await engine.getStatus();
            // A signal that came in while the call was out is newer than its answer.
            if (signals === before && polled.currentOperation !== latest.currentOperation) onStatus(polled);
          } catch (e) {
            if (e instanceof PiccoloError && e.kind === "unavailable") gone = "update_engine (com.coreos.update1) stopped answering";
          }
        }
      }
      for (const p of ["verifying", "finalizing"]) if (!seen.has(p === "verifying" ? EngineOp.VERIFYING : EngineOp.FINALIZING)) report(p, 1, `update_engine: ${p}`);
      const after = await slots();
      const now = after.a.label === target.label ? after.a : after.b;
      if (after.next?.label !== target.label) {
        throw new PiccoloError("failed_precondition", `update_engine reports UPDATED_NEED_REBOOT but ${target.label} would not boot next (priority ${now.priority}, tries ${now.tries}, successful ${now.successful ? 1 : 0})`);
      }
      return { slot: now };
    } finally {
      engine.close();
      await responder?.close();
      const restored = await restoreConf();
      if (restored) ctx.log.info({ file: deps.updateConfFile }, restored);
    }
  }

  const rollbackKind: OperationKind<RollbackUpdateRequest> = {
    kind: ROLLBACK_KIND,
    requestType: "piccolo.update.v1.RollbackUpdateRequest",
    encodeRequest: (r) => RollbackUpdateRequest.encode(r).finish(),
    exclusive: true,
    single: true,
    cancellable: false,
    async run(req, ctx) {
      ctx.progress({ phase: "inspect", phaseIndex: 1, phaseCount: req.reboot ? 3 : 2, percent: 10, message: "reading the USR slots" });
      const t = await slots();
      const versions = (await loadState()).slotVersions;
      const booted = await bootedVersion();
      const version = (s: UsrSlot): string => (t.booted?.label === s.label ? booted : (versions[s.label] ?? ""));
      const { current, target } = rollbackTarget(t, req.force);
      ctx.progress({ phase: "set_priority", phaseIndex: 2, percent: 50, message: `making ${target.label} the next boot` });
      // What `cgpt prioritize target` does for two slots: target highest, the other just below.
      await setSlotFlags(t.disk, target.number, { priority: 2, ...(target.successful ? {} : { tries: 1 }) });
      await setSlotFlags(t.disk, current.number, { priority: 1 });
      const after = await slots();
      if (after.next?.label !== target.label) throw new PiccoloError("internal", `after cgpt, GRUB would still boot ${after.next?.label ?? "nothing"}`);
      // update_engine would otherwise still report the rolled-back update as waiting for reboot.
      const e = connectUpdateEngine(deps.systemBusAddress);
      try {
        if ((await e.getStatus()).currentOperation === EngineOp.NEED_REBOOT) await e.resetStatus();
      } catch (err) {
        ctx.log.info({ err: (err as Error).message }, "update_engine status not reset");
      } finally {
        e.close();
      }
      let rebootScheduled = false;
      if (req.reboot) {
        await scheduleReboot(deps.systemBusAddress, `rolling back to ${target.label}${version(target) ? ` (${version(target)})` : ""}`, 0);
        rebootScheduled = true;
        ctx.progress({ phase: "reboot", phaseIndex: 3, percent: 100, message: "reboot requested" });
      }
      const a2 = after.a.label === target.label ? after.a : after.b;
      const c2 = after.a.label === current.label ? after.a : after.b;
      ctx.progress({ phase: "set_priority", percent: 100, message: `${target.label} boots next` });
      return pack(
        "piccolo.update.v1.RollbackUpdateResult",
        RollbackUpdateResult.encode({ nextBoot: slotStatus(a2, after, version(a2)), previous: slotStatus(c2, after, version(c2)), rebootScheduled }).finish(),
      );
    },
  };

  return {
    async init() {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      stored = await readJson<StoredConfig>(configFile, {});
      defaultKeys = await readKeyFiles(deps.signingKeyFiles, (msg, err) => log.warn({ err }, msg));
      log.info({ keys: defaultKeys.map((k) => k.fingerprint), files: deps.signingKeyFiles }, "Piccolo signing keys loaded");
      const restored = await restoreConf();
      if (restored) log.warn({ file: deps.updateConfFile }, restored);
    },

    async status() {
      const t = await slots();
      const versions = (await loadState()).slotVersions;
      const booted = await bootedVersion();
      const st = await loadState();
      const eng = await engineStatus();
      const version = (s: UsrSlot): string => (t.booted?.label === s.label ? booted : (versions[s.label] ?? ""));
      const rebootPending = eng.state?.currentOperation === EngineOp.NEED_REBOOT || (t.next !== undefined && t.booted !== undefined && t.next.label !== t.booted.label);
      return {
        bootedVersion: booted,
        bootedSlot: t.booted ? (t.booted.name === "A" ? Slot.SLOT_A : Slot.SLOT_B) : Slot.SLOT_UNSPECIFIED,
        slots: [slotStatus(t.a, t, version(t.a)), slotStatus(t.b, t, version(t.b))],
        engine: eng.state
          ? {
              lastCheckedTime: eng.state.lastCheckedTime > 0 ? new Date(eng.state.lastCheckedTime * 1000) : undefined,
              progress: eng.state.progress,
              currentOperation: eng.state.currentOperation,
              newVersion: eng.state.newVersion,
              newSize: eng.state.newSize,
              reachable: true,
              error: "",
            }
          : { lastCheckedTime: undefined, progress: 0, currentOperation: "", newVersion: "", newSize: 0, reachable: false, error: eng.error ?? "" },
        rebootPending,
        config: configNow(),
        lastCheckTime: st.lastCheck ? new Date(st.lastCheck.time) : undefined,
        lastCheck: st.lastCheck ? checkResponse(st.lastCheck.response, new Date(st.lastCheck.time)) : undefined,
      };
    },

    async check(channel) {
      const ch = channel || configNow().channel;
      const m = await manifestOf(ch, undefined);
      const time = new Date();
      const current = await bootedVersion();
      const response = { ...m.raw, channel: ch, current_version: current, update_available: m.updateAvailable ?? m.version !== current };
      const st = await loadState();
      st.lastCheck = { time: time.toISOString(), response: response as unknown as Record<string, unknown> };
      await saveState(st);
      return checkResponse(st.lastCheck.response, time);
    },

    async setConfig(req) {
      const next: StoredConfig = { ...stored };
      if (req.channel !== undefined) {
        if (!CHANNEL_RE.test(req.channel)) throw invalidArgument("channel", 'letters, digits, ".", "_" and "-", 1 to 64 characters');
        next.channel = req.channel;
      }
      if (req.server !== undefined) {
        const p = serverProblem(req.server);
        if (p) throw invalidArgument("server", p);
        next.server = req.server;
      }
      if (req.signingKeys !== undefined) {
        if (req.signingKeys.armoredKeys.length === 0) throw invalidArgument("signing_keys.armored_keys", "at least one key is needed");
        if (req.signingKeys.armoredKeys.length > 16) throw invalidArgument("signing_keys.armored_keys", "at most 16 keys");
        req.signingKeys.armoredKeys.forEach((k, i) => {
          if (k.length > 64 * 1024) throw invalidArgument(`signing_keys.armored_keys[${i}]`, "is larger than 64 KiB");
          try {
            parsePublicKey(k);
          } catch (e) {
            throw invalidArgument(`signing_keys.armored_keys[${i}]`, (e as Error).message);
          }
        });
        next.signingKeys = [...req.signingKeys.armoredKeys];
      }
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await writeFileAtomic(configFile, JSON.stringify(next, null, 2) + "\n");
      stored = next;
      return configNow();
    },

    reboot(reason, delayMs) {
      return scheduleReboot(deps.systemBusAddress, reason, delayMs);
    },

    async prepareApply(req) {
      if (req.version === undefined && req.local === undefined) throw invalidArgument("source", 'give a version (or "latest") or a local payload');
      if (req.version !== undefined && req.version !== "latest" && !VERSION_RE.test(req.version)) {
        throw invalidArgument("version", 'letters, digits, ".", "+", "_" and "-", up to 64 characters, or "latest"');
      }
      const delay = Number(req.rebootDelay?.seconds ?? 0) + (req.rebootDelay?.nanos ?? 0) / 1e9;
      if (req.rebootDelay && (delay < 0 || delay > 3600)) throw invalidArgument("reboot_delay", "must be from 0 to 1 hour");
      if (req.rebootDelay && !req.reboot) throw invalidArgument("reboot_delay", "only with reboot");
      if (req.local) {
        const l = req.local;
        for (const [field, path] of [["local.payload_path", l.payloadPath], ["local.signature_path", l.signaturePath]] as const) {
          if (!path || !isAbsolute(path)) throw invalidArgument(field, "must be an absolute path");
          let s;
          try {
            s = await stat(path);
          } catch (e) {
            throw invalidArgument(field, `${path} cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
          }
          if (!s.isFile()) throw invalidArgument(field, `${path} is not a regular file`);
          if (field === "local.payload_path" && s.size === 0) throw invalidArgument(field, `${path} is empty`);
        }
        if (!VERSION_RE.test(l.version)) throw invalidArgument("local.version", 'is required: letters, digits, ".", "+", "_" and "-", up to 64 characters');
        if (l.sha256 !== "" && !/^[0-9a-fA-F]{64}$/.test(l.sha256)) throw invalidArgument("local.sha256", "must be 64 hex digits or empty");
      }
      let keys: PublicKey[];
      try {
        keys = keysNow();
      } catch (e) {
        throw new PiccoloError("failed_precondition", `a configured signing key is unusable: ${(e as Error).message}`);
      }
      if (keys.length === 0) {
        throw new PiccoloError("failed_precondition", "no Piccolo signing keys are configured, so no payload can be verified; set them with SetUpdateConfig (signing_keys) or the config key signingKeyFiles");
      }
      return req;
    },

    async prepareRollback(req) {
      rollbackTarget(await slots(), req.force);
      return req;
    },

    applyKind,
    rollbackKind,
    verifier,
    releaseSource,
  };
}

/** The slot that boots next now and the other one, which a rollback makes the next boot. */
function rollbackTarget(t: SlotTable, force: boolean): { current: UsrSlot; target: UsrSlot } {
  const current = t.next ?? t.booted ?? t.a;
  const target = current.label === "USR-A" ? t.b : t.a;
  if (!target.successful && !force) {
    throw new PiccoloError(
      "failed_precondition",
      `${target.label} has never booted successfully (priority ${target.priority}, tries ${target.tries}, successful 0); roll back to it only with force`,
    );
  }
  return { current, target };
}

function checkResponse(r: Record<string, unknown>, time: Date): CheckForUpdateResponse {
  return {
    updateAvailable: r["update_available"] === true,
    version: String(r["version"] ?? ""),
    sizeBytes: Number(r["size"] ?? 0),
    notes: String(r["notes"] ?? ""),
    channel: String(r["channel"] ?? ""),
    currentVersion: String(r["current_version"] ?? ""),
    checkTime: time,
    sha256: String(r["sha256"] ?? ""),
  };
}
