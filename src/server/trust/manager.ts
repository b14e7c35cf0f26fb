/**
 * The trust area's logic: the TPM identity and quotes, registration with Piccolo central (the
 * `trust.register` operation), the device token kept sealed to the TPM and refreshed in the
 * background with backoff, the offline grace period, and the sealed-secret API over the shared
 * CredentialStore. `deviceToken()` is what other areas (updates) send to Piccolo central.
 *
 * Tokens live in two sealed secrets (piccolod.device-token, piccolod.refresh-token) and in memory;
 * they never appear in a log line, an error message, an audit record or an RPC response. What is
 * not secret (expiry, claims, last error) is kept in <stateDir>/trust/registration.json.
 */
import { createHash } from "node:crypto";
import { mkdir, readFile, rename, writeFile } from "node:fs/promises";
import { arch, hostname } from "node:os";
import { join } from "node:path";
import type { Logger } from "pino";
import { Any } from "../../../gen/google/protobuf/any.js";
import {
  RegisterDeviceRequest,
  RegisterDeviceResult,
  RegistrationState,
  SealKey,
  type Registration,
  type Secret,
} from "../../../gen/piccolo/trust/v1/trust.js";
import { invalidArgument, notFound, PiccoloError, toPiccoloError } from "../errors.js";
import type { OperationKind, WorkerContext } from "../operations/manager.js";
import { buildInfo } from "../system/build-info.js";
import { readOsRelease } from "../system/os-release.js";
import { createCentralClient, type CentralClient, type DeviceClaims, type TokenGrant } from "./central.js";
import { checkSecretName, type CredentialInfo, type CredentialStore } from "./credentials.js";
import type { Quote, Tpm, TpmIdentity } from "./tpm.js";

/** Secret names the daemon keeps for itself; the secrets API refuses to write or delete them. */
export const RESERVED_PREFIX = "piccolod.";
const JWT_SECRET = "piccolod.device-token";
const REFRESH_SECRET = "piccolod.refresh-token";
/** The operation kind of RegisterDevice. */
export const REGISTER_KIND = "trust.register";
/** The PCRs quoted when a caller selects none. */
export const DEFAULT_PCR_SELECTION = "sha256:0,1,2,3,4,5,6,7";
/** Share of a token's lifetime after which the background refresh renews it. */
const REFRESH_AT = 0.8;
const MAX_TIMER_MS = 2 ** 31 - 1;

/** Options of createTrustManager. */
export interface TrustManagerOptions {
  readonly tpm: Tpm;
  readonly credentials: CredentialStore;
  /** <stateDir>/trust: the registration record and the AK record. */
  readonly dir: string;
  /** Piccolo central's base URL; "" when not configured. */
  readonly centralUrl: string;
  /** How long after the token's expiry the device keeps its standing while the central is unreachable. */
  readonly offlineGraceMs: number;
  /** First and largest retry delay of the background refresh after a failure. */
  readonly retryMinMs: number;
  readonly retryMaxMs: number;
  readonly osReleaseFiles: readonly string[];
  readonly log: Logger;
  /** The clock (tests). */
  readonly now?: () => number;
}

/** What registration.json holds (nothing secret). */
interface RegistrationRecord {
  centralUrl: string;
  deviceId: string;
  registeredAt: number;
  tokenIssuedAt: number;
  tokenExpiresAt: number;
  lastRefreshedAt: number;
  lastError: string;
  /** Set when the central said DEVICE_NOT_REGISTERED: the tokens are gone. */
  unregistered: boolean;
  /** Set when the central said SUBSCRIPTION_EXPIRED, cleared by the next grant. */
  subscriptionExpired: boolean;
  claims: {
    subscriptionTier: string;
    features: string[];
    updateChannel: string;
    tpmEkHash: string;
    cpuId: string;
    issuer: string;
  };
}

