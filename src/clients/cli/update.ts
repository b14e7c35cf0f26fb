/**
 * piccoloctl's `update …` commands: status (the A/B slots with their GPT flags, update_engine and
 * the configuration), check, apply (a server version or a local payload, followed with live
 * progress), rollback, reboot and config.
 */
import { readFile } from "node:fs/promises";
import { resolve } from "node:path";
import {
  ApplyUpdateRequest,
  CheckForUpdateResponse,
  GetUpdateStatusResponse,
  RebootResponse,
  RollbackUpdateRequest,
  SetUpdateConfigRequest,
  Slot,
  UpdateConfig,
  type SlotStatus,
} from "../../../gen/piccolo/update/v1/update.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatTime, jsonDocument, table } from "./format.js";
import { formatBytes } from "./progress.js";

const T = "piccolo.update.v1.";

const slotName = (s: Slot): string => (s === Slot.SLOT_A ? "USR-A" : s === Slot.SLOT_B ? "USR-B" : "unknown");

/** The slots as a table: label, partition, GPT flags, version and what the slot is now. */
export function formatSlots(slots: readonly SlotStatus[]): string {
  return table([
    ["SLOT", "PART", "PRIORITY", "TRIES", "SUCCESSFUL", "VERSION", "STATE"],
    ...slots.map((s) => [
      s.label,
      String(s.partitionNumber),
      String(s.priority),
      String(s.tries),
      s.successful ? "1" : "0",
      s.version || "-",
      [s.booted ? "booted" : "", s.nextBoot ? "next boot" : ""].filter(Boolean).join(", ") || "-",
    ]),
  ]);
}

/** GetUpdateStatus as text. */
export function formatUpdateStatus(s: GetUpdateStatusResponse): string {
  const e = s.engine;
  const engine = e?.reachable
    ? `${e.currentOperation}${e.newVersion ? ` (${e.newVersion})` : ""}${e.currentOperation === "UPDATE_STATUS_DOWNLOADING" ? ` ${(e.progress * 100).toFixed(0)}%` : ""}`
    : `unreachable: ${e?.error ?? "unknown"}`;
  const lines = [
    ["booted", `${s.bootedVersion || "unknown"} from ${slotName(s.bootedSlot)}`],
    ["update_engine", engine],
    ["reboot", s.rebootPending ? "pending: the next boot starts another slot" : "not pending"],
    ["channel", s.config?.channel ?? ""],
    ["server", s.config?.server ?? ""],
    ["signing keys", s.config?.signingKeyFingerprints.join(", ") || "none configured"],
    [
      "last check",
      s.lastCheck ? `${formatTime(s.lastCheckTime)}: ${s.lastCheck.updateAvailable ? `${s.lastCheck.version} available` : "up to date"}` : "never",
    ],
  ];
  return table(lines.map(([k, v]) => [`${k}:`, v!])) + "\n" + formatSlots(s.slots);
}

/** `update status`. */
export async function updateStatusCommand(c: CommandContext): Promise<number> {
  const s = await c.api.update.getUpdateStatus({});
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}GetUpdateStatusResponse`, GetUpdateStatusResponse, s) : formatUpdateStatus(s));
  return 0;
}

/** `update check [--channel C]`; exit code 0 either way. */
export async function updateCheckCommand(c: CommandContext, opts: { readonly channel?: string }): Promise<number> {
  const r = await c.api.update.checkForUpdate({ channel: opts.channel ?? "" });
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}CheckForUpdateResponse`, CheckForUpdateResponse, r));
  else if (r.updateAvailable) {
    c.stdout.write(`update available on ${r.channel}: ${r.version} (${formatBytes(r.sizeBytes)}; running ${r.currentVersion})\n${r.notes ? `${r.notes}\n` : ""}apply it with: piccoloctl update apply ${r.version}\n`);
  } else c.stdout.write(`up to date: ${r.currentVersion} is the newest on ${r.channel}\n`);
  return 0;
}

/** Options of `update apply`. */
export interface ApplyOptions {
  readonly payload?: string;
  readonly signature?: string;
  readonly sha256?: string;
  readonly reboot?: boolean;
  readonly rebootDelay?: number;
  readonly detach?: boolean;
}

/** `update apply [VERSION] | --payload FILE --signature FILE VERSION`: ApplyUpdate, followed to the end. */
export function updateApplyCommand(c: CommandContext, version: string | undefined, opts: ApplyOptions): Promise<number> {
  const req = ApplyUpdateRequest.fromPartial({ reboot: opts.reboot === true });
  if (opts.rebootDelay !== undefined) {
    if (!opts.reboot) throw new UsageError("--reboot-delay needs --reboot");
    req.rebootDelay = { seconds: opts.rebootDelay, nanos: 0 };
  }
  if (opts.payload !== undefined || opts.signature !== undefined) {
    if (!opts.payload || !opts.signature) throw new UsageError("a local payload needs both --payload and --signature");
    if (!version) throw new UsageError("give the version the local payload installs: piccoloctl update apply --payload F --signature S VERSION");
    req.local = { payloadPath: resolve(opts.payload), signaturePath: resolve(opts.signature), version, sha256: opts.sha256 ?? "" };
  } else {
    if (opts.sha256 !== undefined) throw new UsageError("--sha256 is for local payloads; the server's manifest gives it otherwise");
    req.version = version ?? "latest";
  }
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.update.applyUpdate(req, s), detach: opts.detach === true });
}

/** `update rollback [--force] [--reboot]`. */
export function updateRollbackCommand(c: CommandContext, opts: { readonly force?: boolean; readonly reboot?: boolean; readonly detach?: boolean }): Promise<number> {
  const req = RollbackUpdateRequest.fromPartial({ force: opts.force === true, reboot: opts.reboot === true });
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.update.rollbackUpdate(req, s), detach: opts.detach === true });
}

/** `update reboot REASON [--delay S]`. */
export async function updateRebootCommand(c: CommandContext, reason: string, opts: { readonly delay?: number }): Promise<number> {
  const r = await c.api.update.reboot({ reason, delay: opts.delay ? { seconds: opts.delay, nanos: 0 } : undefined });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}RebootResponse`, RebootResponse, r) : `reboot scheduled for ${formatTime(r.scheduledTime)}\n`);
  return 0;
}

/** `update config [--channel C] [--server URL] [--signing-key FILE …]`: SetUpdateConfig. */
export async function updateConfigCommand(c: CommandContext, opts: { readonly channel?: string; readonly server?: string; readonly signingKey?: string[] }): Promise<number> {
  const req = SetUpdateConfigRequest.fromPartial({ channel: opts.channel, server: opts.server });
  if (opts.signingKey && opts.signingKey.length > 0) {
    const keys: string[] = [];
    for (const f of opts.signingKey) {
      try {
        keys.push(await readFile(f, "utf8"));
      } catch (e) {
        throw new UsageError(`--signing-key ${JSON.stringify(f)}: ${(e as Error).message}`);
      }
    }
    req.signingKeys = { armoredKeys: keys };
  }
  const r = await c.api.update.setUpdateConfig(req);
  c.stdout.write(
    c.global.output === "json"
      ? jsonDocument(`${T}UpdateConfig`, UpdateConfig, r)
      : table([
          ["channel:", r.channel],
          ["server:", r.server],
          ["signing keys:", r.signingKeyFingerprints.join(", ") || "none"],
        ]),
  );
  return 0;
}
