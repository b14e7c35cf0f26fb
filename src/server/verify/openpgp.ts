/**
 * OpenPGP: the Piccolo signing keys and detached-signature checks, for the installer (image files)
 * and the updater (payloads, while they download). The Piccolo build signs its images and update
 * payloads with GnuPG (flatcar/build.sh); the checks run GnuPG's verify-only `gpgv` with a keyring
 * made only of the configured keys and an empty home folder, so nothing else is ever trusted, and
 * the daemon bundles no OpenPGP implementation of its own (openpgp.js would add about a megabyte
 * to the single executable and hash in JavaScript streams). Keys are parsed here only as far as
 * needed to check they are public keys and to compute fingerprints.
 *
 * Two ways to check: `verifyFile` lets gpgv read a local file itself (4.1 s per GiB, against 7.0 s
 * when the same bytes are piped through its stdin), and `startCheck` takes the data in order as it
 * arrives, for a download whose bytes pass by anyway.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PiccoloError, unavailable } from "../errors.js";

// ---------------------------------------------------------------------------------------------
// Keys

/** Decodes an ASCII-armored block of the given type ("PGP PUBLIC KEY BLOCK", "PGP SIGNATURE"). */
export function dearmor(text: string, type: string): Buffer | undefined {
  const m = new RegExp(`-----BEGIN ${type}-----\\r?\\n([\\s\\S]*?)-----END ${type}-----`).exec(text);
  if (!m) return undefined;
  const lines = m[1]!.split(/\r?\n/);
  // Armor headers ("Comment: …") end at the first empty line, if there are any.
  const blank = lines.findIndex((l) => l.trim() === "");
  const body = (lines.slice(0, blank).some((l) => /^[A-Za-z-]+: /.test(l)) ? lines.slice(blank + 1) : lines)
    .map((l) => l.trim())
    .filter((l) => l !== "" && !l.startsWith("="));
  const bin = Buffer.from(body.join(""), "base64");
  return bin.length > 0 ? bin : undefined;
}

/** OpenPGP packets: tag, body, and where the packet (header included) starts. */
function* packets(bin: Buffer): Generator<{ tag: number; body: Buffer; start: number }> {
  let i = 0;
  while (i < bin.length) {
    const start = i;
    const h = bin[i]!;
    if ((h & 0x80) === 0) throw new Error(`not an OpenPGP packet at byte ${i}`);
    let tag: number;
    let len: number;
    if (h & 0x40) {
      tag = h & 0x3f;
      const o = bin[i + 1]!;
      if (o < 192) {
        len = o;
        i += 2;
      } else if (o < 224) {
        len = ((o - 192) << 8) + bin[i + 2]! + 192;
        i += 3;
      } else if (o === 255) {
        len = bin.readUInt32BE(i + 2);
        i += 6;
      } else throw new Error("partial-length packets do not occur in keys");
    } else {
      tag = (h >> 2) & 0xf;
      const lt = h & 3;
      if (lt === 0) {
        len = bin[i + 1]!;
        i += 2;
      } else if (lt === 1) {
        len = bin.readUInt16BE(i + 1);
        i += 3;
      } else if (lt === 2) {
        len = bin.readUInt32BE(i + 1);
        i += 5;
      } else throw new Error("indeterminate-length packets do not occur in keys");
    }
    if (i + len > bin.length) throw new Error("truncated OpenPGP packet");
    yield { tag, body: bin.subarray(i, i + len), start };
    i += len;
  }
}

/** The fingerprint of a public (sub)key packet body (v4: SHA-1; v5/v6: SHA-256), upper-case hex. */
function fingerprintOf(body: Buffer): string {
  const v = body[0];
  if (v === 4) {
    const head = Buffer.from([0x99, (body.length >> 8) & 0xff, body.length & 0xff]);
    return createHash("sha1").update(head).update(body).digest("hex").toUpperCase();
  }
  const head = Buffer.alloc(5);
  head[0] = v === 5 ? 0x9a : 0x9b;
  head.writeUInt32BE(body.length, 1);
  return createHash("sha256").update(head).update(body).digest("hex").toUpperCase();
}

