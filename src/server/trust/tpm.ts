/**
 * The TPM through tpm2-tools: status, the endorsement key (EK) and its certificate, a persistent
 * attestation key (AK) made under the EK, and quotes that `tpm2_checkquote` verifies. Every call
 * is serialised (one TPM connection at a time) and, on a raw TCTI such as swtpm, followed by a
 * flush of what the tool left loaded. Nonces travel as arguments (they are public); nothing
 * secret passes through here.
 */
import { spawn } from "node:child_process";
import { createHash, createPublicKey, X509Certificate } from "node:crypto";
import { mkdir, mkdtemp, readFile, rm, stat, writeFile, rename } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PiccoloError, unavailable } from "../errors.js";
import { flushTpmContexts, withTpm } from "./tpm-lock.js";

/** The persistent handle piccolod keeps its attestation key at (owner range 0x81000000-0x817fffff). */
export const AK_HANDLE = "0x81000ae0";
/** Where TPM vendors (and swtpm_setup) keep the RSA EK persistently, when they do. */
const EK_PERSISTENT = "0x81010001";
/** The NV index of the RSA 2048 EK certificate (TCG EK Credential Profile). */
const EK_CERT_NV = "0x1c00002";

/** A PCR bank and its allocated PCRs. */
export interface PcrBankInfo {
  readonly algorithm: string;
  readonly pcrs: number[];
}

/** What GetTpmStatus reports. */
export interface TpmStatusInfo {
  readonly present: boolean;
  readonly device: string;
  readonly detail: string;
  readonly manufacturer: string;
  readonly vendor: string;
  readonly firmwareVersion: string;
  readonly specRevision: string;
  readonly pcrBanks: PcrBankInfo[];
  readonly lockout: {
    inLockout: boolean;
    failedTries: number;
    maxTries: number;
    recoverySeconds: number;
    lockoutRecoverySeconds: number;
  };
}

/** The device's TPM identity. */
export interface TpmIdentity {
  /** Lower-case hex SHA-256 of the EK public key (DER SubjectPublicKeyInfo). */
  readonly deviceId: string;
  readonly ekPublicPem: string;
  /** "" when the TPM has no EK certificate. */
  readonly ekCertificatePem: string;
  readonly akPublicPem: string;
  /** The AK's TPM name, hex. */
  readonly akName: string;
  readonly akHandle: string;
}

/** One quote. */
export interface Quote {
  readonly quote: Buffer;
  readonly signature: Buffer;
  readonly pcrs: Buffer;
  readonly pcrValues: { algorithm: string; index: number; value: Buffer }[];
  /** tpm2-tools form, "sha256:0,1,2". */
  readonly selection: string;
  readonly hashAlgorithm: string;
}

/** The TPM operations the trust area needs. */
export interface Tpm {
  /** The configured device ("auto", a path or a TCTI). */
  readonly device: string;
  status(signal?: AbortSignal): Promise<TpmStatusInfo>;
  /** The identity; creates and persists the AK on first use. */
  identity(signal?: AbortSignal): Promise<TpmIdentity>;
  /** Quotes `nonce` (1-32 bytes) over the selection ("sha256:0,1,2"). */
  quote(nonce: Buffer, selection: string, signal?: AbortSignal): Promise<Quote>;
}

/** Options of createTpm. */
export interface TpmOptions {
  /** "auto", a device path, or a TCTI ("swtpm:host=…,port=…"). */
  readonly tpm2Device: string;
  /** Device nodes "auto" looks for, in order. */
  readonly tpmDevices: readonly string[];
  /** Folder for what identifies the AK across restarts (<stateDir>/trust). */
  readonly stateDir: string;
}

/** A tpm2-tools command failed; `stderr` is its explanation. */
export class TpmToolError extends Error {
  constructor(
    readonly tool: string,
    readonly code: number,
    readonly stderr: string,
  ) {
    super(`${tool} exited with ${code}: ${stderr.split("\n").filter((l) => l.startsWith("ERROR")).join("; ") || stderr.trim().slice(0, 400)}`);
  }
}

/** Runs a tpm2-tools command against `tcti`; resolves to stdout. */
function runTool(tool: string, args: readonly string[], tcti: string, cwd: string, signal?: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn(tool, args, { cwd, env: { ...process.env, TPM2TOOLS_TCTI: tcti }, stdio: ["ignore", "pipe", "pipe"], signal });
    let out = "";
    let err = "";
    child.stdout.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("error", (e) => {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") {
        reject(new PiccoloError("unavailable", `${tool} is not installed (install tpm2-tools)`, { reason: "HOST_PART_UNAVAILABLE" }));
      } else reject(e);
    });
    child.on("close", (code) => (code === 0 ? resolve(out) : reject(new TpmToolError(tool, code ?? -1, err))));
  });
}

