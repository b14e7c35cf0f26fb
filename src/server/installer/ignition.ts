/**
 * The Ignition config written into the OEM partition: the caller's own, or one generated from a
 * host name and SSH keys; with TPM2 encryption, wrapped in a config that adds the filesystem on the
 * unlocked ROOT and the crypttab line, merging the caller's config. Also the OEM grub.cfg line
 * that makes the initrd unlock ROOT with the TPM.
 */
import { invalidArgument } from "../errors.js";

/** Ignition spec version of the configs piccolod writes. */
export const IGNITION_VERSION = "3.3.0";
/** The device-mapper name of the unlocked ROOT. */
export const LUKS_NAME = "rootencrypted";

/** Checks a caller's Ignition config: a JSON object with ignition.version 3.x. */
export function checkIgnition(text: string, field: string): Record<string, unknown> {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw invalidArgument(field, `not JSON (${(e as Error).message})`);
  }
  const version = (doc as { ignition?: { version?: unknown } } | null)?.ignition?.version;
  if (typeof doc !== "object" || doc === null || Array.isArray(doc) || typeof version !== "string") {
    throw invalidArgument(field, 'not an Ignition config: expected an object with "ignition": {"version": "3.x.y"}');
  }
  if (!/^3\.\d+\.\d+/.test(version)) throw invalidArgument(field, `Ignition spec ${version} is not supported; use 3.x (Flatcar reads 3.0 to 3.4)`);
  return doc as Record<string, unknown>;
}

/** Checks generation settings; returns undefined when there is nothing to generate. */
export function generateIgnition(hostname: string, sshKeys: readonly string[]): string | undefined {
  if (hostname === "" && sshKeys.length === 0) return undefined;
  if (hostname !== "" && !/^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$/i.test(hostname)) {
    throw invalidArgument("spec.ignition_settings.hostname", "must be 1 to 63 letters, digits and inner hyphens");
  }
  sshKeys.forEach((k, i) => {
    if (!/^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-(ssh-ed25519|ecdsa-sha2-nistp256)@openssh\.com) [A-Za-z0-9+/=]+( [^\n]*)?$/.test(k.trim())) {
      throw invalidArgument(`spec.ignition_settings.ssh_authorized_keys[${i}]`, "not an SSH public key line");
    }
  });
  const doc: Record<string, unknown> = { ignition: { version: IGNITION_VERSION } };
  if (sshKeys.length > 0) doc["passwd"] = { users: [{ name: "core", sshAuthorizedKeys: sshKeys.map((k) => k.trim()) }] };
  if (hostname) {
    doc["storage"] = { files: [{ path: "/etc/hostname", mode: 0o644, overwrite: true, contents: { source: `data:,${hostname}` } }] };
  }
  return JSON.stringify(doc);
}

/**
 * With TPM2 encryption: a config that creates the ext4 filesystem labelled ROOT on the unlocked
 * volume at first boot, writes the crypttab line that unlocks it with the TPM, and merges `inner`
 * (the caller's or the generated config) when there is one.
 */
export function encryptedIgnition(luksUuid: string, inner: string | undefined): string {
  const crypttab = `${LUKS_NAME} UUID=${luksUuid} none tpm2-device=auto,discard\n`;
  const doc: Record<string, unknown> = {
    ignition: {
      version: IGNITION_VERSION,
      ...(inner ? { config: { merge: [{ source: `data:;base64,${Buffer.from(inner).toString("base64")}` }] } } : {}),
    },
    storage: {
      filesystems: [{ device: `/dev/mapper/${LUKS_NAME}`, format: "ext4", label: "ROOT", wipeFilesystem: true }],
      files: [{ path: "/etc/crypttab", mode: 0o600, overwrite: true, contents: { source: `data:,${encodeURIComponent(crypttab)}` } }],
    },
  };
  return JSON.stringify(doc);
}

/** The OEM grub.cfg that has the initrd unlock ROOT with the TPM before Ignition and the root mount. */
export function encryptedGrubCfg(luksUuid: string): string {
  return (
    "# Written by the Piccolo installer: ROOT is a LUKS2 volume unlocked by the TPM (PCR 7).\n" +
    `set linux_append="$linux_append rd.luks.name=${luksUuid}=${LUKS_NAME} rd.luks.options=${luksUuid}=tpm2-device=auto"\n`
  );
}
