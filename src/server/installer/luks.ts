/**
 * TPM2-sealed LUKS2 for the data partition. The header is made on a sparse scratch file as large
 * as the partition (cryptsetup and systemd-cryptenroll work on files; no device-mapper needed),
 * then its header area is copied onto the partition. The recovery key is the first keyslot's
 * passphrase; it goes to the tools on stdin or in their environment, never in an argument or a file.
 */
import { randomBytes } from "node:crypto";
import { flushTpmContexts } from "../trust/credentials.js";
import { run } from "./exec.js";

/** The LUKS2 volume made on scratch. */
export interface LuksVolume {
  readonly uuid: string;
  /** Bytes from the partition start that hold the header (the data segment's offset). */
  readonly headerBytes: number;
}

const MODHEX = "cbdefghijklnrtuv";

/**
 * A recovery key in systemd's format: 256 random bits as 64 "modhex" characters in eight groups
 * (keyboard-layout independent, as systemd-cryptenroll --recovery-key makes them).
 */
export function newRecoveryKey(): string {
  const b = randomBytes(32);
  let s = "";
  for (const x of b) s += MODHEX[x >> 4]! + MODHEX[x & 15]!;
  return s.match(/.{8}/g)!.join("-");
}

/** Tools the LUKS step runs. */
export interface LuksTools {
  readonly cryptsetup: string;
  readonly cryptenroll: string;
}

/**
 * Formats `scratch` as LUKS2 with `recoveryKey` in keyslot 0, enrolls the TPM (`tpm2Device`, PCR 7)
 * with systemd-cryptenroll, and returns the UUID and header size.
 */
export async function makeTpm2Luks(
  tools: LuksTools,
  scratch: string,
  recoveryKey: string,
  tpm2Device: string,
  label: string,
  signal: AbortSignal,
): Promise<LuksVolume> {
  await run(
    tools.cryptsetup,
    ["luksFormat", "--type", "luks2", "--batch-mode", "--label", label, "--key-file", "-", scratch],
    { input: recoveryKey, signal },
  );
  try {
    await run(tools.cryptenroll, [`--tpm2-device=${tpm2Device}`, "--tpm2-pcrs=7", scratch], { env: { PASSWORD: recoveryKey }, signal });
  } finally {
    await flushTpmContexts(tpm2Device);
  }
  const uuid = (await run(tools.cryptsetup, ["luksUUID", scratch], { signal })).stdout.trim();
  const dump = (await run(tools.cryptsetup, ["luksDump", scratch], { signal })).stdout;
  const m = /Data segments:[\s\S]*?offset:\s*(\d+)\s*\[bytes\]/.exec(dump);
  if (!m || !/systemd-tpm2/.test(dump)) throw new Error("the LUKS2 header has no systemd-tpm2 token or data segment after enrolling");
  return { uuid, headerBytes: Number(m[1]) };
}