const HEX_WORD = /raw:\s*0x([0-9a-fA-F]+)/;

/** Parses `tpm2_getcap properties-fixed|-variable` output into name → block text. */
function capBlocks(text: string): Map<string, string> {
  const out = new Map<string, string>();
  let current = "";
  for (const line of text.split("\n")) {
    const m = /^(TPM2_PT_[A-Z0-9_]+):\s*(.*)$/.exec(line);
    if (m) {
      current = m[1]!;
      out.set(current, m[2] ?? "");
    } else if (current) out.set(current, `${out.get(current)}\n${line}`);
  }
  return out;
}

const rawOf = (block: string | undefined): number => {
  if (!block) return 0;
  const m = HEX_WORD.exec(block) ?? /^\s*0x([0-9a-fA-F]+)/.exec(block);
  return m ? parseInt(m[1]!, 16) : 0;
};
const valueOf = (block: string | undefined): string => /value:\s*"?([^"\n]*)"?/.exec(block ?? "")?.[1]?.trim() ?? "";

/** Parses tpm2_quote's / tpm2_pcrread's YAML PCR listing. */
export function parsePcrListing(text: string): { algorithm: string; index: number; value: Buffer }[] {
  const out: { algorithm: string; index: number; value: Buffer }[] = [];
  let inPcrs = false;
  let bank = "";
  for (const line of text.split("\n")) {
    if (/^pcrs:\s*$/.test(line)) {
      inPcrs = true;
      continue;
    }
    if (!inPcrs) continue;
    if (/^\S/.test(line)) break;
    const b = /^ {2}([a-z0-9_]+):\s*$/.exec(line);
    if (b) {
      bank = b[1]!;
      continue;
    }
    const v = /^\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)\s*$/.exec(line);
    if (v && bank) out.push({ algorithm: bank, index: Number(v[1]), value: Buffer.from(v[2]!, "hex") });
  }
  return out;
}

/** DER of an X.509 certificate read from NV storage, without the padding some TPMs leave after it. */
function trimDer(der: Buffer): Buffer {
  if (der.length < 4 || der[0] !== 0x30) return der;
  const l = der[1]!;
  if (l < 0x80) return der.subarray(0, 2 + l);
  const n = l & 0x7f;
  let len = 0;
  for (let i = 0; i < n; i++) len = len * 256 + der[2 + i]!;
  return der.subarray(0, 2 + n + len);
}

/** Lower-case hex SHA-256 of a public key's DER SubjectPublicKeyInfo. */
export function publicKeyHash(pem: string): string {
  const der = createPublicKey(pem).export({ type: "spki", format: "der" });
  return createHash("sha256").update(der).digest("hex");
}

interface AkRecord {
  akHandle: string;
  akName: string;
}

