/**
 * LUKS2 encryption: the header of a device as `cryptsetup luksDump --dump-json-metadata` has it
 * (keyslots, tokens, the TPM2 token's PCRs), and resealing the TPM2 slot to the PCR values the
 * TPM has now with `systemd-cryptenroll`, after proving the caller's key unlocks the device.
 */
import { stat } from "node:fs/promises";
import { isAbsolute } from "node:path";
import type { EncryptedDevice, Keyslot, Token } from "../../../gen/piccolo/storage/v1/storage.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";
import { flushTpmContexts } from "../trust/credentials.js";
import { runTool } from "./run.js";

const CRYPTSETUP_HINT = "install cryptsetup (cryptsetup-bin)";

interface LuksJson {
  keyslots?: Record<string, { type?: string; priority?: number; kdf?: { type?: string } }>;
  tokens?: Record<
    string,
    { type?: string; keyslots?: string[]; "tpm2-pcrs"?: number[]; "tpm2-pcr-bank"?: string; "tpm2-pin"?: boolean; "tpm2-policy-hash"?: string }
  >;
  segments?: Record<string, { encryption?: string }>;
}

const PRIORITY = ["ignore", "normal", "prefer"];

/** Checks a device path from a request: absolute, and a block device or a regular (image) file. */
export async function checkDevicePath(path: string, field: string): Promise<string> {
  if (path === "") throw invalidArgument(field, "is required");
  if (!isAbsolute(path) || path.includes("\0") || path.split("/").includes("..")) {
    throw invalidArgument(field, `${JSON.stringify(path.slice(0, 200))} must be an absolute path without ".."`);
  }
  let s;
  try {
    s = await stat(path);
  } catch {
    throw notFound("device", path);
  }
  if (!s.isBlockDevice() && !s.isFile()) throw invalidArgument(field, `${path} is neither a block device nor an image file`);
  return path;
}

/** Turns luksDump's JSON metadata and plain header into an EncryptedDevice. */
export function encryptedDeviceFrom(path: string, json: LuksJson, header: string): EncryptedDevice {
  const keyslots: Keyslot[] = Object.entries(json.keyslots ?? {})
    .map(([id, k]) => ({ id: Number(id), type: k.type ?? "", kdf: k.kdf?.type ?? "", priority: PRIORITY[k.priority ?? 1] ?? "normal" }))
    .sort((a, b) => a.id - b.id);
  const tokens: Token[] = Object.entries(json.tokens ?? {})
    .map(([id, t]) => ({
      id: Number(id),
      type: t.type ?? "",
      keyslots: (t.keyslots ?? []).map(Number).sort((a, b) => a - b),
      tpm2Pcrs: t["tpm2-pcrs"] ?? [],
      tpm2PcrBank: t["tpm2-pcr-bank"] ?? "",
      tpm2Pin: t["tpm2-pin"] === true,
      tpm2PolicyHash: t["tpm2-policy-hash"] ?? "",
    }))
    .sort((a, b) => a.id - b.id);
  const field = (name: string): string => new RegExp(`^${name}:\\s*(.*)$`, "m").exec(header)?.[1]?.trim() ?? "";
  return {
    path,
    uuid: field("UUID"),
    version: Number(field("Version")) || 0,
    cipher: Object.values(json.segments ?? {})[0]?.encryption ?? "",
    keyslots,
    tokens,
    tpm2Enrolled: tokens.some((t) => t.type === "systemd-tpm2"),
    recoveryKeyPresent: tokens.some((t) => t.type === "systemd-recovery"),
  };
}

/** Reads the LUKS header of one device; FAILED_PRECONDITION when it is not LUKS. */
export async function encryptionStatus(path: string, signal?: AbortSignal): Promise<EncryptedDevice> {
  const plain = await runTool("cryptsetup", ["luksDump", path], { signal }, CRYPTSETUP_HINT);
  if (plain.code !== 0) {
    throw new PiccoloError("failed_precondition", `${path} is not a LUKS device: ${plain.stderr.trim() || `cryptsetup exit ${plain.code}`}`, {
      reason: "NOT_LUKS",
    });
  }
  const version = /^Version:\s*(\d+)/m.exec(plain.stdout)?.[1];
  if (version !== "2") return encryptedDeviceFrom(path, {}, plain.stdout);
  const json = await runTool("cryptsetup", ["luksDump", "--dump-json-metadata", path], { signal }, CRYPTSETUP_HINT);
  if (json.code !== 0) throw new PiccoloError("internal", `cryptsetup luksDump --dump-json-metadata ${path} failed: ${json.stderr.trim()}`);
  return encryptedDeviceFrom(path, JSON.parse(json.stdout) as LuksJson, plain.stdout);
}