/** The trust manager. */
export interface TrustManager {
  tpmStatus(signal?: AbortSignal): ReturnType<Tpm["status"]>;
  identity(signal?: AbortSignal): Promise<TpmIdentity & { registration: Registration }>;
  attest(nonce: Buffer, selection: string, signal?: AbortSignal): Promise<Quote & { deviceId: string; akPublicPem: string }>;
  /** The `trust.register` operation kind. */
  readonly registerKind: OperationKind<RegisterDeviceRequest>;
  /** Checks a RegisterDevice request before its operation starts. */
  prepareRegister(request: RegisterDeviceRequest): RegisterDeviceRequest;
  /** Refreshes the device token now. */
  refreshNow(signal?: AbortSignal): Promise<Registration>;
  /** The registration as it stands. */
  registration(): Registration;
  /**
   * The device JWT to send to Piccolo central (updates), or undefined when the device is not
   * registered, its token is past the offline grace period, or the subscription has expired.
   */
  deviceToken(): Promise<string | undefined>;
  sealSecret(name: string, value: Buffer): Promise<Secret>;
  listSecrets(): Promise<{ secrets: Secret[]; sealKey: SealKey; warning: string; directory: string }>;
  deleteSecret(name: string): Promise<void>;
  /** Loads the registration and schedules the background refresh. */
  start(): Promise<void>;
  /** Stops the background refresh. */
  close(): void;
}

const ts = (ms: number | undefined): Date | undefined => (ms === undefined || ms <= 0 ? undefined : new Date(ms));

/** A stable identifier of the CPU and board: a hash, never a serial number in the clear. */
async function cpuId(): Promise<string> {
  const parts: string[] = [];
  try {
    const info = await readFile("/proc/cpuinfo", "utf8");
    const first = info.split("\n\n")[0] ?? "";
    for (const key of ["vendor_id", "model name", "cpu family", "model", "stepping", "CPU implementer", "CPU part"]) {
      const m = new RegExp(`^${key}\\s*:\\s*(.*)$`, "m").exec(first);
      if (m) parts.push(`${key}=${m[1]!.trim()}`);
    }
  } catch {
    // not Linux
  }
  try {
    parts.push(`board=${(await readFile("/sys/class/dmi/id/product_uuid", "utf8")).trim()}`);
  } catch {
    // not readable
  }
  return createHash("sha256").update(parts.join("\n")).digest("hex").slice(0, 32);
}

/** Checks a PCR selection list from a request and returns tpm2-tools' form. */
export function pcrSelectionString(selection: readonly { algorithm: string; pcrs: number[] }[], field = "pcr_selection"): string {
  if (selection.length === 0) return DEFAULT_PCR_SELECTION;
  if (selection.length > 4) throw invalidArgument(field, `at most 4 banks (got ${selection.length})`);
  const seen = new Set<string>();
  return selection
    .map((s, i) => {
      const alg = s.algorithm.trim().toLowerCase() || "sha256";
      if (!["sha1", "sha256", "sha384", "sha512"].includes(alg)) throw invalidArgument(`${field}[${i}].algorithm`, `expected sha1, sha256, sha384 or sha512, got ${JSON.stringify(s.algorithm)}`);
      if (seen.has(alg)) throw invalidArgument(`${field}[${i}].algorithm`, `${alg} is selected twice`);
      seen.add(alg);
      if (s.pcrs.length === 0) throw invalidArgument(`${field}[${i}].pcrs`, "select at least one PCR");
      for (const p of s.pcrs) if (!Number.isInteger(p) || p < 0 || p > 23) throw invalidArgument(`${field}[${i}].pcrs`, `PCR ${p} is not between 0 and 23`);
      return `${alg}:${[...new Set(s.pcrs)].sort((a, b) => a - b).join(",")}`;
    })
    .join("+");
}

