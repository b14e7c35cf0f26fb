/**
 * The daemon's own keys for the local API: the ES256 key tokens are signed with, and the TLS key
 * and self-signed certificate of the TCP listeners. Both private keys are kept together in one
 * sealed credential (systemd-creds: the TPM, or the host key where there is none), so start-up
 * unseals once; with keyProtection "file" they are a mode-0600 JSON file instead (for a daemon
 * that cannot run systemd-creds, such as an unprivileged demo). The TLS key is sealed like the
 * signing key because whoever holds it can impersonate the daemon to every client that pinned
 * its certificate. The certificate itself is public: <stateDir>/tls/cert.pem.
 */
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, X509Certificate, type KeyObject } from "node:crypto";
import { chmod, mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import type { Logger } from "pino";
import { PiccoloError } from "../errors.js";
import type { CredentialStore } from "../trust/credentials.js";
import { certificateFingerprint, selfSignedCertificate } from "./x509.js";

/** How the private keys are kept at rest. */
export type KeyProtectionMode = "sealed" | "file";

/** The sealed credential holding both private keys. */
export const KEYS_CREDENTIAL = "auth-keys";

/** The daemon's keys, loaded. */
export interface DeviceKeys {
  /** Signs tokens (ES256). */
  readonly signingKey: KeyObject;
  /** Verifies tokens. */
  readonly verifyKey: KeyObject;
  /** The public signing key as a JWK, with its kid. */
  readonly jwk: Readonly<Record<string, string>>;
  /** TLS private key (PEM, PKCS#8). */
  readonly tlsKeyPem: string;
  /** TLS certificate (PEM). */
  readonly tlsCertPem: string;
  /** SHA-256 fingerprint of the certificate, "AB:CD:…". */
  readonly fingerprint: string;
  readonly protection: KeyProtectionMode;
  /** Where the certificate is. */
  readonly certPath: string;
}

/** What loadDeviceKeys needs. */
export interface DeviceKeysOptions {
  readonly stateDir: string;
  readonly credentials: CredentialStore;
  readonly protection: KeyProtectionMode;
  /** Extra names and addresses for the certificate (besides localhost, loopback and the host name). */
  readonly altNames: readonly string[];
  readonly log: Logger;
}

interface KeyFile {
  readonly signing: string;
  readonly tls: string;
}

const newKey = (): string =>
  generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey.export({ type: "pkcs8", format: "pem" }).toString();

async function writeAtomic(path: string, data: string, mode: number): Promise<void> {
  await mkdir(dirname(path), { recursive: true, mode: 0o700 });
  const tmp = `${path}.${process.pid}.tmp`;
  await writeFile(tmp, data, { mode });
  await chmod(tmp, mode);
  await rename(tmp, path);
}

/** Loads the keys, creating them (and the certificate) on first start. */
export async function loadDeviceKeys(o: DeviceKeysOptions): Promise<DeviceKeys> {
  const log = o.log;
  const filePath = join(o.stateDir, "auth", "keys.json");
  const certPath = join(o.stateDir, "tls", "cert.pem");
  let keys: KeyFile | undefined;

  const parse = (text: string): KeyFile => {
    const k = JSON.parse(text) as Partial<KeyFile>;
    if (typeof k.signing !== "string" || typeof k.tls !== "string") throw new Error("missing signing or tls key");
    createPrivateKey(k.signing);
    createPrivateKey(k.tls);
    return { signing: k.signing, tls: k.tls };
  };

  if (o.protection === "sealed") {
    if (await o.credentials.has(KEYS_CREDENTIAL)) {
      try {
        keys = parse((await o.credentials.unseal(KEYS_CREDENTIAL)).toString("utf8"));
      } catch (e) {
        // A TPM that was cleared or replaced can never unseal them again: start with new keys
        // (every token and every client's pinned fingerprint become invalid) rather than never.
        const aside = `${o.credentials.path(KEYS_CREDENTIAL)}.unreadable-${Date.now()}`;
        await rename(o.credentials.path(KEYS_CREDENTIAL), aside).catch(() => undefined);
        log.error({ err: (e as Error).message, keptAs: aside }, "the sealed API keys cannot be unsealed; new keys are made: tokens and pinned TLS fingerprints must be renewed");
      }
    }
    if (!keys) {
      keys = { signing: newKey(), tls: newKey() };
      try {
        await o.credentials.seal(KEYS_CREDENTIAL, Buffer.from(JSON.stringify(keys)));
      } catch (e) {
        throw new PiccoloError(
          "unavailable",
          `cannot seal the API keys with systemd-creds (${(e as Error).message}); set keyProtection to "file" to keep them in a mode-0600 file instead`,
          { cause: e },
        );
      }
      await rm(certPath, { force: true });
      log.info({ credential: KEYS_CREDENTIAL }, "made new API keys (sealed)");
    }
  } else {
    try {
      keys = parse(await readFile(filePath, "utf8"));
      await chmod(filePath, 0o600);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") {
        log.error({ err: (e as Error).message, file: filePath }, "the API key file is unreadable; new keys are made");
      }
      keys = { signing: newKey(), tls: newKey() };
      await writeAtomic(filePath, JSON.stringify(keys), 0o600);
      await rm(certPath, { force: true });
      log.info({ file: filePath }, "made new API keys (file, mode 0600)");
    }
  }

  const tlsKey = createPrivateKey(keys.tls);
  const tlsPub = createPublicKey(tlsKey).export({ type: "spki", format: "der" });
  let certPem: string | undefined;
  try {
    certPem = await readFile(certPath, "utf8");
    const matches = new X509Certificate(certPem).publicKey.export({ type: "spki", format: "der" }).equals(tlsPub);
    if (!matches) certPem = undefined;
  } catch {
    certPem = undefined;
  }
  if (!certPem) {
    const altNames = [...new Set(["localhost", "127.0.0.1", "::1", hostname(), ...o.altNames])];
    certPem = selfSignedCertificate({ privateKey: tlsKey, commonName: `piccolod ${hostname()}`, altNames });
    await writeAtomic(certPath, certPem, 0o644);
    log.info({ cert: certPath, fingerprint: certificateFingerprint(certPem) }, "made a new self-signed TLS certificate");
  }

  const signingKey = createPrivateKey(keys.signing);
  const verifyKey = createPublicKey(signingKey);
  const jwkRaw = verifyKey.export({ format: "jwk" }) as Record<string, string>;
  // RFC 7638 thumbprint as the key id.
  const kid = createHash("sha256")
    .update(JSON.stringify({ crv: jwkRaw["crv"], kty: jwkRaw["kty"], x: jwkRaw["x"], y: jwkRaw["y"] }))
    .digest("base64url");
  return {
    signingKey,
    verifyKey,
    jwk: { kty: jwkRaw["kty"]!, crv: jwkRaw["crv"]!, x: jwkRaw["x"]!, y: jwkRaw["y"]!, kid, alg: "ES256", use: "sig" },
    tlsKeyPem: keys.tls,
    tlsCertPem: certPem,
    fingerprint: certificateFingerprint(certPem),
    protection: o.protection,
    certPath,
  };
}
