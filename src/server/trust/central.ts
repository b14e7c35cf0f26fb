/**
 * The device side of Piccolo central's API: nonce, registration, token refresh, and checking the
 * tokens it issues against its JWKS. The central's refusals (DEVICE_NOT_REGISTERED,
 * SUBSCRIPTION_EXPIRED, TPM_ATTESTATION_FAILED) become FAILED_PRECONDITION with that reason; a
 * central that cannot be reached, or fails itself, is UNAVAILABLE (CENTRAL_UNAVAILABLE). Tokens
 * are never put in an error message or a log line.
 */
import { createRemoteJWKSet, jwtVerify, type JWTPayload } from "jose";
import { PiccoloError } from "../errors.js";

/** The audience Piccolo central puts in device tokens. */
export const DEVICE_TOKEN_AUDIENCE = "piccolod";

/** The reasons the central answers with that piccolod tells apart. */
export const CENTRAL_REASONS = ["DEVICE_NOT_REGISTERED", "SUBSCRIPTION_EXPIRED", "TPM_ATTESTATION_FAILED"] as const;

/** A quote as the registration carries it. */
export interface AttestationBody {
  /** Hex. */
  readonly nonce: string;
  /** Base64 TPMS_ATTEST. */
  readonly quote: string;
  /** Base64 TPMT_SIGNATURE. */
  readonly signature: string;
  /** Base64 PCR values in tpm2-tools' form. */
  readonly pcrs: string;
  readonly pcr_selection: string;
  readonly hash_algorithm: string;
}

/** The body of POST /api/v1/devices/register. */
export interface RegisterBody {
  readonly device_id: string;
  /** PEM, or "" when the TPM has no EK certificate. */
  readonly ek_certificate: string;
  readonly ek_public_key: string;
  readonly ak_public_key: string;
  readonly attestation: AttestationBody;
  readonly device_info: Readonly<Record<string, string>>;
}

/** What registration and refresh answer. */
export interface TokenGrant {
  readonly jwt_token: string;
  readonly refresh_token: string;
  readonly expires_in: number;
}

/** The claims piccolod reads from a device token. */
export interface DeviceClaims extends JWTPayload {
  device_id?: string;
  subscription_tier?: string;
  features?: string[];
  update_channel?: string;
  hardware_binding?: { tpm_ek_hash?: string; cpu_id?: string };
}

/** A client for one central. */
export interface CentralClient {
  readonly baseUrl: string;
  nonce(signal?: AbortSignal): Promise<{ nonce: Buffer; expiresIn: number }>;
  register(body: RegisterBody, signal?: AbortSignal): Promise<TokenGrant>;
  refresh(deviceId: string, refreshToken: string, jwt: string | undefined, signal?: AbortSignal): Promise<TokenGrant>;
  /** Verifies a token's signature (JWKS), audience and expiry; returns its claims. */
  verify(token: string): Promise<DeviceClaims>;
}

const REQUEST_TIMEOUT_MS = 30_000;