/** Creates the trust manager. */
export function createTrustManager(o: TrustManagerOptions): TrustManager {
  const now = o.now ?? Date.now;
  const log = o.log;
  const recordPath = join(o.dir, "registration.json");
  let record: RegistrationRecord | undefined;
  let tokens: { jwt: string; refresh: string } | undefined;
  let timer: NodeJS.Timeout | undefined;
  let nextRefreshAt: number | undefined;
  let failures = 0;
  let closed = false;
  /** Why the last registration failed while there is no registration record yet. */
  let firstError = "";
  /** One registration or refresh at a time. */
  let chain: Promise<unknown> = Promise.resolve();
  const serial = <T>(work: () => Promise<T>): Promise<T> => {
    const p = chain.then(work);
    chain = p.catch(() => undefined);
    return p;
  };
  const clients = new Map<string, CentralClient>();
  const client = (url: string): CentralClient => {
    let c = clients.get(url);
    if (!c) clients.set(url, (c = createCentralClient(url)));
    return c;
  };

  const saveRecord = async (r: RegistrationRecord): Promise<void> => {
    await mkdir(o.dir, { recursive: true, mode: 0o700 });
    const tmp = `${recordPath}.${process.pid}.tmp`;
    await writeFile(tmp, JSON.stringify(r, null, 2) + "\n", { mode: 0o600 });
    await rename(tmp, recordPath);
    record = r;
  };

  const stateOf = (r: RegistrationRecord | undefined): RegistrationState => {
    if (!r || r.unregistered) return RegistrationState.REGISTRATION_STATE_UNREGISTERED;
    if (r.subscriptionExpired) return RegistrationState.REGISTRATION_STATE_SUBSCRIPTION_EXPIRED;
    const t = now();
    if (t < r.tokenExpiresAt) return RegistrationState.REGISTRATION_STATE_ACTIVE;
    if (t < r.tokenExpiresAt + o.offlineGraceMs) return RegistrationState.REGISTRATION_STATE_OFFLINE_GRACE;
    return RegistrationState.REGISTRATION_STATE_EXPIRED;
  };

  const registration = (): Registration => {
    const r = record;
    return {
      state: stateOf(r),
      centralUrl: r?.centralUrl ?? o.centralUrl,
      registeredAt: ts(r?.registeredAt),
      tokenExpiresAt: r && !r.unregistered ? ts(r.tokenExpiresAt) : undefined,
      graceEndsAt: r && !r.unregistered ? ts(r.tokenExpiresAt + o.offlineGraceMs) : undefined,
      lastRefreshedAt: ts(r?.lastRefreshedAt),
      nextRefreshAt: ts(nextRefreshAt),
      lastError: r ? r.lastError : firstError,
      subscriptionTier: r?.claims.subscriptionTier ?? "",
      features: r?.claims.features ?? [],
      updateChannel: r?.claims.updateChannel ?? "",
      tpmEkHash: r?.claims.tpmEkHash ?? "",
      cpuId: r?.claims.cpuId ?? "",
      issuer: r?.claims.issuer ?? "",
    };
  };

  const loadTokens = async (): Promise<{ jwt: string; refresh: string }> => {
    if (tokens) return tokens;
    const jwt = (await o.credentials.unseal(JWT_SECRET)).toString("utf8");
    const refresh = (await o.credentials.unseal(REFRESH_SECRET)).toString("utf8");
    tokens = { jwt, refresh };
    return tokens;
  };

  /** Checks a grant (signature, audience, hardware binding), seals it and records it. */
  const accept = async (grant: TokenGrant, central: CentralClient, identity: TpmIdentity, registeredAt: number, ctx?: WorkerContext): Promise<void> => {
    ctx?.progress({ phase: "verify", phaseIndex: 5, phaseCount: 6, percent: 75, message: "checking the token against the central's keys" });
    const claims: DeviceClaims = await central.verify(grant.jwt_token);
    const bound = claims.hardware_binding?.tpm_ek_hash ?? "";
    if (bound.toLowerCase() !== identity.deviceId) {
      throw new PiccoloError(
        "failed_precondition",
        `Piccolo central issued a token bound to another TPM (hardware_binding.tpm_ek_hash ${JSON.stringify(bound)}, this device is ${identity.deviceId}); it was not kept`,
        { reason: "TPM_ATTESTATION_FAILED" },
      );
    }
    ctx?.progress({ phase: "seal", phaseIndex: 6, phaseCount: 6, percent: 85, message: "sealing the token to the TPM" });
    await o.credentials.seal(JWT_SECRET, Buffer.from(grant.jwt_token, "utf8"));
    await o.credentials.seal(REFRESH_SECRET, Buffer.from(grant.refresh_token, "utf8"));
    tokens = { jwt: grant.jwt_token, refresh: grant.refresh_token };
    const t = now();
    const expiresAt = typeof claims.exp === "number" ? claims.exp * 1000 : t + grant.expires_in * 1000;
    await saveRecord({
      centralUrl: central.baseUrl,
      deviceId: identity.deviceId,
      registeredAt,
      tokenIssuedAt: t,
      tokenExpiresAt: expiresAt,
      lastRefreshedAt: t,
      lastError: "",
      unregistered: false,
      subscriptionExpired: false,
      claims: {
        subscriptionTier: String(claims.subscription_tier ?? ""),
        features: Array.isArray(claims.features) ? claims.features.map(String) : [],
        updateChannel: String(claims.update_channel ?? ""),
        tpmEkHash: bound.toLowerCase(),
        cpuId: String(claims.hardware_binding?.cpu_id ?? ""),
        issuer: String(claims.iss ?? ""),
      },
    });
  };

  /** Records a refusal or failure of the central on the registration. */
  const noteFailure = async (e: PiccoloError): Promise<void> => {
    if (!record) {
      firstError = `${e.reason ?? e.kind.toUpperCase()}: ${e.message}`;
      return;
    }
    const r: RegistrationRecord = { ...record, lastError: `${e.reason ?? e.kind.toUpperCase()}: ${e.message}` };
    if (e.reason === "DEVICE_NOT_REGISTERED") {
      r.unregistered = true;
      tokens = undefined;
      await o.credentials.remove(JWT_SECRET);
      await o.credentials.remove(REFRESH_SECRET);
    }
    if (e.reason === "SUBSCRIPTION_EXPIRED") r.subscriptionExpired = true;
    await saveRecord(r);
  };

  const refreshOnce = (signal?: AbortSignal): Promise<Registration> =>
    serial(async () => {
      const r = record;
      if (!r || r.unregistered) {
        throw new PiccoloError("failed_precondition", "the device is not registered with Piccolo central; run RegisterDevice first", { reason: "DEVICE_NOT_REGISTERED" });
      }
      const central = client(r.centralUrl);
      try {
        const identity = await o.tpm.identity(signal);
        const t = await loadTokens();
        const grant = await central.refresh(r.deviceId, t.refresh, t.jwt, signal);
        await accept(grant, central, identity, r.registeredAt);
        log.info({ deviceId: r.deviceId, expiresAt: new Date(record!.tokenExpiresAt).toISOString() }, "device token refreshed");
        return registration();
      } catch (err) {
        const e = toPiccoloError(err);
        await noteFailure(e);
        throw e;
      }
    });

  const schedule = (delayMs: number): void => {
    if (timer) clearTimeout(timer);
    timer = undefined;
    nextRefreshAt = undefined;
    if (closed) return;
    const d = Math.min(MAX_TIMER_MS, Math.max(0, Math.round(delayMs)));
    nextRefreshAt = now() + d;
    timer = setTimeout(() => void backgroundRefresh(), d);
    timer.unref();
  };

  /** When the current token should be renewed. */
  const dueIn = (): number => {
    const r = record!;
    const at = r.tokenIssuedAt + (r.tokenExpiresAt - r.tokenIssuedAt) * REFRESH_AT;
    return Math.max(1000, at - now());
  };

  const backgroundRefresh = async (): Promise<void> => {
    timer = undefined;
    nextRefreshAt = undefined;
    try {
      await refreshOnce();
      failures = 0;
      if (record && !record.unregistered) schedule(dueIn());
    } catch (e) {
      const pe = toPiccoloError(e);
      if (record?.unregistered) {
        log.warn({ reason: pe.reason, err: pe.message }, "Piccolo central no longer knows this device; background refresh stopped");
        return;
      }
      failures++;
      const base = Math.min(o.retryMaxMs, o.retryMinMs * 2 ** Math.min(failures - 1, 30));
      const delay = base * (0.8 + Math.random() * 0.4);
      log.warn({ reason: pe.reason, err: pe.message, failures, retryInMs: Math.round(delay), state: RegistrationState[stateOf(record)] }, "device token refresh failed");
      schedule(delay);
    }
  };

  const registerKind: OperationKind<RegisterDeviceRequest> = {
    kind: REGISTER_KIND,
    requestType: "piccolo.trust.v1.RegisterDeviceRequest",
    encodeRequest: (r) => RegisterDeviceRequest.encode(r).finish(),
    exclusive: false,
    single: true,
    cancellable: true,
    run: (_req, ctx) =>
      serial(async () => {
        const central = client(o.centralUrl);
        ctx.progress({ phase: "identity", phaseIndex: 1, phaseCount: 6, percent: 0, message: "reading the TPM identity (the attestation key is made on first use)" });
        const identity = await o.tpm.identity(ctx.signal);
        ctx.progress({ phase: "nonce", phaseIndex: 2, phaseCount: 6, percent: 20, message: `asking ${central.baseUrl} for a nonce` });
        const { nonce } = await central.nonce(ctx.signal);
        ctx.progress({ phase: "quote", phaseIndex: 3, phaseCount: 6, percent: 35, message: `quoting ${DEFAULT_PCR_SELECTION} over the nonce` });
        const q = await o.tpm.quote(nonce, DEFAULT_PCR_SELECTION, ctx.signal);
        ctx.progress({ phase: "register", phaseIndex: 4, phaseCount: 6, percent: 50, message: `registering device ${identity.deviceId}` });
        const os = await readOsRelease(o.osReleaseFiles).catch(() => undefined);
        const grant = await central.register(
          {
            device_id: identity.deviceId,
            ek_certificate: identity.ekCertificatePem,
            ek_public_key: identity.ekPublicPem,
            ak_public_key: identity.akPublicPem,
            attestation: {
              nonce: nonce.toString("hex"),
              quote: q.quote.toString("base64"),
              signature: q.signature.toString("base64"),
              pcrs: q.pcrs.toString("base64"),
              pcr_selection: q.selection,
              hash_algorithm: q.hashAlgorithm,
            },
            device_info: {
              hostname: hostname(),
              os_version: os?.prettyName || os?.versionId || "",
              piccolod_version: buildInfo().version,
              cpu_id: await cpuId(),
              arch: arch(),
            },
          },
          ctx.signal,
        ).catch(async (e: unknown) => {
          await noteFailure(toPiccoloError(e));
          throw e;
        });
        await accept(grant, central, identity, now(), ctx);
        failures = 0;
        schedule(dueIn());
        log.info({ deviceId: identity.deviceId, central: central.baseUrl, expiresAt: new Date(record!.tokenExpiresAt).toISOString() }, "device registered with Piccolo central");
        return Any.fromPartial({
          typeUrl: "type.googleapis.com/piccolo.trust.v1.RegisterDeviceResult",
          value: RegisterDeviceResult.encode({ deviceId: identity.deviceId, registration: registration() }).finish(),
        });
      }),
    recover() {
      return Promise.resolve("nothing was left behind; the registration record is written last, so it is as it was or complete");
    },
  };

  const toSecret = (c: CredentialInfo): Secret => ({
    name: c.name,
    path: c.path,
    credentialName: c.credentialName,
    sealedWith: c.sealedWith === "tpm2" ? SealKey.SEAL_KEY_TPM2 : c.sealedWith === "host" ? SealKey.SEAL_KEY_HOST : SealKey.SEAL_KEY_UNSPECIFIED,
    sealedBytes: c.sealedBytes,
    updatedAt: c.updatedAt,
    reserved: c.name.startsWith(RESERVED_PREFIX),
  });
  const userName = (name: string): string => {
    checkSecretName(name);
    if (name.startsWith(RESERVED_PREFIX)) throw invalidArgument("name", `names starting with "${RESERVED_PREFIX}" are the daemon's own secrets`);
    return name;
  };

  return {
    tpmStatus: (signal) => o.tpm.status(signal),
    async identity(signal) {
      return { ...(await o.tpm.identity(signal)), registration: registration() };
    },
    async attest(nonce, selection, signal) {
      const id = await o.tpm.identity(signal);
      return { ...(await o.tpm.quote(nonce, selection, signal)), deviceId: id.deviceId, akPublicPem: id.akPublicPem };
    },
    registerKind,
    prepareRegister(req) {
      if (!o.centralUrl) {
        throw new PiccoloError("failed_precondition", "no Piccolo central is configured: set centralUrl in the daemon's configuration", {
          reason: "CENTRAL_NOT_CONFIGURED",
        });
      }
      return req;
    },
    async refreshNow(signal) {
      const reg = await refreshOnce(signal);
      failures = 0;
      if (record && !record.unregistered) schedule(dueIn());
      return { ...reg, nextRefreshAt: ts(nextRefreshAt) };
    },
    registration,
    async deviceToken() {
      const s = stateOf(record);
      if (s !== RegistrationState.REGISTRATION_STATE_ACTIVE && s !== RegistrationState.REGISTRATION_STATE_OFFLINE_GRACE) return undefined;
      try {
        return (await loadTokens()).jwt;
      } catch (e) {
        log.warn({ err: toPiccoloError(e).message }, "the sealed device token cannot be read");
        return undefined;
      }
    },
    async sealSecret(name, value) {
      return toSecret(await o.credentials.seal(userName(name), value));
    },
    async listSecrets() {
      const key = await o.credentials.sealKey();
      return {
        secrets: (await o.credentials.list()).map(toSecret),
        sealKey: key === "tpm2" ? SealKey.SEAL_KEY_TPM2 : SealKey.SEAL_KEY_HOST,
        warning:
          key === "host"
            ? `no TPM (${o.tpm.device}): new secrets are sealed to the host key /var/lib/systemd/credential.secret only, which anyone with root on a copy of the disk can read`
            : "",
        directory: o.credentials.dir,
      };
    },
    async deleteSecret(name) {
      if (!(await o.credentials.remove(userName(name)))) throw notFound("secret", name);
    },
    async start() {
      try {
        const r = JSON.parse(await readFile(recordPath, "utf8")) as RegistrationRecord;
        if (typeof r.tokenExpiresAt === "number" && typeof r.centralUrl === "string") record = r;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== "ENOENT") {
          log.warn({ err: (e as Error).message, file: recordPath }, "registration record unreadable; the device counts as unregistered");
        }
      }
      if (record && !record.unregistered) schedule(dueIn());
      // Make (or find) the attestation key now, off the start-up path: on a hardware TPM the first
      // RSA key generation takes seconds, which GetDeviceIdentity should not have to wait for.
      void o.tpm.identity().then(
        (id) => log.info({ deviceId: id.deviceId, akHandle: id.akHandle }, "TPM identity ready"),
        (e: unknown) => log.info({ err: toPiccoloError(e).message }, "no TPM identity"),
      );
    },
    close() {
      closed = true;
      if (timer) clearTimeout(timer);
      timer = undefined;
    },
  };
}
