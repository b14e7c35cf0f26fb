/**
 * Trust end to end: the real daemon on a real swtpm (manufactured, with an EK certificate) and the
 * reference Piccolo central. Quotes are checked with tpm2_checkquote run here; sealed files with
 * systemd-creds run here; tokens are read from the central's record of what it issued.
 */
import { spawnSync } from "node:child_process";
import { createHash, createPublicKey, X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import { decodeJwt } from "jose";
import { ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import { OperationState as S, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { RegisterDeviceResult, RegistrationState as R, SealKey, type DeviceIdentity } from "../gen/piccolo/trust/v1/trust.js";
import { RestError } from "../src/clients/rest-transport.js";
import { flushTpmContexts } from "../src/server/trust/credentials.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";
import { startCentralSim, type CentralSim } from "./sim/central.js";

const GRACE_MS = 8000;
let swtpm: Swtpm;
let central: CentralSim;
let d: TestDaemon;
let work: string;

beforeAll(async () => {
  swtpm = await startSwtpm({ manufacture: true });
  central = await startCentralSim({ tokenTtlSeconds: 3600 });
  work = await mkdtemp(join(tmpdir(), "trust-test-"));
  d = await startTestDaemon({
    extraArgs: [
      "--tpm2-device", swtpm.tcti,
      "--central-url", central.url,
      "--trust-offline-grace-ms", String(GRACE_MS),
      "--trust-retry-min-ms", "200",
      "--trust-retry-max-ms", "1000",
    ],
  });
});

afterAll(async () => {
  await d?.cleanup();
  await central?.close();
  await swtpm?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls `probe` until it returns a value that is not undefined, or fails after `timeoutMs`. */
async function until<T>(what: string, probe: () => Promise<T | undefined>, timeoutMs = 60_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${(last as Error).message})` : ""}`);
    await sleep(150);
  }
}

async function collect(stream: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const e of stream) out.push(e);
  return out;
}
const outcome = (events: OperationEvent[]) => events[events.length - 1]!.outcome!;

async function grpcError(p: Promise<unknown>): Promise<grpc.ServiceError> {
  try {
    await p;
  } catch (e) {
    return e as grpc.ServiceError;
  }
  throw new Error("expected the call to fail");
}
const reasonOf = (err: grpc.ServiceError): string => {
  const st = Status.decode(err.metadata.get("grpc-status-details-bin")[0] as Buffer);
  return ErrorInfo.decode(st.details.find((a) => a.typeUrl.endsWith("google.rpc.ErrorInfo"))!.value).reason;
};
const statusReason = (st: Status | undefined): string =>
  ErrorInfo.decode(st!.details.find((a) => a.typeUrl.endsWith("google.rpc.ErrorInfo"))!.value).reason;

const sha256Spki = (pem: string): string =>
  createHash("sha256").update(createPublicKey(pem).export({ type: "spki", format: "der" })).digest("hex");

const decrypt = (path: string, name: string) =>
  spawnSync("systemd-creds", ["decrypt", `--name=${name}`, `--tpm2-device=${swtpm.tcti}`, path, "-"], { encoding: "utf8" });

let identity: DeviceIdentity;

describe("TPM and identity", () => {
  test("GetTpmStatus reports the swtpm: manufacturer, firmware, PCR banks, lockout", async () => {
    const s = await d.grpcTcp().trust.getTpmStatus({});
    expect(s.present).toBe(true);
    expect(s.device).toBe(swtpm.tcti);
    expect(s.manufacturer).toBe("IBM");
    expect(s.firmwareVersion).toMatch(/^\d+\.\d+ \(0x[0-9a-f]{8} 0x[0-9a-f]{8}\)$/);
    expect(s.specRevision).toMatch(/^\d+\.\d+$/);
    const sha256 = s.pcrBanks.find((b) => b.algorithm === "sha256");
    expect(sha256?.pcrs).toEqual(Array.from({ length: 24 }, (_, i) => i));
    expect(s.lockout).toMatchObject({ inLockout: false, failedTries: 0 });
    expect(s.lockout!.maxTries).toBeGreaterThan(0);
  });

  test("GetDeviceIdentity: device id is the SHA-256 of the EK public key, which the EK certificate holds", async () => {
    identity = await d.rest().trust.getDeviceIdentity({});
    expect(identity.deviceId).toMatch(/^[0-9a-f]{64}$/);
    expect(identity.deviceId).toBe(sha256Spki(identity.ekPublicKeyPem));
    const cert = new X509Certificate(identity.ekCertificatePem);
    expect(cert.issuer).toContain("swtpm");
    expect(createHash("sha256").update(cert.publicKey.export({ type: "spki", format: "der" })).digest("hex")).toBe(identity.deviceId);
    expect(identity.akPublicKeyPem).toMatch(/BEGIN PUBLIC KEY/);
    expect(identity.akHandle).toBe("0x81000ae0");
    expect(identity.registration!.state).toBe(R.REGISTRATION_STATE_UNREGISTERED);
    // The AK is persistent in the TPM, as tpm2-tools sees it.
    const rp = spawnSync("tpm2_readpublic", ["-c", identity.akHandle], { env: { ...process.env, ...swtpm.env }, encoding: "utf8" });
    expect(rp.stdout).toContain(`name: ${identity.akName}`);
    expect(rp.stdout).toMatch(/restricted\|sign/);
    spawnSync("tpm2_flushcontext", ["-t"], { env: { ...process.env, ...swtpm.env } });
  });

  test("Attest output verifies with tpm2_checkquote; another nonce does not", async () => {
    const nonce = Buffer.from("c0ffee" + "11".repeat(29), "hex");
    const q = await d.grpcTcp().trust.attest({ nonce, pcrSelection: [{ algorithm: "sha256", pcrs: [0, 1, 2, 7] }] });
    expect(q.pcrSelection).toBe("sha256:0,1,2,7");
    expect(q.pcrValues.map((p) => p.index)).toEqual([0, 1, 2, 7]);
    expect(q.pcrValues.every((p) => p.algorithm === "sha256" && p.value.length === 32)).toBe(true);
    expect(q.deviceId).toBe(identity.deviceId);
    expect(q.akPublicKeyPem).toBe(identity.akPublicKeyPem);
    await writeFile(join(work, "ak.pem"), q.akPublicKeyPem);
    await writeFile(join(work, "quote.msg"), q.quote);
    await writeFile(join(work, "quote.sig"), q.signature);
    await writeFile(join(work, "quote.pcrs"), q.pcrs);
    const env = { ...process.env };
    delete env["TPM2TOOLS_TCTI"];
    const args = ["-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig", "-f", "quote.pcrs", "-g", q.hashAlgorithm];
    const ok = spawnSync("tpm2_checkquote", [...args, "-q", nonce.toString("hex")], { cwd: work, env, encoding: "utf8" });
    expect(ok.stderr).toBe("");
    expect(ok.status).toBe(0);
    const wrong = spawnSync("tpm2_checkquote", [...args, "-q", "22".repeat(32)], { cwd: work, env, encoding: "utf8" });
    expect(wrong.status).not.toBe(0);
    expect(wrong.stderr).toMatch(/nonce/i);
  });

  test("Attest over REST with the default PCRs; bad nonces and PCRs name the field", async () => {
    const q = await d.rest().trust.attest({ nonce: Buffer.from("abc"), pcrSelection: [] });
    expect(q.pcrSelection).toBe("sha256:0,1,2,3,4,5,6,7");
    expect(q.pcrValues).toHaveLength(8);
    const c = d.grpcTcp().trust;
    for (const [req, field] of [
      [{ nonce: Buffer.alloc(0), pcrSelection: [] }, "nonce"],
      [{ nonce: Buffer.alloc(33, 1), pcrSelection: [] }, "nonce"],
      [{ nonce: Buffer.from("x"), pcrSelection: [{ algorithm: "md5", pcrs: [0] }] }, "pcr_selection[0].algorithm"],
      [{ nonce: Buffer.from("x"), pcrSelection: [{ algorithm: "sha256", pcrs: [24] }] }, "pcr_selection[0].pcrs"],
    ] as const) {
      const e = await grpcError(c.attest(req as never));
      expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(e.details.startsWith(`${field}:`)).toBe(true);
    }
  });

  test("the identity (EK and AK) is the same after a restart", async () => {
    await d.stop();
    await d.restart();
    const again = await d.grpcTcp().trust.getDeviceIdentity({});
    expect(again.deviceId).toBe(identity.deviceId);
    expect(again.akName).toBe(identity.akName);
    expect(again.akPublicKeyPem).toBe(identity.akPublicKeyPem);
  });
});

describe("registration with Piccolo central", () => {
  let jwt = "";
  afterEach(() => {
    // A failed test must not leave the central switched for the next one.
    central.down = false;
    central.subscriptionExpired = false;
    central.failAttestation = false;
    central.tokenTtlSeconds = 3600;
  });

  test("RegisterDevice yields a JWT whose hardware_binding matches GetDeviceIdentity, sealed to the TPM", async () => {
    const events = await collect(d.grpcTcp().trust.registerDevice({}));
    expect(events[0]!.attached?.kind).toBe("trust.register");
    const phases = events.filter((e) => e.progress).map((e) => e.progress!.phase);
    expect(phases).toEqual(expect.arrayContaining(["identity", "nonce", "quote", "register", "verify", "seal"]));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
    const result = RegisterDeviceResult.decode(outcome(events).result!.value);
    expect(result.deviceId).toBe(identity.deviceId);

    const issued = central.issued.filter((t) => t.kind === "register");
    expect(issued).toHaveLength(1);
    jwt = issued[0]!.jwt;
    const claims = decodeJwt(jwt) as { hardware_binding: { tpm_ek_hash: string; cpu_id: string }; device_id: string };
    const id = await d.grpcTcp().trust.getDeviceIdentity({});
    expect(claims.hardware_binding.tpm_ek_hash).toBe(id.deviceId);
    expect(claims.device_id).toBe(id.deviceId);
    const reg = id.registration!;
    expect(reg.state).toBe(R.REGISTRATION_STATE_ACTIVE);
    expect(reg.tpmEkHash).toBe(id.deviceId);
    expect(reg.cpuId).toBe(claims.hardware_binding.cpu_id);
    expect(reg.cpuId).toMatch(/^[0-9a-f]{32}$/);
    expect(reg.subscriptionTier).toBe("basic");
    expect(reg.updateChannel).toBe("stable");
    expect(reg.issuer).toBe(central.issuer);
    expect(reg.centralUrl).toBe(central.url);
    expect(Math.abs(reg.tokenExpiresAt!.getTime() - decodeJwt(jwt).exp! * 1000)).toBeLessThan(1000);
    expect(reg.graceEndsAt!.getTime() - reg.tokenExpiresAt!.getTime()).toBe(GRACE_MS);
    expect(reg.nextRefreshAt!.getTime()).toBeLessThan(reg.tokenExpiresAt!.getTime());

    // The token and refresh token are sealed to the TPM, under the daemon's own names.
    const secrets = await d.grpcTcp().trust.listSecrets({});
    const own = secrets.secrets.filter((s) => s.reserved).map((s) => s.name);
    expect(own).toEqual(["piccolod.device-token", "piccolod.refresh-token"]);
    const file = secrets.secrets.find((s) => s.name === "piccolod.device-token")!;
    expect(file.sealedWith).toBe(SealKey.SEAL_KEY_TPM2);
    expect((await readFile(file.path)).includes(Buffer.from(jwt.slice(0, 20)))).toBe(false);
    const plain = decrypt(file.path, file.credentialName);
    expect(plain.status).toBe(0);
    expect(plain.stdout).toBe(jwt);
  });

  test("RefreshDeviceToken gets a new token and rotates the sealed refresh token", async () => {
    const before = central.issued.length;
    const reg = await d.rest().trust.refreshDeviceToken({});
    expect(reg.state).toBe(R.REGISTRATION_STATE_ACTIVE);
    expect(central.issued.length).toBe(before + 1);
    const latest = central.issued[central.issued.length - 1]!;
    expect(latest.kind).toBe("refresh");
    expect(latest.jwt).not.toBe(jwt);
    const secrets = await d.grpcTcp().trust.listSecrets({});
    const rt = secrets.secrets.find((s) => s.name === "piccolod.refresh-token")!;
    expect(decrypt(rt.path, rt.credentialName).stdout).toBe(latest.refreshToken);
  });

  test("the background refresh renews a short-lived token by itself", async () => {
    central.tokenTtlSeconds = 4;
    await d.grpcTcp().trust.refreshDeviceToken({});
    const start = central.issued.length;
    await until("two background refreshes", async () => (central.issued.length >= start + 2 ? true : undefined), 60_000);
    const reg = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
    expect(reg.state).toBe(R.REGISTRATION_STATE_ACTIVE);
    expect(reg.lastError).toBe("");
    expect(central.requests.filter((r) => r.path === "/api/v1/devices/refresh" && r.status !== 200)).toEqual([]);
  });

  test("while the central is down: offline grace after expiry, then expired; back to active when it returns", async () => {
    central.tokenTtlSeconds = 4;
    await d.grpcTcp().trust.refreshDeviceToken({});
    central.down = true;
    // Past the token's expiry, once a refresh attempt has failed (on a busy machine the first
    // attempt may still be under way when the token expires).
    const grace = await until("OFFLINE_GRACE with a failed refresh", async () => {
      const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
      return r.state === R.REGISTRATION_STATE_OFFLINE_GRACE && r.lastError !== "" ? r : undefined;
    });
    expect(grace.lastError).toMatch(/^CENTRAL_UNAVAILABLE: .*503/);
    expect(Date.now()).toBeGreaterThanOrEqual(grace.tokenExpiresAt!.getTime() - 1000);
    const expired = await until("EXPIRED", async () => {
      const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
      return r.state === R.REGISTRATION_STATE_EXPIRED ? r : undefined;
    });
    expect(Date.now()).toBeGreaterThanOrEqual(expired.graceEndsAt!.getTime() - 1000);
    // The daemon kept retrying with backoff, and the refresh works again once the central is back.
    const failedTries = central.requests.filter((r) => r.path === "/api/v1/devices/refresh" && r.status === 503).length;
    expect(failedTries).toBeGreaterThanOrEqual(3);
    central.tokenTtlSeconds = 3600;
    central.down = false;
    await until("ACTIVE again", async () => {
      const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
      return r.state === R.REGISTRATION_STATE_ACTIVE ? r : undefined;
    });
  });

  test("SUBSCRIPTION_EXPIRED is a clear FAILED_PRECONDITION and shows in the registration; renewal restores it", async () => {
    central.subscriptionExpired = true;
    const e = await grpcError(d.grpcTcp().trust.refreshDeviceToken({}));
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(reasonOf(e)).toBe("SUBSCRIPTION_EXPIRED");
    expect(e.details).toMatch(/subscription/);
    const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
    expect(r.state).toBe(R.REGISTRATION_STATE_SUBSCRIPTION_EXPIRED);
    // Over REST the same refusal is HTTP 412 with the reason.
    const re = (await d.rest().trust.refreshDeviceToken({}).catch((x: unknown) => x)) as RestError;
    expect(re).toBeInstanceOf(RestError);
    expect(re.httpStatus).toBe(412);
    expect(JSON.stringify(re.details)).toContain("SUBSCRIPTION_EXPIRED");
    central.subscriptionExpired = false;
    expect((await d.grpcTcp().trust.refreshDeviceToken({})).state).toBe(R.REGISTRATION_STATE_ACTIVE);
  });

  test("TPM_ATTESTATION_FAILED ends the registration operation with that reason and keeps the old token", async () => {
    central.failAttestation = true;
    const events = await collect(d.grpcTcp().trust.registerDevice({}));
    central.failAttestation = false;
    const o = outcome(events);
    expect(o.state).toBe(S.OPERATION_STATE_FAILED);
    expect(o.error!.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(statusReason(o.error)).toBe("TPM_ATTESTATION_FAILED");
    expect(o.error!.message).toMatch(/TPM_ATTESTATION_FAILED/);
    const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
    expect(r.state).toBe(R.REGISTRATION_STATE_ACTIVE);
    expect(r.lastError).toMatch(/^TPM_ATTESTATION_FAILED/);
  });

  test("DEVICE_NOT_REGISTERED: the device is unregistered and its sealed tokens are removed", async () => {
    central.forget(identity.deviceId);
    const e = await grpcError(d.grpcTcp().trust.refreshDeviceToken({}));
    expect(e.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(reasonOf(e)).toBe("DEVICE_NOT_REGISTERED");
    const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
    expect(r.state).toBe(R.REGISTRATION_STATE_UNREGISTERED);
    expect(r.lastError).toMatch(/^DEVICE_NOT_REGISTERED/);
    expect((await d.grpcTcp().trust.listSecrets({})).secrets.filter((s) => s.reserved)).toEqual([]);
    // Registering again works.
    const events = await collect(d.grpcTcp().trust.registerDevice({}));
    expect(outcome(events).state).toBe(S.OPERATION_STATE_SUCCEEDED);
  });

  test("the registration survives a restart", async () => {
    await d.stop();
    await d.restart();
    const r = (await d.grpcTcp().trust.getDeviceIdentity({})).registration!;
    expect(r.state).toBe(R.REGISTRATION_STATE_ACTIVE);
    const before = central.issued.length;
    await d.grpcTcp().trust.refreshDeviceToken({});
    expect(central.issued.length).toBe(before + 1);
  });
});

describe("sealed secrets", () => {
  const value = "s3cr3t-" + "v".repeat(40);

  test("SealSecret then systemd-creds decrypt with the same TPM reads it back; a flipped byte fails clearly", async () => {
    const s = await d.rest().trust.sealSecret({ name: "db-password", value: Buffer.from(value) });
    expect(s.sealedWith).toBe(SealKey.SEAL_KEY_TPM2);
    expect(s.credentialName).toBe("piccolod_db-password");
    expect(s.path).toBe(join(d.stateDir, "credstore", "db-password"));
    expect(s.reserved).toBe(false);
    const out = decrypt(s.path, s.credentialName);
    expect(out.status).toBe(0);
    expect(out.stdout).toBe(value);

    // The file is base64 text (systemd-creds' default). One flipped byte of the sealed data — in the
    // TPM-sealed key, or in the encrypted value itself — is refused, and nothing comes out.
    const sealed = Buffer.from(await readFile(s.path, "utf8"), "base64");
    const bad = join(work, "flipped.cred");
    for (const [at, why] of [
      [Math.floor(sealed.length / 2), /integrity check failed/],
      [sealed.length - 3, /Decryption failed/],
    ] as const) {
      const flipped = Buffer.from(sealed);
      flipped[at]! ^= 0x01;
      await writeFile(bad, flipped.toString("base64"));
      const fail = decrypt(bad, s.credentialName);
      await flushTpmContexts(swtpm.tcti);
      expect({ at, status: fail.status, stdout: fail.stdout }).toEqual({ at, status: 1, stdout: "" });
      expect(fail.stderr).toMatch(why);
    }
    // A flipped byte of the text itself is refused too.
    const text = Buffer.from(await readFile(s.path));
    text[10]! ^= 0x01;
    await writeFile(bad, text);
    const raw = decrypt(bad, s.credentialName);
    await flushTpmContexts(swtpm.tcti);
    expect(raw.status).not.toBe(0);
    expect(raw.stdout).toBe("");

    const list = await d.grpcTcp().trust.listSecrets({});
    expect(list.sealKey).toBe(SealKey.SEAL_KEY_TPM2);
    expect(list.warning).toBe("");
    expect(list.directory).toBe(join(d.stateDir, "credstore"));
    expect(list.secrets.map((x) => x.name)).toContain("db-password");
  });

  test("bad names, reserved names and empty values are refused naming the field; delete is NOT_FOUND the second time", async () => {
    const c = d.grpcTcp().trust;
    for (const [req, field] of [
      [{ name: "../etc", value: Buffer.from("x") }, "name"],
      [{ name: "piccolod.device-token", value: Buffer.from("x") }, "name"],
      [{ name: "ok", value: Buffer.alloc(0) }, "value"],
      [{ name: "ok", value: Buffer.alloc(64 * 1024 + 1, 1) }, "value"],
    ] as const) {
      const e = await grpcError(c.sealSecret(req));
      expect(e.code).toBe(grpc.status.INVALID_ARGUMENT);
      expect(e.details.startsWith(`${field}:`)).toBe(true);
    }
    const reserved = await grpcError(c.deleteSecret({ name: "piccolod.refresh-token" }));
    expect(reserved.code).toBe(grpc.status.INVALID_ARGUMENT);
    await c.sealSecret({ name: "temp", value: Buffer.from("t") });
    await c.deleteSecret({ name: "temp" });
    expect((await grpcError(c.deleteSecret({ name: "temp" }))).code).toBe(grpc.status.NOT_FOUND);
  });

  test("no token, refresh token or secret value is in the daemon's output or the audit log", async () => {
    const audit = await readFile(join(d.stateDir, "audit.log"), "utf8");
    const logs = d.output();
    expect(audit).toContain('"method":"piccolo.trust.v1.TrustService/SealSecret"');
    expect(audit).toContain('"target":"name=db-password"');
    expect(audit).toContain("TrustService/RegisterDevice");
    const needles = [value, Buffer.from(value).toString("base64")];
    for (const t of central.issued) needles.push(t.jwt, t.jwt.split(".")[2]!, t.refreshToken);
    expect(needles.length).toBeGreaterThan(8);
    for (const n of needles) {
      expect(logs.includes(n)).toBe(false);
      expect(audit.includes(n)).toBe(false);
    }
  });
});

describe("without a TPM or a central", () => {
  let bare: TestDaemon;
  beforeAll(async () => {
    bare = await startTestDaemon({ extraArgs: ["--tpm-devices", join(work, "no-tpm")] });
  });
  afterAll(async () => {
    await bare?.cleanup();
  });

  test("status says there is none, identity is UNAVAILABLE naming it, secrets would use the host key, registration needs a central", async () => {
    const c = bare.grpcTcp().trust;
    const s = await c.getTpmStatus({});
    expect(s.present).toBe(false);
    expect(s.detail).toContain(join(work, "no-tpm"));
    const e = await grpcError(c.getDeviceIdentity({}));
    expect(e.code).toBe(grpc.status.UNAVAILABLE);
    expect(e.details).toMatch(/TPM/);
    const list = await c.listSecrets({});
    expect(list.sealKey).toBe(SealKey.SEAL_KEY_HOST);
    expect(list.warning).toMatch(/host key/);
    const r = await grpcError(collect(c.registerDevice({})));
    expect(r.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(reasonOf(r)).toBe("CENTRAL_NOT_CONFIGURED");
  });
});