/** A parsed public key. */
export interface PublicKey {
  /** Fingerprint of the primary key. */
  readonly fingerprint: string;
  /** The key in binary form (for gpgv's keyring). */
  readonly binary: Buffer;
}

/** Splits binary OpenPGP data (a `gpg --export` keyring) into its public keys; throws why it is not one. */
export function parseKeyring(bin: Buffer): PublicKey[] {
  const keys: PublicKey[] = [];
  let start = -1;
  let fp = "";
  try {
    for (const p of packets(bin)) {
      if (p.tag === 5) throw new Error("holds a secret key; give the public key (gpg --export)");
      if (p.tag !== 6) continue;
      if (![4, 5, 6].includes(p.body[0] ?? 0)) throw new Error(`key version ${p.body[0]} is not supported`);
      if (start < 0 && p.start > 0) throw new Error("it does not start with a public key packet");
      if (start >= 0) keys.push({ fingerprint: fp, binary: Buffer.from(bin.subarray(start, p.start)) });
      start = p.start;
      fp = fingerprintOf(p.body);
    }
  } catch (e) {
    throw new Error(`is not a valid OpenPGP public key (${(e as Error).message})`);
  }
  if (start < 0) throw new Error("holds no public key packet");
  keys.push({ fingerprint: fp, binary: Buffer.from(bin.subarray(start)) });
  return keys;
}

/** Parses one armored public key (it may hold several primary keys; the first names it); throws a message for INVALID_ARGUMENT. */
export function parsePublicKey(armored: string): PublicKey {
  if (/-----BEGIN PGP PRIVATE KEY BLOCK-----/.test(armored)) throw new Error("is a private key; give the public key (gpg --armor --export)");
  const bin = dearmor(armored, "PGP PUBLIC KEY BLOCK");
  if (!bin) throw new Error('is not an ASCII-armored OpenPGP public key ("-----BEGIN PGP PUBLIC KEY BLOCK-----")');
  const keys = parseKeyring(bin);
  return { fingerprint: keys[0]!.fingerprint, binary: bin };
}

/**
 * Reads a key file: ASCII-armored public key blocks (`gpg --armor --export`, any number) or a
 * binary keyring (`gpg --export`). Unreadable files and unusable keys are reported to `warn` and
 * skipped, so one bad file does not stop the daemon.
 */
export async function readKeyFile(file: string, warn: (msg: string, err: string) => void): Promise<PublicKey[]> {
  let data: Buffer;
  try {
    data = await readFile(file);
  } catch (e) {
    warn(`signing key file ${file} is not readable`, (e as Error).message);
    return [];
  }
  const text = data.toString("latin1");
  if (text.includes("-----BEGIN PGP")) {
    const out: PublicKey[] = [];
    for (const block of text.match(/-----BEGIN PGP (?:PUBLIC|PRIVATE) KEY BLOCK-----[\s\S]*?-----END PGP (?:PUBLIC|PRIVATE) KEY BLOCK-----/g) ?? []) {
      try {
        out.push(parsePublicKey(block));
      } catch (e) {
        warn(`a key in ${file} is ignored`, (e as Error).message);
      }
    }
    if (out.length === 0) warn(`signing key file ${file} holds no usable public key`, "");
    return out;
  }
  try {
    return parseKeyring(data);
  } catch (e) {
    warn(`signing key file ${file} is ignored`, (e as Error).message);
    return [];
  }
}

/** Reads every key file, in order, without duplicates (by fingerprint). */
export async function readKeyFiles(files: readonly string[], warn: (msg: string, err: string) => void): Promise<PublicKey[]> {
  const out = new Map<string, PublicKey>();
  for (const f of files) for (const k of await readKeyFile(f, warn)) if (!out.has(k.fingerprint)) out.set(k.fingerprint, k);
  return [...out.values()];
}

// ---------------------------------------------------------------------------------------------
// Signatures

