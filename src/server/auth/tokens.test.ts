import { generateKeyPairSync } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { decodeJwt, SignJWT } from "jose";
import pino from "pino";
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import { CredentialStore } from "../trust/credentials.js";
import { loadDeviceKeys, type DeviceKeys } from "./keys.js";
import { createTokenManager, type TokenManager } from "./tokens.js";
import { openUserStore } from "./users.js";

let dir: string;
let keys: DeviceKeys;
let tokens: TokenManager;
const log = pino({ level: "silent" });
const credentials = (d: string): CredentialStore => new CredentialStore({ dir: join(d, "credstore"), tpm2Device: "auto", tpmDevices: [] });

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "piccolo-tokens-"));
  keys = await loadDeviceKeys({ stateDir: dir, credentials: credentials(dir), protection: "file", altNames: [], log });
  tokens = await createTokenManager({ keys, stateDir: dir });
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const reasonOf = (p: Promise<unknown>): Promise<string | undefined> =>
  p.then(
    () => "OK",
    (e: { kind?: string; reason?: string }) => `${e.kind}:${e.reason}`,
  );

describe("tokens", () => {
  it("mints an ES256 JWT with the role, subject and id, and verifies it (again from the cache)", async () => {
    const { token, record } = await tokens.mint(Role.ROLE_OPERATOR, 60_000, "grafana", "token");
    const claims = decodeJwt(token);
    expect(claims).toMatchObject({ iss: "piccolod", aud: "piccolod-local-api", sub: "grafana", role: "operator", jti: record.id });
    expect(claims.exp! - claims.iat!).toBe(60);
    const p = await tokens.verify(token);
    expect(p).toMatchObject({ role: Role.ROLE_OPERATOR, subject: "grafana" });
    expect(await tokens.verify(token)).toBe(p); // the cached principal
  });

  it("refuses an expired token, a forged signature, altered claims and another device's token, each saying why", async () => {
    const { token: short } = await tokens.mint(Role.ROLE_READER, 1000, "short", "token");
    await new Promise((r) => setTimeout(r, 2100));
    expect(await reasonOf(tokens.verify(short))).toBe("unauthenticated:TOKEN_EXPIRED");

    const { token } = await tokens.mint(Role.ROLE_READER, 60_000, "x", "token");
    const foreign = generateKeyPairSync("ec", { namedCurve: "P-256" }).privateKey;
    const forged = await new SignJWT({ ...decodeJwt(token) }).setProtectedHeader({ alg: "ES256", kid: keys.jwk["kid"] }).sign(foreign);
    expect(await reasonOf(tokens.verify(forged))).toBe("unauthenticated:TOKEN_BAD_SIGNATURE");
    const [h, , s] = token.split(".");
    const elevated = Buffer.from(JSON.stringify({ ...decodeJwt(token), role: "admin" })).toString("base64url");
    expect(await reasonOf(tokens.verify(`${h}.${elevated}.${s}`))).toBe("unauthenticated:TOKEN_BAD_SIGNATURE");
    expect(await reasonOf(tokens.verify("not-a-jwt"))).toBe("unauthenticated:TOKEN_INVALID");
    const none = `${Buffer.from('{"alg":"none"}').toString("base64url")}.${token.split(".")[1]}.`;
    expect(await reasonOf(tokens.verify(none))).toBe("unauthenticated:TOKEN_INVALID");
  });

  it("revocation beats the cache and survives a new manager on the same state", async () => {
    const { token, record } = await tokens.mint(Role.ROLE_ADMIN, 60_000, "to-revoke", "token");
    await tokens.verify(token);
    await tokens.revoke(record.id);
    expect(await reasonOf(tokens.verify(token))).toBe("unauthenticated:TOKEN_REVOKED");
    const again = await createTokenManager({ keys, stateDir: dir });
    expect(await reasonOf(again.verify(token))).toBe("unauthenticated:TOKEN_REVOKED");
    expect(again.list().find((t) => t.id === record.id)?.revokedAt).toBeGreaterThan(0);
    await expect(tokens.revoke("no-such")).rejects.toMatchObject({ kind: "not_found" });
    await expect(tokens.revoke("../x")).rejects.toMatchObject({ kind: "invalid_argument", field: "id" });
  });

  it("keeps the keys across loads, and makes new ones (new certificate) when the key file is gone", async () => {
    const again = await loadDeviceKeys({ stateDir: dir, credentials: credentials(dir), protection: "file", altNames: [], log });
    expect(again.fingerprint).toBe(keys.fingerprint);
    expect(again.jwk).toEqual(keys.jwk);
    await rm(join(dir, "auth", "keys.json"));
    const fresh = await loadDeviceKeys({ stateDir: dir, credentials: credentials(dir), protection: "file", altNames: ["piccolo.lan"], log });
    expect(fresh.fingerprint).not.toBe(keys.fingerprint);
    expect(fresh.jwk["kid"]).not.toBe(keys.jwk["kid"]);
  });
});

describe("users", () => {
  it("locks a user after the configured failures for the configured time, and counts unknown names too", async () => {
    let now = 1_000_000;
    const users = await openUserStore({ stateDir: dir, policy: { maxFailures: 3, lockMs: 60_000 }, now: () => now });
    await users.setPassword("admin", "right password", Role.ROLE_UNSPECIFIED);
    expect(await users.login("admin", "right password")).toBe(Role.ROLE_ADMIN);
    expect(await reasonOf(users.login("admin", "wrong 1"))).toBe("unauthenticated:BAD_CREDENTIALS");
    expect(await reasonOf(users.login("admin", "wrong 2"))).toBe("unauthenticated:BAD_CREDENTIALS");
    expect(await reasonOf(users.login("admin", "wrong 3"))).toBe("unauthenticated:ACCOUNT_LOCKED");
    expect(await reasonOf(users.login("admin", "right password"))).toBe("unauthenticated:ACCOUNT_LOCKED");
    // The lock is kept on disk: a restarted daemon keeps it.
    const reopened = await openUserStore({ stateDir: dir, policy: { maxFailures: 3, lockMs: 60_000 }, now: () => now });
    expect(await reasonOf(reopened.login("admin", "right password"))).toBe("unauthenticated:ACCOUNT_LOCKED");
    now += 60_001;
    expect(await users.login("admin", "right password")).toBe(Role.ROLE_ADMIN);
    for (let i = 0; i < 2; i++) expect(await reasonOf(users.login("ghost", "x"))).toBe("unauthenticated:BAD_CREDENTIALS");
    expect(await reasonOf(users.login("ghost", "x"))).toBe("unauthenticated:ACCOUNT_LOCKED");
  }, 60_000);
});
