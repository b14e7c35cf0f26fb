/**
 * Sealed secrets: values encrypted with systemd-creds to the TPM (or, only when the machine has no
 * TPM, to the host key /var/lib/systemd/credential.secret), one file per name in a folder that a
 * systemd unit can load with LoadCredentialEncrypted=. Values travel on pipes only: never on a
 * command line, never in a log line.
 *
 * The embedded credential name is "piccolod_<name>": piccolod.service loads the whole folder with
 * `LoadCredentialEncrypted=piccolod:<dir>` (systemd names each file piccolod_<file>), and any other
 * unit loads one secret with `LoadCredentialEncrypted=piccolod_<name>:<dir>/<name>`.
 */
import { spawn } from "node:child_process";
import { mkdir, readFile, readdir, rename, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { PiccoloError, invalidArgument, notFound } from "../errors.js";
import { flushTpmContexts, withTpm } from "./tpm-lock.js";

export { flushTpmContexts, withTpm };

/** Which key a secret is sealed with. */
export type SealKey = "tpm2" | "host";

/** What is known about one sealed secret (never its value). */
export interface CredentialInfo {
  readonly name: string;
  /** Where the sealed file is, for LoadCredentialEncrypted=. */
  readonly path: string;
  /** The credential name embedded in the file (what a unit must load it as). */
  readonly credentialName: string;
  /** The key it is sealed with; undefined for a file piccolod did not write (e.g. place-keys.sh). */
  readonly sealedWith: SealKey | undefined;
  /** Size of the sealed file in bytes. */
  readonly sealedBytes: number;
  readonly updatedAt: Date;
}

/** How the store reaches the TPM. */
export interface CredentialStoreOptions {
  /** Folder of sealed files (<stateDir>/secrets; not the credstore piccolod.service loads, so a secret that no longer decrypts cannot stop piccolod from starting). */
  readonly dir: string;
  /** systemd's --tpm2-device= value: "auto", a device path, or a TCTI ("swtpm:host=…,port=…"). */
  readonly tpm2Device: string;
  /** TPM device nodes "auto" looks for. */
  readonly tpmDevices: readonly string[];
  /** The systemd-creds executable (tests and the demo may point elsewhere). */
  readonly systemdCreds?: string;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** Largest secret accepted (systemd-creds itself allows more; secrets here are keys and passwords). */
export const MAX_SECRET_BYTES = 64 * 1024;
const META_SUFFIX = ".json";

/** Checks a secret name; throws INVALID_ARGUMENT naming `field`. */
export function checkSecretName(name: string, field = "name"): void {
  if (!NAME.test(name)) {
    throw invalidArgument(field, `expected 1-64 letters, digits, "_", "." or "-", starting with a letter or digit, got ${JSON.stringify(name)}`);
  }
}

interface Meta {
  sealedWith: SealKey;
}

/** Runs systemd-creds with `input` on stdin; resolves to stdout, or rejects with its stderr. */
function runCreds(bin: string, args: readonly string[], input: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = spawn(bin, args, { stdio: ["pipe", "pipe", "pipe"] });
    const out: Buffer[] = [];
    let err = "";
    child.stdout.on("data", (d: Buffer) => out.push(d));
    child.stderr.on("data", (d: Buffer) => (err += d.toString()));
    child.on("error", (e) => reject(new PiccoloError("unavailable", `${bin} could not be run (${e.message}); install systemd (systemd-creds)`, { reason: "HOST_PART_UNAVAILABLE" })));
    child.on("close", (code) => {
      if (code === 0) resolve(Buffer.concat(out));
      else reject(new CredsFailure(code ?? -1, err.trim()));
    });
    child.stdin.on("error", () => undefined);
    child.stdin.end(input);
  });
}

/** systemd-creds exited non-zero; `stderr` is its explanation (it never contains the value). */
export class CredsFailure extends Error {
  constructor(
    readonly code: number,
    readonly stderr: string,
  ) {
    super(`systemd-creds exited with ${code}: ${stderr}`);
  }
}

/** The sealed-secret folder. */
export class CredentialStore {
  private readonly bin: string;

  constructor(private readonly options: CredentialStoreOptions) {
    this.bin = options.systemdCreds ?? "systemd-creds";
  }

  /** Where piccolod keeps what it knows about each sealed file (outside the folder systemd loads). */
  private get metaDir(): string {
    return `${this.options.dir.replace(/\/+$/, "")}.meta`;
  }

  /** The folder sealed files live in. */
  get dir(): string {
    return this.options.dir;
  }

  /** Whether a TPM is there to seal to (a TCTI is trusted to name one; "auto" looks for the device). */
  async tpmAvailable(): Promise<boolean> {
    const dev = this.options.tpm2Device;
    const candidates = dev === "auto" ? this.options.tpmDevices : dev.startsWith("/") ? [dev] : [];
    if (candidates.length === 0) return true;
    for (const d of candidates) {
      try {
        if ((await stat(d)).isCharacterDevice()) return true;
      } catch {
        // next one
      }
    }
    return false;
  }

  /** The key new secrets are sealed with. */
  async sealKey(): Promise<SealKey> {
    return (await this.tpmAvailable()) ? "tpm2" : "host";
  }