/** A good signature. */
export interface VerifiedSignature {
  /** Fingerprint of the key that made it (the primary key when gpgv says). */
  readonly fingerprint: string;
  /** Signature creation time, seconds since the epoch (0 when unknown). */
  readonly created: number;
}

/** Reads gpgv's --status-fd lines: whether the signature is good, by whom, or what is wrong with it. */
export function parseGpgStatus(text: string): { good: boolean; fingerprint: string; created: number; problem: string } {
  let good = false;
  let fingerprint = "";
  let created = 0;
  let problem = "";
  for (const line of text.split("\n")) {
    if (!line.startsWith("[GNUPG:] ")) continue;
    const f = line.slice(9).trim().split(" ");
    switch (f[0]) {
      case "VALIDSIG":
        good = true;
        fingerprint = (f[10] ?? f[1] ?? "").toUpperCase();
        created = Number(f[3] ?? 0) || 0;
        break;
      case "BADSIG":
        problem ||= `bad signature (key ${f[1] ?? "?"}): the data is not what the key signed (altered or truncated)`;
        break;
      case "NO_PUBKEY":
        problem ||= `signed by key ${f[1] ?? "?"}, which is not one of the configured Piccolo signing keys (an unknown key)`;
        break;
      case "ERRSIG":
        problem ||=
          f[6] === "9"
            ? `signed by key ${f[1] ?? "?"}, which is not one of the configured Piccolo signing keys (an unknown key)`
            : `the signature cannot be checked (gpgv error code ${f[6] ?? "?"}, algorithm ${f[2] ?? "?"})`;
        break;
      case "NODATA":
        problem ||= "holds no OpenPGP signature";
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

/** A running check of one detached signature; feed it the signed data in order. */
export interface SignatureCheck {
  /** Feeds data; resolves when gpgv has taken it (backpressure). */
  write(chunk: Buffer): Promise<void>;
  /** Ends the data; resolves to the signature, or throws why it is not valid (as verifyFile does). */
  finish(): Promise<VerifiedSignature>;
  /** Stops gpgv and removes its temporary keyring. */
  abort(): void;
}

/** Checks detached signatures against the configured keys. */
export interface SignatureVerifier {
  /** The keys signatures are checked against now. */
  keys(): readonly PublicKey[];
  /**
   * Checks `signature` (armored or binary detached OpenPGP signature) over the local file at
   * `dataPath`, which gpgv reads itself. Throws PiccoloError: invalid_argument naming `field` (and
   * reason BAD_SIGNATURE) for a bad, unknown-key or garbage signature; failed_precondition
   * (NO_TRUSTED_KEYS) when no key is configured; unavailable when gpgv is missing.
   */
  verifyFile(dataPath: string, signature: string | Uint8Array, field: string, signal?: AbortSignal): Promise<VerifiedSignature>;
  /** Starts a check whose data comes in pieces (a download); finish() throws as verifyFile does. */
  startCheck(signature: string | Uint8Array, field: string): Promise<SignatureCheck>;
}

/** Options of createOpenPgpVerifier. */
export interface OpenPgpVerifierOptions {
  /** The trusted keys, asked at every check (they can change at run time). */
  readonly keys: () => readonly PublicKey[];
  /** The gpgv binary. */
  readonly gpgv?: string;
}

/** The error a check ends with when gpgv did not say VALIDSIG. */
function refusal(field: string, status: string, code: number | null, stderr: string): PiccoloError {
  const s = parseGpgStatus(status);
  const why = s.problem || `is not valid (gpgv exit ${code}: ${stderr.trim().split("\n").slice(-2).join(" ") || "no reason given"})`;
  return new PiccoloError("invalid_argument", `${field}: ${why}`, { field, reason: "BAD_SIGNATURE" });
}

/** Creates a gpgv-backed verifier. */
export function createOpenPgpVerifier(options: OpenPgpVerifierOptions): SignatureVerifier {
  const bin = options.gpgv ?? "gpgv";
  const missing = (e: Error): Error => ((e as NodeJS.ErrnoException).code === "ENOENT" ? unavailable(`gpgv (GnuPG's signature checker, at ${bin})`, e) : unavailable(`gpgv (${bin})`, e));

  /** A private home with the keyring and the signature; the caller removes it. */
  const prepare = async (signature: string | Uint8Array): Promise<{ home: string; args: string[] }> => {
    const keys = options.keys();
    if (keys.length === 0) {
      throw new PiccoloError(
        "failed_precondition",
        "no Piccolo signing keys are configured, so no signature can be checked; set them with SetUpdateConfig (signing_keys) or the config key signingKeyFiles",
        { reason: "NO_TRUSTED_KEYS" },
      );
    }
    const home = await mkdtemp(join(tmpdir(), "piccolod-gpgv-"));
    try {
      await writeFile(join(home, "keyring.gpg"), Buffer.concat(keys.map((k) => k.binary)), { mode: 0o600 });
      await writeFile(join(home, "detached.sig"), signature, { mode: 0o600 });
    } catch (e) {
      await rm(home, { recursive: true, force: true });
      throw e;
    }
    return { home, args: ["--homedir", home, "--status-fd", "1", "--keyring", join(home, "keyring.gpg"), join(home, "detached.sig")] };
  };

  return {
    keys: () => options.keys(),

    async verifyFile(dataPath, signature, field, signal) {
      const { home, args } = await prepare(signature);
      try {
        const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
          const child = spawn(bin, [...args, dataPath], { stdio: ["ignore", "pipe", "pipe"], signal });
          let out = "";
          let err = "";
          child.stdout.on("data", (d: Buffer) => (out = (out + d.toString()).slice(-65536)));
          child.stderr.on("data", (d: Buffer) => (err = (err + d.toString()).slice(-65536)));
          child.on("error", (e: Error) => reject(signal?.aborted ? signal.reason : missing(e)));
          child.on("close", (c) => resolve({ code: c, stdout: out, stderr: err }));
        });
        const s = parseGpgStatus(stdout);
        if (code === 0 && s.good) return { fingerprint: s.fingerprint, created: s.created };
        throw refusal(field, stdout, code, stderr);
      } finally {
        await rm(home, { recursive: true, force: true });
      }
    },

    async startCheck(signature, field) {
      const { home, args } = await prepare(signature);
      const cleanup = (): Promise<void> => rm(home, { recursive: true, force: true });
      const child = spawn(bin, [...args, "-"], { stdio: ["pipe", "pipe", "pipe"] });
      let status = "";
      let stderr = "";
      child.stdout.on("data", (d: Buffer) => (status = (status + d.toString()).slice(-65536)));
      child.stderr.on("data", (d: Buffer) => (stderr = (stderr + d.toString()).slice(-4000)));
      let spawnError: Error | undefined;
      const exited = new Promise<number | null>((resolve) => {
        child.once("error", (e) => {
          spawnError = e;
          resolve(null);
        });
        child.once("close", (code) => resolve(code));
      });
      // gpgv stops reading when it has seen enough to fail; later writes must not crash the daemon.
      child.stdin.on("error", () => undefined);
      return {
        write(chunk) {
          if (child.stdin.destroyed || child.stdin.writableEnded) return Promise.resolve();
          return new Promise((resolve) => {
            if (child.stdin.write(chunk)) resolve();
            else {
              const done = (): void => {
                child.stdin.off("drain", done);
                child.off("close", done);
                resolve();
              };
              child.stdin.once("drain", done);
              child.once("close", done);
            }
          });
        },
        async finish() {
          child.stdin.end();
          const code = await exited;
          await cleanup();
          if (spawnError) throw missing(spawnError);
          const s = parseGpgStatus(status);
          if (code === 0 && s.good) return { fingerprint: s.fingerprint, created: s.created };
          throw refusal(field, status, code, stderr);
        },
        abort() {
          child.kill("SIGKILL");
          void cleanup();
        },
      };
    },
  };
}