/** Creates a client for the central at `baseUrl`. */
export function createCentralClient(baseUrl: string): CentralClient {
  const base = baseUrl.replace(/\/+$/, "");
  const jwks = createRemoteJWKSet(new URL(`${base}/.well-known/jwks.json`), { timeoutDuration: REQUEST_TIMEOUT_MS });

  const call = async (path: string, body: unknown, signal: AbortSignal | undefined, bearer?: string): Promise<unknown> => {
    const url = `${base}${path}`;
    const timeout = AbortSignal.timeout(REQUEST_TIMEOUT_MS);
    let res: Response;
    try {
      res = await fetch(url, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "application/json", ...(bearer ? { authorization: `Bearer ${bearer}` } : {}) },
        body: JSON.stringify(body),
        signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
      });
    } catch (e) {
      if (signal?.aborted) throw new PiccoloError("cancelled", `the request to Piccolo central (${url}) was cancelled`, { cause: e });
      const why = ((e as { cause?: { code?: string; message?: string } }).cause?.code ?? (e as Error).message) || "no answer";
      throw new PiccoloError("unavailable", `Piccolo central at ${base} cannot be reached (${why})`, { reason: "CENTRAL_UNAVAILABLE", cause: e });
    }
    const text = await res.text();
    let json: unknown;
    try {
      json = text === "" ? {} : JSON.parse(text);
    } catch {
      json = undefined;
    }
    if (res.ok) {
      if (json === undefined) throw new PiccoloError("unavailable", `Piccolo central at ${base} answered ${path} with something that is not JSON`, { reason: "CENTRAL_UNAVAILABLE" });
      return json;
    }
    const err = (json ?? {}) as { error?: unknown; message?: unknown };
    const code = typeof err.error === "string" ? err.error : "";
    const message = typeof err.message === "string" ? err.message.slice(0, 500) : "";
    if ((CENTRAL_REASONS as readonly string[]).includes(code)) {
      const hint =
        code === "DEVICE_NOT_REGISTERED"
          ? "register the device again (piccoloctl trust register)"
          : code === "SUBSCRIPTION_EXPIRED"
            ? "renew the subscription; piccolod keeps retrying"
            : "the central could not verify this TPM's quote";
      throw new PiccoloError("failed_precondition", `Piccolo central refused: ${code}${message ? `: ${message}` : ""} (${hint})`, {
        reason: code,
        metadata: { central_url: base },
      });
    }
    if (res.status >= 500 || res.status === 429) {
      throw new PiccoloError("unavailable", `Piccolo central at ${base} failed: HTTP ${res.status}${code ? ` ${code}` : ""}${message ? `: ${message}` : ""}`, {
        reason: "CENTRAL_UNAVAILABLE",
      });
    }
    throw new PiccoloError("failed_precondition", `Piccolo central refused ${path}: HTTP ${res.status}${code ? ` ${code}` : ""}${message ? `: ${message}` : ""}`, {
      reason: code || "CENTRAL_REFUSED",
    });
  };

  const grant = (j: unknown, path: string): TokenGrant => {
    const g = j as Partial<TokenGrant>;
    if (typeof g.jwt_token !== "string" || typeof g.refresh_token !== "string" || typeof g.expires_in !== "number" || g.expires_in <= 0) {
      throw new PiccoloError("unavailable", `Piccolo central at ${base} answered ${path} without jwt_token, refresh_token and expires_in`, { reason: "CENTRAL_UNAVAILABLE" });
    }
    return { jwt_token: g.jwt_token, refresh_token: g.refresh_token, expires_in: g.expires_in };
  };

  return {
    baseUrl: base,
    async nonce(signal) {
      const j = (await call("/api/v1/devices/nonce", {}, signal)) as { nonce?: unknown; expires_in?: unknown };
      if (typeof j.nonce !== "string" || !/^[0-9a-f]{16,64}$/i.test(j.nonce) || j.nonce.length % 2 !== 0) {
        throw new PiccoloError("unavailable", `Piccolo central at ${base} sent no usable nonce (expected 8-32 bytes in hex)`, { reason: "CENTRAL_UNAVAILABLE" });
      }
      return { nonce: Buffer.from(j.nonce, "hex"), expiresIn: typeof j.expires_in === "number" ? j.expires_in : 0 };
    },
    async register(body, signal) {
      return grant(await call("/api/v1/devices/register", body, signal), "/api/v1/devices/register");
    },
    async refresh(deviceId, refreshToken, jwt, signal) {
      return grant(await call("/api/v1/devices/refresh", { device_id: deviceId, refresh_token: refreshToken }, signal, jwt), "/api/v1/devices/refresh");
    },
    async verify(token) {
      try {
        const { payload } = await jwtVerify<DeviceClaims>(token, jwks, { audience: DEVICE_TOKEN_AUDIENCE, clockTolerance: 30 });
        return payload;
      } catch (e) {
        const code = (e as { code?: string }).code ?? "";
        if (code === "ERR_JWKS_TIMEOUT" || code === "ERR_JOSE_GENERIC" || (e as Error).name === "TypeError") {
          throw new PiccoloError("unavailable", `Piccolo central's keys (${base}/.well-known/jwks.json) cannot be fetched: ${(e as Error).message}`, {
            reason: "CENTRAL_UNAVAILABLE",
            cause: e,
          });
        }
        throw new PiccoloError("failed_precondition", `the token Piccolo central issued does not verify: ${(e as Error).message}`, {
          reason: "TOKEN_INVALID",
          cause: e,
        });
      }
    },
  };
}
