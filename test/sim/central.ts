/**
 * A reference Piccolo central (device side of its API) for tests and the demo, on loopback HTTP:
 *
 *   POST /api/v1/devices/nonce     → {nonce (hex, 32 bytes), expires_in}; each nonce is single-use
 *   POST /api/v1/devices/register  → checks the nonce's freshness, that device_id is the SHA-256 of
 *                                    the EK public key, that the EK certificate (when sent) holds
 *                                    that key, and the quote with `tpm2_checkquote`; then mints an
 *                                    ES256 JWT with `jose`: {jwt_token, refresh_token, expires_in}
 *   POST /api/v1/devices/refresh   → {device_id, refresh_token} (+ bearer JWT) → a new grant; the
 *                                    refresh token rotates and the old one stops working
 *   GET  /.well-known/jwks.json    → the public key the tokens verify with
 *
 * Refusals are `{error, message}` with error DEVICE_NOT_REGISTERED (401), SUBSCRIPTION_EXPIRED
 * (403) or TPM_ATTESTATION_FAILED (401). Switches: `subscriptionExpired`, `failAttestation`,
 * `down` (503 to everything), `forget(deviceId)`.
 */
import { execFile } from "node:child_process";
import { createHash, createPublicKey, randomBytes, X509Certificate } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { exportJWK, generateKeyPair, jwtVerify, SignJWT, type JWK, type CryptoKey } from "jose";

/** The audience device tokens carry. */
export const DEVICE_AUDIENCE = "piccolod";

/** One token the central issued. */
export interface IssuedToken {
  readonly deviceId: string;
  readonly kind: "register" | "refresh";
  readonly jwt: string;
  readonly refreshToken: string;
}

/** One request the central answered. */
export interface CentralRequest {
  readonly method: string;
  readonly path: string;
  readonly status: number;
  readonly error?: string;
  readonly message?: string;
}

/** Options of startCentralSim. */
export interface CentralSimOptions {
  /** Lifetime of each JWT in seconds (expires_in). Default 3600. */
  readonly tokenTtlSeconds?: number;
  /** How long a nonce may be used after it was handed out, in ms. Default 60 s. */
  readonly nonceTtlMs?: number;
  /** `iss` of the tokens. */
  readonly issuer?: string;
  /** The tpm2_checkquote executable. */
  readonly checkquote?: string;
}

/** A running reference central. */
export interface CentralSim {
  /** Base URL, "http://127.0.0.1:PORT". */
  readonly url: string;
  readonly issuer: string;
  /** The central refuses registration and refresh with SUBSCRIPTION_EXPIRED while set. */
  subscriptionExpired: boolean;
  /** The central refuses every registration with TPM_ATTESTATION_FAILED while set. */
  failAttestation: boolean;
  /** The central answers 503 to everything while set (an outage). */
  down: boolean;
  /** Lifetime of new tokens in seconds. */
  tokenTtlSeconds: number;
  /** Every grant, in order. */
  readonly issued: IssuedToken[];
  /** Every request, in order. */
  readonly requests: CentralRequest[];
  /** Registered devices by id. */
  readonly devices: ReadonlyMap<string, { refreshToken: string; akPublicKeyPem: string }>;
  /** Forgets a device: its refreshes get DEVICE_NOT_REGISTERED. */
  forget(deviceId: string): void;
  /** Verifies a token as a relying party would (signature, issuer, audience, expiry). */
  verify(jwt: string): Promise<Record<string, unknown>>;
  /** The public JWKS. */
  jwks(): { keys: JWK[] };
  close(): Promise<void>;
}

class Refusal extends Error {
  constructor(
    readonly status: number,
    readonly error: string,
    message: string,
  ) {
    super(message);
  }
}

const attestationFailed = (message: string): Refusal => new Refusal(401, "TPM_ATTESTATION_FAILED", message);

function readBody(req: IncomingMessage): Promise<unknown> {
  return new Promise((resolve, reject) => {
    let size = 0;
    const chunks: Buffer[] = [];
    req.on("data", (d: Buffer) => {
      size += d.length;
      if (size > 1024 * 1024) reject(new Refusal(413, "BAD_REQUEST", "body too large"));
      else chunks.push(d);
    });
    req.on("end", () => {
      const text = Buffer.concat(chunks).toString("utf8");
      try {
        resolve(text === "" ? {} : JSON.parse(text));
      } catch {
        reject(new Refusal(400, "BAD_REQUEST", "the body is not JSON"));
      }
    });
    req.on("error", reject);
  });
}

const str = (o: Record<string, unknown>, key: string): string => {
  const v = o[key];
  if (typeof v !== "string") throw new Refusal(400, "BAD_REQUEST", `${key}: expected a string`);
  return v;
};

