/**
 * The reference Piccolo central on its own: real quotes from a real swtpm (through tpm2-tools),
 * verified by the central with tpm2_checkquote; single-use, expiring nonces; ES256 tokens that
 * verify against its JWKS; refresh with rotation; the switches.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createLocalJWKSet, decodeJwt, jwtVerify } from "jose";
import { createTpm, type Tpm, type TpmIdentity } from "../../src/server/trust/tpm.js";
import { startSwtpm, type Swtpm } from "../helpers/swtpm.js";
import { startCentralSim, type CentralSim } from "./central.js";

let swtpm: Swtpm;
let tpm: Tpm;
let id: TpmIdentity;
let central: CentralSim;
let dir: string;

beforeAll(async () => {
  swtpm = await startSwtpm({ manufacture: true });
  dir = await mkdtemp(join(tmpdir(), "central-test-"));
  tpm = createTpm({ tpm2Device: swtpm.tcti, tpmDevices: [], stateDir: dir });
  id = await tpm.identity();
  central = await startCentralSim({ tokenTtlSeconds: 600, nonceTtlMs: 1500 });
});

afterAll(async () => {
  await central?.close();
  await swtpm?.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const post = async (path: string, body: unknown, bearer?: string): Promise<{ status: number; json: Record<string, unknown> }> => {
  const res = await fetch(`${central.url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...(bearer ? { authorization: `Bearer ${bearer}` } : {}) },
    body: JSON.stringify(body),
  });
  return { status: res.status, json: (await res.json()) as Record<string, unknown> };
};

/** A registration body for a fresh nonce (or the one given), quoted by the swtpm. */
const registration = async (nonceHex?: string): Promise<Record<string, unknown>> => {
  const nonce = nonceHex ?? ((await post("/api/v1/devices/nonce", {})).json["nonce"] as string);
  const q = await tpm.quote(Buffer.from(nonce, "hex"), "sha256:0,1,2,3,4,5,6,7");
  return {
    device_id: id.deviceId,
    ek_certificate: id.ekCertificatePem,
    ek_public_key: id.ekPublicPem,
    ak_public_key: id.akPublicPem,
    attestation: {
      nonce,
      quote: q.quote.toString("base64"),
      signature: q.signature.toString("base64"),
      pcrs: q.pcrs.toString("base64"),
      pcr_selection: q.selection,
      hash_algorithm: "sha256",
    },
    device_info: { hostname: "test", cpu_id: "cpu-1234" },
  };
};

test("a registration with a fresh quote gets a token that verifies against the JWKS and is bound to the EK", async () => {
  expect(id.ekCertificatePem).toMatch(/BEGIN CERTIFICATE/);
  const body = await registration();
  const r = await post("/api/v1/devices/register", body);
  expect(r.status).toBe(200);
  expect(r.json["expires_in"]).toBe(600);
  const jwks = (await (await fetch(`${central.url}/.well-known/jwks.json`)).json()) as { keys: [] };
  const { payload, protectedHeader } = await jwtVerify(r.json["jwt_token"] as string, createLocalJWKSet(jwks), { audience: "piccolod", issuer: central.issuer });
  expect(protectedHeader.alg).toBe("ES256");
  expect(payload["device_id"]).toBe(id.deviceId);
  expect(payload["hardware_binding"]).toEqual({ tpm_ek_hash: id.deviceId, cpu_id: "cpu-1234" });
  expect(payload.exp! - payload.iat!).toBe(600);
  expect(typeof r.json["refresh_token"]).toBe("string");
});

test("a replayed nonce is refused with TPM_ATTESTATION_FAILED, even with a valid quote", async () => {
  const body = await registration();
  expect((await post("/api/v1/devices/register", body)).status).toBe(200);
  const again = await post("/api/v1/devices/register", body);
  expect(again.status).toBe(401);
  expect(again.json["error"]).toBe("TPM_ATTESTATION_FAILED");
  expect(again.json["message"]).toMatch(/already used|not issued/);
});

test("a nonce the central never issued, and one used after it expired, are refused", async () => {
  const made = await post("/api/v1/devices/register", await registration("ab".repeat(32)));
  expect(made.json["error"]).toBe("TPM_ATTESTATION_FAILED");
  const nonce = (await post("/api/v1/devices/nonce", {})).json["nonce"] as string;
  await new Promise((r) => setTimeout(r, 2000)); // the nonce lives 1.5 s here
  const late = await post("/api/v1/devices/register", await registration(nonce));
  expect(late.status).toBe(401);
  expect(late.json["message"]).toMatch(/expired/);
});