  /** The path of a secret's sealed file. */
  path(name: string): string {
    checkSecretName(name);
    return join(this.options.dir, name);
  }

  /** The credential name embedded in a secret's file. */
  static credentialName(name: string): string {
    return `piccolod_${name}`;
  }

  /** Seals `value` as `name`, replacing an older one atomically (the old file stays if sealing fails). */
  async seal(name: string, value: Buffer): Promise<CredentialInfo> {
    checkSecretName(name);
    if (value.length === 0) throw invalidArgument("value", "must not be empty");
    if (value.length > MAX_SECRET_BYTES) throw invalidArgument("value", `is ${value.length} bytes; at most ${MAX_SECRET_BYTES}`);
    const key = await this.sealKey();
    await mkdir(this.options.dir, { recursive: true, mode: 0o700 });
    const args = ["encrypt", `--name=${CredentialStore.credentialName(name)}`, `--with-key=${key}`];
    if (key === "tpm2") args.push(`--tpm2-device=${this.options.tpm2Device}`);
    args.push("-", "-");
    let sealed: Buffer;
    try {
      sealed = key === "tpm2" ? await withTpm(this.options.tpm2Device, () => runCreds(this.bin, args, value)) : await runCreds(this.bin, args, value);
    } catch (e) {
      if (e instanceof CredsFailure) {
        throw new PiccoloError("unavailable", `sealing ${name} with the ${key === "tpm2" ? `TPM (${this.options.tpm2Device})` : "host key"} failed: ${e.stderr || `exit ${e.code}`}`, { reason: "SEAL_FAILED" });
      }
      throw e;
    }
    const final = join(this.options.dir, name);
    // Temporary and metadata files live beside the folder, not in it: systemd loads every file in it.
    await mkdir(this.metaDir, { recursive: true, mode: 0o700 });
    const tmp = join(this.metaDir, `${name}.${process.pid}.${Date.now()}.tmp`);
    const metaPath = join(this.metaDir, `${name}${META_SUFFIX}`);
    try {
      await writeFile(tmp, sealed, { mode: 0o600 });
      await writeFile(metaPath, JSON.stringify({ sealedWith: key } satisfies Meta), { mode: 0o600 });
      await rename(tmp, final);
    } catch (e) {
      await rm(tmp, { force: true });
      throw e;
    }
    return this.info(name);
  }

  /** Decrypts a secret; NOT_FOUND when there is none, UNAVAILABLE when it cannot be unsealed. */
  async unseal(name: string): Promise<Buffer> {
    const file = this.path(name);
    let sealed: Buffer;
    try {
      sealed = await readFile(file);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") throw notFound("secret", name);
      throw e;
    }
    const meta = await this.meta(name);
    const args = ["decrypt", `--name=${CredentialStore.credentialName(name)}`];
    if (meta?.sealedWith !== "host") args.push(`--tpm2-device=${this.options.tpm2Device}`);
    args.push("-", "-");
    try {
      return meta?.sealedWith === "host" ? await runCreds(this.bin, args, sealed) : await withTpm(this.options.tpm2Device, () => runCreds(this.bin, args, sealed));
    } catch (e) {
      if (e instanceof CredsFailure) {
        throw new PiccoloError("failed_precondition", `secret ${name} (${file}) could not be unsealed: ${e.stderr || `exit ${e.code}`}`, { reason: "UNSEAL_FAILED" });
      }
      throw e;
    }
  }

  /** Whether a secret exists. */
  async has(name: string): Promise<boolean> {
    try {
      return (await stat(this.path(name))).isFile();
    } catch {
      return false;
    }
  }

  /** Every sealed secret, sorted by name. */
  async list(): Promise<CredentialInfo[]> {
    let entries: string[];
    try {
      entries = await readdir(this.options.dir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw e;
    }
    const names = entries.filter((n) => NAME.test(n)).sort();
    const out: CredentialInfo[] = [];
    for (const n of names) {
      try {
        out.push(await this.info(n));
      } catch {
        // removed meanwhile
      }
    }
    return out;
  }

  /** Deletes a secret; false when there was none. */
  async remove(name: string): Promise<boolean> {
    const file = this.path(name);
    const existed = await this.has(name);
    await rm(file, { force: true });
    await rm(join(this.metaDir, `${name}${META_SUFFIX}`), { force: true });
    return existed;
  }

  private async meta(name: string): Promise<Meta | undefined> {
    try {
      const m = JSON.parse(await readFile(join(this.metaDir, `${name}${META_SUFFIX}`), "utf8")) as Partial<Meta>;
      return m.sealedWith === "tpm2" || m.sealedWith === "host" ? { sealedWith: m.sealedWith } : undefined;
    } catch {
      return undefined;
    }
  }

  private async info(name: string): Promise<CredentialInfo> {
    const path = join(this.options.dir, name);
    const st = await stat(path);
    return {
      name,
      path,
      credentialName: CredentialStore.credentialName(name),
      sealedWith: (await this.meta(name))?.sealedWith,
      sealedBytes: st.size,
      updatedAt: st.mtime,
    };
  }
}