/** Proves `key` unlocks a keyslot of the device (`cryptsetup open --test-passphrase`); INVALID_ARGUMENT on `key` otherwise. */
export async function checkKey(device: string, key: Buffer, signal?: AbortSignal): Promise<void> {
  const test = await runTool("cryptsetup", ["open", "--test-passphrase", "--key-file=-", device], { input: key, signal }, CRYPTSETUP_HINT);
  if (test.code !== 0) {
    throw new PiccoloError("invalid_argument", `key: does not unlock ${device}${test.code === 2 ? "" : ` (${test.stderr.trim()})`}`, {
      field: "key",
      reason: "WRONG_KEY",
    });
  }
}

/** Options of reseal. */
export interface ResealOptions {
  readonly device: string;
  /** A passphrase or recovery key that unlocks the device now. */
  readonly key: Buffer;
  readonly pcrs: readonly number[];
  /** systemd's --tpm2-device= value. */
  readonly tpm2Device: string;
  readonly signal?: AbortSignal;
  readonly progress?: (phase: string, percent: number, message: string) => void;
}

/** What a reseal did. */
export interface ResealOutcome {
  readonly device: EncryptedDevice;
  readonly newKeyslot: number;
  readonly wipedKeyslots: number[];
}

/**
 * Re-enrols the TPM2 slot: proves `key` unlocks the device (cryptsetup --test-passphrase), enrols
 * a new systemd-tpm2 slot against `pcrs` with that key, then wipes the TPM2 slots that were there
 * before. When the enrolment fails nothing has changed; when only the wipe fails, the new slot is
 * in place and the error says which old slots are left.
 */
export async function reseal(o: ResealOptions): Promise<ResealOutcome> {
  const before = await encryptionStatus(o.device, o.signal);
  if (before.version !== 2) throw new PiccoloError("failed_precondition", `${o.device} is LUKS${before.version}; TPM2 enrolment needs LUKS2`, { reason: "NOT_LUKS2" });
  o.progress?.("verify-key", 10, "checking the key unlocks the device");
  await checkKey(o.device, o.key, o.signal);
  const oldTpmSlots = before.tokens.filter((t) => t.type === "systemd-tpm2").flatMap((t) => t.keyslots);
  o.progress?.("enrol", 40, `enrolling a TPM2 slot sealed against PCR ${o.pcrs.join("+")}`);
  // systemd-cryptenroll takes the unlocking key from $PASSWORD (it refuses a pipe as key file):
  // the environment of a root child process is readable by root only, and never logged.
  const enrol = await runTool(
    "systemd-cryptenroll",
    [`--tpm2-device=${o.tpm2Device}`, `--tpm2-pcrs=${o.pcrs.join("+")}`, o.device],
    { env: { ...process.env, PASSWORD: o.key.toString("utf8") }, signal: o.signal },
    "install systemd (systemd-cryptenroll)",
  );
  await flushTpmContexts(o.tpm2Device);
  if (enrol.code !== 0) {
    throw new PiccoloError("unavailable", `systemd-cryptenroll could not enrol a TPM2 slot on ${o.device} (nothing changed): ${enrol.stderr.trim()}`, {
      reason: "TPM_ENROL_FAILED",
    });
  }
  const mid = await encryptionStatus(o.device, o.signal);
  const newSlot = mid.tokens.filter((t) => t.type === "systemd-tpm2").flatMap((t) => t.keyslots).find((s) => !oldTpmSlots.includes(s));
  if (newSlot === undefined) throw new PiccoloError("internal", `systemd-cryptenroll reported success but no new TPM2 slot is on ${o.device}`);
  if (oldTpmSlots.length > 0) {
    o.progress?.("wipe", 80, `wiping the old TPM2 slot${oldTpmSlots.length > 1 ? "s" : ""} ${oldTpmSlots.join(", ")}`);
    const wipe = await runTool(
      "systemd-cryptenroll",
      [`--wipe-slot=${oldTpmSlots.join(",")}`, o.device],
      { env: { ...process.env, PASSWORD: o.key.toString("utf8") }, signal: o.signal },
      "install systemd (systemd-cryptenroll)",
    );
    if (wipe.code !== 0) {
      throw new PiccoloError(
        "internal",
        `new TPM2 slot ${newSlot} enrolled on ${o.device}, but wiping the old slots ${oldTpmSlots.join(", ")} failed (they are still there): ${wipe.stderr.trim()}`,
      );
    }
  }
  return { device: await encryptionStatus(o.device, o.signal), newKeyslot: newSlot, wipedKeyslots: oldTpmSlots };
}