test("a quote over another nonce, a flipped signature byte, or another AK does not verify (tpm2_checkquote)", async () => {
  const other = await registration();
  const body = await registration();
  // The quote of `other` presented with `body`'s fresh nonce.
  const swapped = { ...body, attestation: { ...(other["attestation"] as object), nonce: (body["attestation"] as { nonce: string }).nonce } };
  const r1 = await post("/api/v1/devices/register", swapped);
  expect(r1.json["error"]).toBe("TPM_ATTESTATION_FAILED");
  expect(r1.json["message"]).toMatch(/does not verify/);

  const b2 = await registration();
  const att = b2["attestation"] as Record<string, string>;
  const sig = Buffer.from(att["signature"]!, "base64");
  sig[sig.length - 5]! ^= 0x01;
  const r2 = await post("/api/v1/devices/register", { ...b2, attestation: { ...att, signature: sig.toString("base64") } });
  expect(r2.json["error"]).toBe("TPM_ATTESTATION_FAILED");

  const b3 = await registration();
  const r3 = await post("/api/v1/devices/register", { ...b3, ak_public_key: id.ekPublicPem });
  expect(r3.json["error"]).toBe("TPM_ATTESTATION_FAILED");
});

test("a device id that is not the EK hash, or an EK certificate for another key, is refused", async () => {
  const b = await registration();
  const r = await post("/api/v1/devices/register", { ...b, device_id: "00".repeat(32) });
  expect(r.json["error"]).toBe("TPM_ATTESTATION_FAILED");
  expect(r.json["message"]).toMatch(/device_id/);
  const b2 = await registration();
  const r2 = await post("/api/v1/devices/register", { ...b2, ek_public_key: id.akPublicPem, device_id: "x" });
  expect(r2.json["error"]).toBe("TPM_ATTESTATION_FAILED");
});

test("refresh rotates the refresh token; the old one and an unknown device are refused", async () => {
  const reg = await post("/api/v1/devices/register", await registration());
  const jwt = reg.json["jwt_token"] as string;
  const rt = reg.json["refresh_token"] as string;
  const r = await post("/api/v1/devices/refresh", { device_id: id.deviceId, refresh_token: rt }, jwt);
  expect(r.status).toBe(200);
  expect(r.json["refresh_token"]).not.toBe(rt);
  expect(decodeJwt(r.json["jwt_token"] as string)["jti"]).not.toBe(decodeJwt(jwt)["jti"]);
  await central.verify(r.json["jwt_token"] as string);
  const old = await post("/api/v1/devices/refresh", { device_id: id.deviceId, refresh_token: rt }, jwt);
  expect(old.status).toBe(401);
  expect(old.json["error"]).toBe("INVALID_REFRESH_TOKEN");
  const noBearer = await post("/api/v1/devices/refresh", { device_id: id.deviceId, refresh_token: r.json["refresh_token"] });
  expect(noBearer.status).toBe(401);
  const unknown = await post("/api/v1/devices/refresh", { device_id: "ff".repeat(32), refresh_token: "x" }, jwt);
  expect(unknown.json["error"]).toBe("DEVICE_NOT_REGISTERED");
});

test("the switches: failed attestation, expired subscription, forgotten device, outage", async () => {
  central.failAttestation = true;
  const a = await post("/api/v1/devices/register", await registration());
  central.failAttestation = false;
  expect(a.status).toBe(401);
  expect(a.json["error"]).toBe("TPM_ATTESTATION_FAILED");

  const reg = await post("/api/v1/devices/register", await registration());
  central.subscriptionExpired = true;
  const s1 = await post("/api/v1/devices/register", await registration());
  const s2 = await post("/api/v1/devices/refresh", { device_id: id.deviceId, refresh_token: reg.json["refresh_token"] }, reg.json["jwt_token"] as string);
  central.subscriptionExpired = false;
  expect([s1.status, s1.json["error"]]).toEqual([403, "SUBSCRIPTION_EXPIRED"]);
  expect([s2.status, s2.json["error"]]).toEqual([403, "SUBSCRIPTION_EXPIRED"]);

  central.forget(id.deviceId);
  const f = await post("/api/v1/devices/refresh", { device_id: id.deviceId, refresh_token: reg.json["refresh_token"] }, reg.json["jwt_token"] as string);
  expect(f.json["error"]).toBe("DEVICE_NOT_REGISTERED");

  central.down = true;
  const d = await fetch(`${central.url}/api/v1/devices/nonce`, { method: "POST" });
  central.down = false;
  expect(d.status).toBe(503);
});
