/**
 * One user of the TPM at a time within piccolod, and clean-up after each on a raw TCTI.
 *
 * The kernel's resource manager (/dev/tpmrm0) lets several clients share the TPM and flushes what a
 * finished client left loaded. A TCTI that talks to the TPM directly (swtpm, mssim) does neither:
 * two tools at once see each other's sessions vanish, and leftovers soon exhaust the TPM's slots.
 * Every TPM use in piccolod (systemd-creds, systemd-cryptenroll, tpm2-tools) goes through withTpm().
 */
import { spawn } from "node:child_process";

/**
 * A TCTI that talks to a TPM without a resource manager (swtpm, mssim) keeps the sessions and
 * transient objects a finished client left behind, and the TPM soon runs out of slots; the kernel's
 * /dev/tpmrm0 flushes them itself. After each use of such a TPM, flush what is left.
 */
export async function flushTpmContexts(tpm2Device: string): Promise<void> {
  if (tpm2Device === "auto" || tpm2Device.startsWith("/") || tpm2Device.startsWith("device:")) return;
  for (const what of ["--transient-object", "--loaded-session", "--saved-session"]) {
    await new Promise<void>((resolve) => {
      const child = spawn("tpm2_flushcontext", [`--tcti=${tpm2Device}`, what], { stdio: "ignore" });
      child.on("error", () => resolve());
      child.on("close", () => resolve());
    });
  }
}


let chain: Promise<unknown> = Promise.resolve();

/** Runs `work` with the TPM to itself (within this process), then flushes leftovers on a raw TCTI. */
export function withTpm<T>(tpm2Device: string, work: () => Promise<T>): Promise<T> {
  const next = chain.then(async () => {
    try {
      return await work();
    } finally {
      await flushTpmContexts(tpm2Device);
    }
  });
  chain = next.catch(() => undefined);
  return next;
}
