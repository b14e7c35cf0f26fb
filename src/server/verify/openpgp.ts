/**
 * Detached OpenPGP signature checks with gpgv against a fixed set of trusted keyrings: the
 * Piccolo build signs its images and update payloads with GPG (flatcar/build.sh), and both the
 * installer and the updater check those signatures here. gpgv runs with an empty home folder, so
 * only the configured keyrings count, never a user's trustedkeys.
 */
import { spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PiccoloError, unavailable } from "../errors.js";

/** A good signature. */
export interface VerifiedSignature {
  /** Fingerprint of the key that made it (primary key when gpgv says). */
  readonly fingerprint: string;
  /** Signature creation time, seconds since the epoch (0 when unknown). */
  readonly created: number;
}

/** Checks detached signatures. */
export interface SignatureVerifier {
  /**
   * Checks `signature` (armored or binary detached OpenPGP signature) over the file at
   * `dataPath`. Throws PiccoloError: invalid_argument (field `field`) for a bad or unknown-key
   * signature, failed_precondition when no keyring is configured, unavailable when gpgv is missing.
   */
  verifyDetached(dataPath: string, signature: string | Uint8Array, field: string, signal?: AbortSignal): Promise<VerifiedSignature>;
}

/** Options of createOpenPgpVerifier. */
export interface OpenPgpVerifierOptions {
  /** Keyrings (gpg --export output, binary or armored) holding the trusted keys. */
  readonly keyrings: readonly string[];
  /** The gpgv binary. */
  readonly gpgv?: string;
}

/** Reads gpgv's --status-fd lines. */
export function parseGpgStatus(text: string): { good: boolean; fingerprint: string; created: number; problem: string } {
  let good = false;
  let fingerprint = "";
  let created = 0;
  let problem = "";
  for (const line of text.split("\n")) {
    const f = line.replace(/^\[GNUPG:\] /, "").split(" ");
    switch (f[0]) {
      case "VALIDSIG":
        good = true;
        fingerprint = f[10] ?? f[1] ?? "";
        created = Number(f[3] ?? 0) || 0;
        break;
      case "BADSIG":
        problem ||= `bad signature (key ${f[1] ?? "?"}): the file is not what was signed`;
        break;
      case "ERRSIG":
        problem ||= f[6] === "9" ? `signed by an untrusted or unknown key (${f[1] ?? "?"})` : `signature cannot be checked (code ${f[6] ?? "?"})`;
        break;
      case "NODATA":
        problem ||= "not an OpenPGP signature";
        break;
      case "EXPKEYSIG":
      case "REVKEYSIG":
        problem ||= `signed by an ${f[0] === "EXPKEYSIG" ? "expired" : "revoked"} key (${f[1] ?? "?"})`;
        break;
      default:
    }
  }
  return { good: good && problem === "", fingerprint, created, problem };
}

/** Creates a gpgv-backed verifier. */
export function createOpenPgpVerifier(options: OpenPgpVerifierOptions): SignatureVerifier {
  const bin = options.gpgv ?? "gpgv";
  return {
    async verifyDetached(dataPath, signature, field, signal) {
      if (options.keyrings.length === 0) {
        throw new PiccoloError("failed_precondition", "no trusted signing keys are configured (config key installerKeyrings), so no signature can be checked", {
          reason: "NO_TRUSTED_KEYS",
        });
      }
      const home = await mkdtemp(join(tmpdir(), "piccolo-gpgv-"));
      try {
        const sigPath = join(home, "detached.sig");
        await writeFile(sigPath, signature, { mode: 0o600 });
        const args = ["--homedir", home, "--status-fd", "1", ...options.keyrings.flatMap((k) => ["--keyring", k]), sigPath, dataPath];
        const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
          const child = spawn(bin, args, { stdio: ["ignore", "pipe", "pipe"], signal });
          let out = "";
          let err = "";
          child.stdout.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-65536)));
          child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-65536)));
          child.on("error", (e: NodeJS.ErrnoException) => reject(e.code === "ENOENT" ? unavailable(`gpgv (${bin})`, e) : e));
          child.on("close", (c) => resolve({ code: c, stdout: out, stderr: err }));
        });
        const s = parseGpgStatus(stdout);
        if (code === 0 && s.good) return { fingerprint: s.fingerprint, created: s.created };
        const why = s.problem || stderr.trim().split("\n").pop() || `gpgv exited with ${code}`;
        throw new PiccoloError("invalid_argument", `${field}: ${why}`, { field, reason: "BAD_SIGNATURE" });
      } finally {
        await rm(home, { recursive: true, force: true });
      }
    },
  };
}