function spkiHash(pem: string): { hash: string; der: Buffer } {
  let der: Buffer;
  try {
    der = createPublicKey(pem).export({ type: "spki", format: "der" });
  } catch {
    throw attestationFailed("ek_public_key is not a public key");
  }
  return { hash: createHash("sha256").update(der).digest("hex"), der };
}

/** Starts the reference central on 127.0.0.1 (a free port). */
export async function startCentralSim(options: CentralSimOptions = {}): Promise<CentralSim> {
  const issuer = options.issuer ?? "https://central.piccolo.test";
  const nonceTtlMs = options.nonceTtlMs ?? 60_000;
  const checkquote = options.checkquote ?? "tpm2_checkquote";
  const { privateKey, publicKey } = (await generateKeyPair("ES256", { extractable: true })) as { privateKey: CryptoKey; publicKey: CryptoKey };
  const kid = randomBytes(8).toString("hex");
  const publicJwk: JWK = { ...(await exportJWK(publicKey)), kid, alg: "ES256", use: "sig" };
  const nonces = new Map<string, number>();
  const devices = new Map<string, { refreshToken: string; akPublicKeyPem: string; cpuId: string }>();

  const mint = async (deviceId: string, cpuId: string): Promise<{ jwt: string; refreshToken: string; expiresIn: number }> => {
    const ttl = sim.tokenTtlSeconds;
    const jwt = await new SignJWT({
      device_id: deviceId,
      subscription_tier: "basic",
      features: ["updates", "remote-access", "backup"],
      update_channel: "stable",
      hardware_binding: { tpm_ek_hash: deviceId, cpu_id: cpuId },
    })
      .setProtectedHeader({ alg: "ES256", kid, typ: "JWT" })
      .setIssuer(issuer)
      .setAudience(DEVICE_AUDIENCE)
      .setSubject(deviceId)
      .setIssuedAt()
      .setJti(randomBytes(12).toString("hex"))
      .setExpirationTime(Math.floor(Date.now() / 1000) + ttl)
      .sign(privateKey);
    return { jwt, refreshToken: randomBytes(32).toString("base64url"), expiresIn: ttl };
  };

  const checkQuote = async (akPem: string, att: Record<string, unknown>): Promise<void> => {
    const nonceHex = str(att, "nonce");
    const dir = await mkdtemp(join(tmpdir(), "central-sim-"));
    try {
      await writeFile(join(dir, "ak.pem"), akPem);
      await writeFile(join(dir, "quote.msg"), Buffer.from(str(att, "quote"), "base64"));
      await writeFile(join(dir, "quote.sig"), Buffer.from(str(att, "signature"), "base64"));
      await writeFile(join(dir, "quote.pcrs"), Buffer.from(str(att, "pcrs"), "base64"));
      const hashAlg = typeof att["hash_algorithm"] === "string" && att["hash_algorithm"] ? att["hash_algorithm"] : "sha256";
      const env = { ...process.env };
      delete env["TPM2TOOLS_TCTI"]; // the verifier needs no TPM
      await new Promise<void>((resolve, reject) => {
        execFile(
          checkquote,
          ["-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig", "-f", "quote.pcrs", "-g", hashAlg, "-q", nonceHex],
          { cwd: dir, env, timeout: 30_000 },
          (err, _stdout, stderr) => {
            if (!err) return resolve();
            const why = String(stderr).split("\n").filter((l) => l.startsWith("ERROR")).join("; ") || err.message;
            reject(attestationFailed(`the quote does not verify: ${why}`));
          },
        );
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  };

  const register = async (body: Record<string, unknown>): Promise<unknown> => {
    const att = body["attestation"];
    if (typeof att !== "object" || att === null) throw new Refusal(400, "BAD_REQUEST", "attestation: expected an object");
    const a = att as Record<string, unknown>;
    const nonceHex = str(a, "nonce").toLowerCase();
    const issuedAt = nonces.get(nonceHex);
    // Single use: a nonce is spent by the first registration that names it, whatever the outcome.
    nonces.delete(nonceHex);
    if (issuedAt === undefined) throw attestationFailed("the nonce was not issued by this central or was already used");
    if (Date.now() - issuedAt > nonceTtlMs) throw attestationFailed("the nonce has expired");
    if (sim.failAttestation) throw attestationFailed("attestation refused by policy (failAttestation switch)");
    const ekPem = str(body, "ek_public_key");
    const { hash, der } = spkiHash(ekPem);
    if (str(body, "device_id").toLowerCase() !== hash) throw attestationFailed("device_id is not the SHA-256 of the EK public key");
    const certPem = typeof body["ek_certificate"] === "string" ? body["ek_certificate"] : "";
    if (certPem) {
      let certKey: Buffer;
      try {
        certKey = new X509Certificate(certPem).publicKey.export({ type: "spki", format: "der" });
      } catch {
        throw attestationFailed("ek_certificate is not an X.509 certificate");
      }
      if (!certKey.equals(der)) throw attestationFailed("the EK certificate is for another key");
    }
    const akPem = str(body, "ak_public_key");
    await checkQuote(akPem, a);
    if (sim.subscriptionExpired) throw new Refusal(403, "SUBSCRIPTION_EXPIRED", "the subscription of this device has expired");
    const info = (typeof body["device_info"] === "object" && body["device_info"] !== null ? body["device_info"] : {}) as Record<string, unknown>;
    const cpuId = typeof info["cpu_id"] === "string" ? info["cpu_id"] : "";
    const g = await mint(hash, cpuId);
    devices.set(hash, { refreshToken: g.refreshToken, akPublicKeyPem: akPem, cpuId });
    sim.issued.push({ deviceId: hash, kind: "register", jwt: g.jwt, refreshToken: g.refreshToken });
    return { jwt_token: g.jwt, refresh_token: g.refreshToken, expires_in: g.expiresIn };
  };

  const refresh = async (body: Record<string, unknown>, authorization: string | undefined): Promise<unknown> => {
    const deviceId = str(body, "device_id").toLowerCase();
    const d = devices.get(deviceId);
    if (!d) throw new Refusal(401, "DEVICE_NOT_REGISTERED", "this central does not know the device");
    const bearer = /^Bearer\s+(.+)$/i.exec(authorization ?? "")?.[1];
    if (!bearer) throw new Refusal(401, "UNAUTHENTICATED", "a bearer token is required");
    try {
      // An expired token still identifies the device for a refresh (the offline grace).
      const { payload } = await jwtVerify(bearer, publicKey, { issuer, audience: DEVICE_AUDIENCE, currentDate: new Date(0) });
      if (payload["device_id"] !== deviceId) throw new Error("another device's token");
    } catch (e) {
      throw new Refusal(401, "UNAUTHENTICATED", `the bearer token does not verify: ${(e as Error).message}`);
    }
    if (str(body, "refresh_token") !== d.refreshToken) throw new Refusal(401, "INVALID_REFRESH_TOKEN", "the refresh token is not the current one");
    if (sim.subscriptionExpired) throw new Refusal(403, "SUBSCRIPTION_EXPIRED", "the subscription of this device has expired");
    const g = await mint(deviceId, d.cpuId);
    d.refreshToken = g.refreshToken;
    sim.issued.push({ deviceId, kind: "refresh", jwt: g.jwt, refreshToken: g.refreshToken });
    return { jwt_token: g.jwt, refresh_token: g.refreshToken, expires_in: g.expiresIn };
  };

  const send = (res: ServerResponse, status: number, body: unknown): void => {
    const text = JSON.stringify(body);
    res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
    res.end(text);
  };

  const server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]!;
    const method = req.method ?? "GET";
    void (async () => {
      let status = 200;
      let out: unknown;
      try {
        if (sim.down) throw new Refusal(503, "UNAVAILABLE", "the central is down (down switch)");
        if (method === "GET" && path === "/.well-known/jwks.json") out = sim.jwks();
        else if (method === "POST" && path === "/api/v1/devices/nonce") {
          const nonce = randomBytes(32).toString("hex");
          nonces.set(nonce, Date.now());
          out = { nonce, expires_in: Math.floor(nonceTtlMs / 1000) };
        } else if (method === "POST" && path === "/api/v1/devices/register") {
          out = await register((await readBody(req)) as Record<string, unknown>);
        } else if (method === "POST" && path === "/api/v1/devices/refresh") {
          out = await refresh((await readBody(req)) as Record<string, unknown>, req.headers.authorization);
        } else throw new Refusal(404, "NOT_FOUND", `${method} ${path} is not part of the API`);
      } catch (e) {
        const r = e instanceof Refusal ? e : new Refusal(500, "INTERNAL", (e as Error).message);
        status = r.status;
        out = { error: r.error, message: r.message };
        sim.requests.push({ method, path, status, error: r.error, message: r.message });
        send(res, status, out);
        return;
      }
      sim.requests.push({ method, path, status });
      send(res, status, out);
    })();
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const port = (server.address() as { port: number }).port;

  const sim: CentralSim = {
    url: `http://127.0.0.1:${port}`,
    issuer,
    subscriptionExpired: false,
    failAttestation: false,
    down: false,
    tokenTtlSeconds: options.tokenTtlSeconds ?? 3600,
    issued: [],
    requests: [],
    devices,
    forget: (id) => void devices.delete(id),
    async verify(jwt) {
      const { payload } = await jwtVerify(jwt, publicKey, { issuer, audience: DEVICE_AUDIENCE });
      return payload as Record<string, unknown>;
    },
    jwks: () => ({ keys: [publicJwk] }),
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
  return sim;
}
