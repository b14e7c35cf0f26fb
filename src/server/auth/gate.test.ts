import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { Role } from "../../../gen/piccolo/common/v1/access.js";
import { openAuditLog, type AuditLog } from "../audit.js";
import { CredentialStore } from "../trust/credentials.js";
import { createAuthGate, type AuthGate } from "./gate.js";
import { loadDeviceKeys } from "./keys.js";
import { createTokenManager, type TokenManager } from "./tokens.js";

let dir: string;
let audit: AuditLog;
let tokens: TokenManager;
let gate: AuthGate;
const log = pino({ level: "silent" });

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "piccolo-gate-"));
  const credentials = new CredentialStore({ dir: join(dir, "credstore"), tpm2Device: "auto", tpmDevices: [] });
  const keys = await loadDeviceKeys({ stateDir: dir, credentials, protection: "file", altNames: [], log });
  tokens = await createTokenManager({ keys, stateDir: dir });
  audit = await openAuditLog(join(dir, "audit.log"));
  gate = createAuthGate({ tokens, audit, required: true, log });
});
afterAll(async () => {
  await audit.close();
  await rm(dir, { recursive: true, force: true });
});

const call = (need: Role, transport: "grpc-unix" | "grpc-tcp" | "rest", authorization?: string) =>
  gate.authorize({ method: "/piccolo.test.v1.TestService/Undeclared", need, transport, actor: transport === "grpc-unix" ? "unix:uid=0" : "tcp:127.0.0.1:1", authorization });

describe("the auth gate", () => {
  it("refuses an RPC that declares no role on TCP, even to an admin token, and audits it; the unix socket may call it", async () => {
    const { token } = await tokens.mint(Role.ROLE_ADMIN, 60_000, "admin", "token");
    await expect(call(Role.ROLE_UNSPECIFIED, "grpc-tcp", `Bearer ${token}`)).rejects.toMatchObject({ kind: "permission_denied", reason: "ROLE_UNDECLARED" });
    await expect(call(Role.ROLE_UNSPECIFIED, "rest", `Bearer ${token}`)).rejects.toMatchObject({ kind: "permission_denied", reason: "ROLE_UNDECLARED" });
    expect(await call(Role.ROLE_UNSPECIFIED, "grpc-unix")).toMatchObject({ role: Role.ROLE_ADMIN, subject: "root" });
    const records = (await readFile(join(dir, "audit.log"), "utf8")).trim().split("\n").map((l) => JSON.parse(l) as Record<string, string>);
    expect(records.map((r) => [r["transport"], r["result"], r["reason"]])).toEqual([
      ["grpc-tcp", "PERMISSION_DENIED", "ROLE_UNDECLARED"],
      ["rest", "PERMISSION_DENIED", "ROLE_UNDECLARED"],
    ]);
  });

  it("lets PUBLIC through without a token but never a bad one", async () => {
    expect(await call(Role.ROLE_PUBLIC, "rest")).toMatchObject({ role: Role.ROLE_PUBLIC, subject: "anonymous" });
    await expect(call(Role.ROLE_PUBLIC, "rest", "Bearer x.y.z")).rejects.toMatchObject({ kind: "unauthenticated", reason: "TOKEN_INVALID" });
    await expect(call(Role.ROLE_READER, "rest", "Basic dXNlcjpwYXNz")).rejects.toMatchObject({ kind: "unauthenticated" });
  });
});