/** Creates the tpm2-tools adapter. */
export function createTpm(options: TpmOptions): Tpm {
  /** Runs `work` alone on the TPM (shared with every other TPM user in piccolod), then flushes what it left on a raw TCTI. */
  const exclusive = async <T>(work: (tcti: string, dir: string) => Promise<T>): Promise<T> => {
    const tcti = await resolveTcti();
    return withTpm(tcti, async () => {
      const dir = await mkdtemp(join(tmpdir(), "piccolod-tpm-"));
      try {
        return await work(tcti, dir);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });
  };

  /** The TCTI for tpm2-tools, or UNAVAILABLE naming what was looked for. */
  const resolveTcti = async (): Promise<string> => {
    const dev = options.tpm2Device;
    const candidates = dev === "auto" ? options.tpmDevices : dev.startsWith("/") ? [dev] : [];
    if (dev !== "auto" && !dev.startsWith("/")) return dev;
    for (const d of candidates) {
      try {
        if ((await stat(d)).isCharacterDevice()) return `device:${d}`;
      } catch {
        // next
      }
    }
    throw unavailable(`TPM (none of ${candidates.join(", ")} exists)`);
  };

  const toolError = (what: string, e: unknown): PiccoloError => {
    if (e instanceof PiccoloError) return e;
    if (e instanceof TpmToolError) {
      return new PiccoloError("unavailable", `TPM ${options.tpm2Device}: ${what} failed: ${e.message}`, { reason: "HOST_PART_UNAVAILABLE", cause: e });
    }
    if (e instanceof Error && e.name === "AbortError") return new PiccoloError("cancelled", `${what} was cancelled`, { cause: e });
    return new PiccoloError("internal", `${what} failed: ${(e as Error).message}`, { cause: e });
  };

  const recordPath = join(options.stateDir, "ak.json");
  let identityCache: Promise<TpmIdentity> | undefined;

  const readRecord = async (): Promise<AkRecord | undefined> => {
    try {
      const r = JSON.parse(await readFile(recordPath, "utf8")) as Partial<AkRecord>;
      return typeof r.akHandle === "string" && typeof r.akName === "string" ? { akHandle: r.akHandle, akName: r.akName } : undefined;
    } catch {
      return undefined;
    }
  };
  const writeRecord = async (r: AkRecord): Promise<void> => {
    await mkdir(options.stateDir, { recursive: true, mode: 0o700 });
    const tmp = `${recordPath}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(r) + "\n", { mode: 0o600 });
    await rename(tmp, recordPath);
  };

  /** readpublic of a handle: its PEM, name and attributes; undefined when nothing is there. */
  const readPublic = async (tcti: string, dir: string, handle: string, signal?: AbortSignal) => {
    const pem = join(dir, `${handle}.pem`);
    try {
      const out = await runTool("tpm2_readpublic", ["-c", handle, "-f", "pem", "-o", pem], tcti, dir, signal);
      return {
        pem: await readFile(pem, "utf8"),
        name: /^name:\s*([0-9a-f]+)/m.exec(out)?.[1] ?? "",
        attributes: /attributes:\s*\n\s*value:\s*(\S+)/.exec(out)?.[1] ?? "",
      };
    } catch (e) {
      if (e instanceof TpmToolError && /0x18b|handle is not correct|0x184/i.test(e.stderr)) return undefined;
      throw e;
    }
  };

  const loadIdentity = (signal?: AbortSignal): Promise<TpmIdentity> =>
    exclusive(async (tcti, dir) => {
      try {
        // The EK: the vendor's persistent one, else the default-template EK recreated (same key every time).
        let ekParent = EK_PERSISTENT;
        let ekPem = (await readPublic(tcti, dir, EK_PERSISTENT, signal))?.pem;
        if (!ekPem) {
          await runTool("tpm2_createek", ["-c", "ek.ctx", "-G", "rsa", "-u", "ek.pem", "-f", "pem"], tcti, dir, signal);
          ekPem = await readFile(join(dir, "ek.pem"), "utf8");
          ekParent = "ek.ctx";
        }
        let ekCertificatePem = "";
        try {
          await runTool("tpm2_nvreadpublic", [EK_CERT_NV], tcti, dir, signal);
          await runTool("tpm2_nvread", [EK_CERT_NV, "-o", "ekcert.der"], tcti, dir, signal);
          ekCertificatePem = new X509Certificate(trimDer(await readFile(join(dir, "ekcert.der")))).toString();
        } catch (e) {
          if (!(e instanceof TpmToolError) && !(e instanceof Error && /certificate|asn1|decode/i.test(e.message))) throw e;
        }
        // The AK: ours at AK_HANDLE, else made now under the EK and made persistent.
        const record = await readRecord();
        let ak = await readPublic(tcti, dir, AK_HANDLE, signal);
        if (ak && record && record.akName !== ak.name) {
          throw new PiccoloError(
            "failed_precondition",
            `TPM handle ${AK_HANDLE} holds a key (name ${ak.name}) that is not the attestation key piccolod made (${record.akName}); the TPM was cleared or the handle reused`,
            { reason: "TPM_ATTESTATION_FAILED" },
          );
        }
        if (ak && !(/restricted/.test(ak.attributes) && /sign/.test(ak.attributes))) {
          throw new PiccoloError("failed_precondition", `TPM handle ${AK_HANDLE} holds a key that is not a restricted signing key (${ak.attributes})`);
        }
        if (!ak) {
          await runTool(
            "tpm2_createak",
            ["-C", ekParent, "-c", "ak.ctx", "-G", "rsa", "-g", "sha256", "-s", "rsassa", "-u", "ak.pem", "-f", "pem", "-n", "ak.name"],
            tcti,
            dir,
            signal,
          );
          // Free the slots createak left before loading the AK again to persist it.
          await flushTpmContexts(tcti);
          await runTool("tpm2_evictcontrol", ["-C", "o", "-c", "ak.ctx", AK_HANDLE], tcti, dir, signal);
          ak = await readPublic(tcti, dir, AK_HANDLE, signal);
          if (!ak) throw new PiccoloError("internal", `the attestation key is not at ${AK_HANDLE} after tpm2_evictcontrol`);
        }
        if (!record || record.akName !== ak.name) await writeRecord({ akHandle: AK_HANDLE, akName: ak.name });
        return {
          deviceId: publicKeyHash(ekPem),
          ekPublicPem: ekPem,
          ekCertificatePem,
          akPublicPem: ak.pem,
          akName: ak.name,
          akHandle: AK_HANDLE,
        };
      } catch (e) {
        throw toolError("reading the TPM identity", e);
      }
    });

  return {
    device: options.tpm2Device,
    async status(signal) {
      let tcti: string;
      try {
        tcti = await resolveTcti();
      } catch (e) {
        return emptyStatus(options.tpm2Device, (e as Error).message);
      }
      try {
        return await exclusive(async (t, dir) => {
          const fixed = capBlocks(await runTool("tpm2_getcap", ["properties-fixed"], t, dir, signal));
          const variable = capBlocks(await runTool("tpm2_getcap", ["properties-variable"], t, dir, signal));
          const pcrText = await runTool("tpm2_getcap", ["pcrs"], t, dir, signal);
          const pcrBanks: PcrBankInfo[] = [];
          for (const m of pcrText.matchAll(/-\s*([a-z0-9_]+):\s*\[([^\]]*)\]/g)) {
            const pcrs = m[2]!.split(",").map((s) => s.trim()).filter((s) => s !== "").map(Number);
            if (pcrs.length > 0) pcrBanks.push({ algorithm: m[1]!, pcrs });
          }
          const fw1 = rawOf(fixed.get("TPM2_PT_FIRMWARE_VERSION_1"));
          const fw2 = rawOf(fixed.get("TPM2_PT_FIRMWARE_VERSION_2"));
          const vendor = [1, 2, 3, 4].map((i) => valueOf(fixed.get(`TPM2_PT_VENDOR_STRING_${i}`))).join("").trim();
          return {
            present: true,
            device: tcti,
            detail: "",
            manufacturer: valueOf(fixed.get("TPM2_PT_MANUFACTURER")),
            vendor,
            firmwareVersion: `${fw1 >>> 16}.${fw1 & 0xffff} (0x${fw1.toString(16).padStart(8, "0")} 0x${fw2.toString(16).padStart(8, "0")})`,
            specRevision: valueOf(fixed.get("TPM2_PT_REVISION")),
            pcrBanks,
            lockout: {
              inLockout: /inLockout:\s*1/.test(variable.get("TPM2_PT_PERMANENT") ?? ""),
              failedTries: rawOf(variable.get("TPM2_PT_LOCKOUT_COUNTER")),
              maxTries: rawOf(variable.get("TPM2_PT_MAX_AUTH_FAIL")),
              recoverySeconds: rawOf(variable.get("TPM2_PT_LOCKOUT_INTERVAL")),
              lockoutRecoverySeconds: rawOf(variable.get("TPM2_PT_LOCKOUT_RECOVERY")),
            },
          };
        });
      } catch (e) {
        if (e instanceof TpmToolError) return emptyStatus(tcti, `the TPM did not answer: ${e.message}`);
        throw e;
      }
    },
    identity(signal) {
      identityCache ??= loadIdentity(signal).catch((e: unknown) => {
        identityCache = undefined;
        throw e;
      });
      return identityCache;
    },
    async quote(nonce, selection, signal) {
      await this.identity(signal);
      return exclusive(async (tcti, dir) => {
        try {
          const out = await runTool(
            "tpm2_quote",
            ["-c", AK_HANDLE, "-l", selection, "-q", nonce.toString("hex"), "-m", "quote.msg", "-s", "quote.sig", "-o", "quote.pcrs", "-g", "sha256"],
            tcti,
            dir,
            signal,
          );
          return {
            quote: await readFile(join(dir, "quote.msg")),
            signature: await readFile(join(dir, "quote.sig")),
            pcrs: await readFile(join(dir, "quote.pcrs")),
            pcrValues: parsePcrListing(out),
            selection,
            hashAlgorithm: "sha256",
          };
        } catch (e) {
          throw toolError("the quote", e);
        }
      });
    },
  };
}

function emptyStatus(device: string, detail: string): TpmStatusInfo {
  return {
    present: false,
    device,
    detail,
    manufacturer: "",
    vendor: "",
    firmwareVersion: "",
    specRevision: "",
    pcrBanks: [],
    lockout: { inLockout: false, failedTries: 0, maxTries: 0, recoverySeconds: 0, lockoutRecoverySeconds: 0 },
  };
}
