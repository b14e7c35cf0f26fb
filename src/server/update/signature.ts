/**
 * OpenPGP checks of update payloads against the configured Piccolo signing keys.
 *
 * Verification runs GnuPG's `gpgv` (the verify-only tool of the GnuPG that signs Piccolo's build,
 * flatcar/build.sh, and that Flatcar ships) with a keyring made only of the configured keys. The
 * payload is streamed into gpgv's stdin while it downloads, so the signature costs no extra pass
 * over hundreds of MiB, and the daemon bundles no OpenPGP implementation of its own (openpgp.js
 * would add about a megabyte to the single executable and hash in JavaScript streams). Keys are
 * parsed here only as far as needed to check they are public keys and to compute fingerprints.
 */
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PiccoloError, unavailable } from "../errors.js";

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

/** OpenPGP packets: tag and body. */
function* packets(bin: Buffer): Generator<{ tag: number; body: Buffer }> {
  let i = 0;
  while (i < bin.length) {
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
    yield { tag, body: bin.subarray(i, i + len) };
    i += len;
  }
}

/** The fingerprint of a public (sub)key packet body (v4: SHA-1; v5/v6: SHA-256), upper-case hex. */
function fingerprint(body: Buffer): string {
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

/** Parses one armored public key; throws a message suitable for INVALID_ARGUMENT. */
export function parsePublicKey(armored: string): PublicKey {
  if (/-----BEGIN PGP PRIVATE KEY BLOCK-----/.test(armored)) throw new Error("is a private key; give the public key (gpg --armor --export)");
  const bin = dearmor(armored, "PGP PUBLIC KEY BLOCK");
  if (!bin) throw new Error('is not an ASCII-armored OpenPGP public key ("-----BEGIN PGP PUBLIC KEY BLOCK-----")');
  let primary: string | undefined;
  try {
    for (const p of packets(bin)) {
      if (p.tag === 6 && primary === undefined) {
        if (![4, 5, 6].includes(p.body[0] ?? 0)) throw new Error(`key version ${p.body[0]} is not supported`);
        primary = fingerprint(p.body);
      }
    }
  } catch (e) {
    throw new Error(`is not a valid OpenPGP public key (${(e as Error).message})`);
  }
  if (!primary) throw new Error("holds no public key packet");
  return { fingerprint: primary, binary: bin };
}

/** A running verification of one detached signature; feed it the signed data in order. */
export interface SignatureCheck {
  /** Feeds data; resolves when gpgv has taken it (backpressure). */
  write(chunk: Buffer): Promise<void>;
  /** Ends the data and resolves to the signer's primary fingerprint, or throws why it is not valid. */
  finish(): Promise<string>;
  /** Stops gpgv and removes its temporary keyring. */
  abort(): void;
}

/**
 * Starts `gpgv` on a detached signature with a keyring of `keys` only. The data comes on stdin.
 * `gpgv` is the path of the binary (configurable for hosts that keep it elsewhere).
 */
export async function startSignatureCheck(signature: Buffer, keys: readonly PublicKey[], gpgv = "gpgv"): Promise<SignatureCheck> {
  const dir = await mkdtemp(join(tmpdir(), "piccolod-gpgv-"));
  await writeFile(join(dir, "keyring.gpg"), Buffer.concat(keys.map((k) => k.binary)), { mode: 0o600 });
  await writeFile(join(dir, "payload.sig"), signature, { mode: 0o600 });
  const child = spawn(gpgv, ["--homedir", dir, "--status-fd", "1", "--keyring", join(dir, "keyring.gpg"), join(dir, "payload.sig"), "-"], {
    stdio: ["pipe", "pipe", "pipe"],
  });
  let status = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => (status += d.toString()));
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
  const cleanup = (): Promise<void> => rm(dir, { recursive: true, force: true });
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
      if (spawnError) {
        if ((spawnError as NodeJS.ErrnoException).code === "ENOENT") throw unavailable(`gpgv (GnuPG's signature checker, at ${gpgv})`);
        throw unavailable(`gpgv (${gpgv})`, spawnError);
      }
      const valid = /^\[GNUPG:\] VALIDSIG (\S+)(?: \S+){8} (\S+)/m.exec(status) ?? /^\[GNUPG:\] VALIDSIG (\S+)/m.exec(status);
      if (code === 0 && valid) return (valid[2] ?? valid[1]!).toUpperCase();
      if (/^\[GNUPG:\] BADSIG/m.test(status)) {
        throw new PiccoloError("failed_precondition", "the payload's OpenPGP signature is BAD: the payload is not what the key signed (altered or truncated)");
      }
      const missing = /^\[GNUPG:\] (?:NO_PUBKEY|ERRSIG) (\S+)/m.exec(status);
      if (missing && /^\[GNUPG:\] (NO_PUBKEY|ERRSIG \S+ \d+ \d+ \S+ \d+ 9)/m.test(status)) {
        throw new PiccoloError("failed_precondition", `the payload is signed by key ${missing[1]}, which is not one of the configured Piccolo signing keys`);
      }
      if (/^\[GNUPG:\] NODATA/m.test(status)) throw new PiccoloError("failed_precondition", "the signature file holds no OpenPGP signature");
      throw new PiccoloError("failed_precondition", `the payload's OpenPGP signature is not valid (gpgv exit ${code}: ${stderr.trim().split("\n").slice(-2).join(" ")})`);
    },
    abort() {
      child.kill("SIGKILL");
      void cleanup();
    },
  };
}
