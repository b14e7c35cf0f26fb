/**
 * Authentication end to end against the real daemon: passwords and the lock after ten wrong ones
 * (in the audit log), revoked tokens refused (also after a restart), TLS with the daemon's own
 * certificate (pinned by clients; plaintext refused), the keys sealed with the CredentialStore,
 * reflection behind a token while health checking stays public, the development switches, and
 * `piccoloctl auth …` as a user runs it.
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { spawn } from "node:child_process";
import { X509Certificate } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { request as httpRequest } from "node:http";
import { join } from "node:path";
import { Role } from "../gen/piccolo/common/v1/access.js";
import { createGrpcClients } from "../src/clients/grpc-client.js";
import { createPinnedFetch } from "../src/clients/tls.js";
import { CLI_JS, ROOT, startTestDaemon, type TestDaemon } from "./helpers/daemon.js";

const LOCK_SECONDS = 4;
let d: TestDaemon;
beforeAll(async () => {
  d = await startTestDaemon({ extraArgs: ["--login-max-failures", "10", "--login-lock-seconds", String(LOCK_SECONDS)] });
}, 60_000);
afterAll(async () => {
  await d?.cleanup();
});

interface AuditRecord {
  time: string;
  actor: string;
  method: string;
  transport: string;
  target: string;
  result: string;
  reason?: string;
  subject?: string;
  tokenId?: string;
  error?: string;
}
const audit = async (): Promise<AuditRecord[]> =>
  (await readFile(join(d.stateDir, "audit.log"), "utf8"))
    .trim()
    .split("\n")
    .filter(Boolean)
    .map((l) => JSON.parse(l) as AuditRecord);

const codeOf = async (p: Promise<unknown>): Promise<string> => {
  try {
    await p;
    return "OK";
  } catch (e) {
    return grpc.status[(e as { code: number }).code] ?? String(e);
  }
};

interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}
function cli(args: readonly string[], env: Record<string, string> = {}, stdin?: string): Promise<Run> {
  const base: NodeJS.ProcessEnv = { ...process.env };
  for (const k of Object.keys(base)) if (k.startsWith("PICCOLO_") || k === "NODE_OPTIONS") delete base[k];
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI_JS, ...args], { env: { ...base, ...env }, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    p.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
    p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    p.on("error", reject);
    p.on("close", (code) => resolve({ code, stdout, stderr }));
    p.stdin.end(stdin ?? "");
  });
}

describe("Login", () => {
  const password = "correct horse battery staple";

  test("ten wrong passwords lock the user for the configured time, visibly in the audit log; then the right one works again", async () => {
    const unix = d.grpcUnix();
    expect(await unix.auth.setPassword({ username: "alice", password, role: Role.ROLE_OPERATOR })).toEqual({ username: "alice", role: Role.ROLE_OPERATOR });
    const rest = d.rest({ token: null });
    // The right password gives a token of the user's role.
    const ok = await rest.auth.login({ username: "alice", password });
    expect(ok.info?.role).toBe(Role.ROLE_OPERATOR);
    expect(ok.info?.origin).toBe("login");
    expect((await d.grpcTcp({ token: ok.token }).auth.getAuthInfo({})).role).toBe(Role.ROLE_OPERATOR);

    const reasons: string[] = [];
    for (let i = 1; i <= 10; i++) {
      const e = (await rest.auth.login({ username: "alice", password: `wrong-${i}` }).catch((x: unknown) => x)) as { code: number; httpStatus: number; details: { reason?: string }[] };
      expect({ i, code: e.code, status: e.httpStatus }).toEqual({ i, code: grpc.status.UNAUTHENTICATED, status: 401 });
      reasons.push(e.details.find((x) => x.reason)?.reason ?? "");
    }
    expect(reasons.slice(0, 9)).toEqual(Array(9).fill("BAD_CREDENTIALS"));
    expect(reasons[9]).toBe("ACCOUNT_LOCKED");
    const lockedAt = Date.now();
    // Locked: even the right password is refused, over REST and gRPC alike.
    const locked = (await rest.auth.login({ username: "alice", password }).catch((x: unknown) => x)) as { message: string; details: { reason?: string }[] };
    expect(locked.message).toMatch(/user alice is locked until \S+ after 10 wrong passwords in a row/);
    expect(locked.details.find((x) => x.reason)?.reason).toBe("ACCOUNT_LOCKED");
    expect(await codeOf(d.grpcTcp({ token: null }).auth.login({ username: "alice", password, ttl: undefined }))).toBe("UNAUTHENTICATED");

    const records = (await audit()).filter((r) => r.method === "piccolo.auth.v1.AuthService/Login" && r.target === "username=alice");
    expect(records.filter((r) => r.reason === "BAD_CREDENTIALS")).toHaveLength(9);
    const lockRecords = records.filter((r) => r.reason === "ACCOUNT_LOCKED");
    expect(lockRecords.length).toBe(3); // the tenth failure, then the two refused while locked
    expect(lockRecords[0]!.error).toMatch(/locked until/);
    expect(JSON.stringify(records)).not.toContain(password); // never the password

    // After the lock time the right password works again.
    await new Promise((r) => setTimeout(r, Math.max(0, lockedAt + LOCK_SECONDS * 1000 + 500 - Date.now())));
    const again = await rest.auth.login({ username: "alice", password });
    expect(again.info?.role).toBe(Role.ROLE_OPERATOR);
  }, 120_000);

  test("an unknown user and a bad request are refused the same way as a wrong password, or named", async () => {
    const rest = d.rest({ token: null });
    const e = (await rest.auth.login({ username: "nobody", password: "whatever" }).catch((x: unknown) => x)) as { httpStatus: number; message: string };
    expect(e.httpStatus).toBe(401);
    expect(e.message).toBe("wrong user name or password");
    const bad = (await rest.auth.login({ username: "", password: "x" }).catch((x: unknown) => x)) as { httpStatus: number; message: string };
    expect(bad.httpStatus).toBe(400);
    expect(bad.message).toMatch(/^username: /);
    expect(await codeOf(d.grpcUnix().auth.setPassword({ username: "Bad Name", password: "long enough", role: Role.ROLE_UNSPECIFIED }))).toBe("INVALID_ARGUMENT");
    expect(await codeOf(d.grpcUnix().auth.setPassword({ username: "bob", password: "short", role: Role.ROLE_UNSPECIFIED }))).toBe("INVALID_ARGUMENT");
    // Setting a password needs ADMIN: an operator token is not enough.
    expect(await codeOf(d.grpcTcp({ token: await d.token("operator") }).auth.setPassword({ username: "bob", password: "long enough", role: Role.ROLE_UNSPECIFIED }))).toBe("PERMISSION_DENIED");
  });
});

describe("tokens", () => {
  test("a revoked token is refused at once on gRPC and REST, and still after a restart", async () => {
    const token = await d.token("reader", 3600, "to-revoke");
    const g = d.grpcTcp({ token });
    const r = d.rest({ token });
    expect((await g.system.getVersion({})).version).not.toBe("");
    expect((await r.system.getVersion()).version).not.toBe(""); // both verified and cached now
    const info = await g.auth.getAuthInfo({});
    expect(info.role).toBe(Role.ROLE_READER);
    const id = info.token!.id;
    expect(info.token!.subject).toBe("to-revoke");

    const revoked = await d.grpcUnix().auth.revokeToken({ id });
    expect(revoked.info?.revokeTime).toBeInstanceOf(Date);
    const e = (await g.system.getVersion({}).catch((x: unknown) => x)) as grpc.ServiceError;
    expect(e.code).toBe(grpc.status.UNAUTHENTICATED);
    expect(e.details).toMatch(new RegExp(`token ${id} was revoked at`));
    const re = (await r.system.getVersion().catch((x: unknown) => x)) as { httpStatus: number };
    expect(re.httpStatus).toBe(401);
    const listed = (await d.grpcUnix().auth.listTokens({})).tokens.find((t) => t.id === id);
    expect(listed?.revokeTime).toBeInstanceOf(Date);
    // Revoking needs ADMIN, and an unknown id is NOT_FOUND.
    expect(await codeOf(d.grpcTcp({ token: await d.token("operator") }).auth.revokeToken({ id }))).toBe("PERMISSION_DENIED");
    expect(await codeOf(d.grpcUnix().auth.revokeToken({ id: "no-such-token" }))).toBe("NOT_FOUND");

    const other = await d.token("reader", 3600, "survivor");
    const fingerprint = d.endpoints.tlsFingerprint;
    await d.stop();
    await d.restart();
    // Same keys after a restart: same certificate, and tokens minted before still work — but not the revoked one.
    expect(d.endpoints.tlsFingerprint).toBe(fingerprint);
    expect((await d.grpcTcp({ token: other }).system.getVersion({})).version).not.toBe("");
    expect(await codeOf(d.grpcTcp({ token }).system.getVersion({}))).toBe("UNAUTHENTICATED");
    const records = await audit();
    expect(records.some((x) => x.reason === "TOKEN_REVOKED" && x.method === "piccolo.system.v1.SystemService/GetVersion")).toBe(true);
  }, 120_000);

  test("CreateToken checks its request", async () => {
    const unix = d.grpcUnix();
    expect(await codeOf(unix.auth.createToken({ role: Role.ROLE_PUBLIC, ttl: undefined, subject: "" }))).toBe("INVALID_ARGUMENT");
    expect(await codeOf(unix.auth.createToken({ role: Role.ROLE_READER, ttl: { seconds: 0, nanos: 5 }, subject: "" }))).toBe("INVALID_ARGUMENT");
    expect(await codeOf(unix.auth.createToken({ role: Role.ROLE_READER, ttl: { seconds: 100 * 365 * 86400, nanos: 0 }, subject: "" }))).toBe("INVALID_ARGUMENT");
    expect(await codeOf(unix.auth.createToken({ role: Role.ROLE_READER, ttl: undefined, subject: "no spaces" }))).toBe("INVALID_ARGUMENT");
    const t = await unix.auth.createToken({ role: Role.ROLE_READER, ttl: undefined, subject: "" });
    expect(t.info!.expireTime!.getTime() - t.info!.issueTime!.getTime()).toBe(3600_000);
  });

  test("a garbled authorization header is UNAUTHENTICATED, not a crash", async () => {
    for (const header of ["Basic abc", "Bearer", "Bearer not.a.jwt", `Bearer ${"x".repeat(5000)}`]) {
      const res = await d.fetch("/api/v1/version", { headers: { authorization: header } }, { token: null });
      expect({ header: header.slice(0, 20), status: res.status }).toEqual({ header: header.slice(0, 20), status: 401 });
      expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
    }
  });
});

describe("TLS and the keys", () => {
  test("TCP speaks TLS with the certificate the daemon made; plaintext gets nothing; a client pins it", async () => {
    const cert = new X509Certificate(await readFile(join(d.stateDir, "tls", "cert.pem"), "utf8"));
    expect(cert.fingerprint256).toBe(d.endpoints.tlsFingerprint);
    expect(cert.subjectAltName).toContain("IP Address:127.0.0.1");
    expect(d.endpoints.rest).toMatch(/^https:\/\//);

    // Plain HTTP to the REST port is not answered as HTTP.
    const url = new URL(d.endpoints.rest);
    const plain = await new Promise<string>((resolve) => {
      const req = httpRequest({ host: url.hostname, port: url.port, path: "/api/v1/health", timeout: 10_000 }, (res) => resolve(`HTTP ${res.statusCode}`));
      req.on("error", (e) => resolve(`error ${(e as NodeJS.ErrnoException).code ?? e.message}`));
      req.on("timeout", () => req.destroy(new Error("timeout")));
      req.end();
    });
    expect(plain).not.toMatch(/^HTTP 200/);
    // Plaintext gRPC gets no answer either.
    const insecure = createGrpcClients({ endpoint: d.endpoints.grpc, token: d.adminToken, plaintext: true, timeoutMs: 10_000 });
    expect(await codeOf(insecure.system.getHealth({}))).toMatch(/UNAVAILABLE|DEADLINE_EXCEEDED|INTERNAL/);
    insecure.close();
    // A client pinned to another certificate refuses to talk (before sending its token).
    const other = await startTestDaemon();
    try {
      const wrong = createGrpcClients({ endpoint: d.endpoints.grpc, token: d.adminToken, ca: other.certificate, timeoutMs: 10_000 });
      const e = (await wrong.system.getVersion({}).catch((x: unknown) => x)) as grpc.ServiceError;
      expect(e.code).toBe(grpc.status.UNAVAILABLE);
      wrong.close();
      const f = createPinnedFetch({ ca: other.certificate });
      await expect(f(`${d.endpoints.rest}/api/v1/health`)).rejects.toThrow(/fetch failed/);
      expect(other.endpoints.tlsFingerprint).not.toBe(d.endpoints.tlsFingerprint);
    } finally {
      await other.cleanup();
    }
  }, 60_000);

  test("the private keys are sealed with the CredentialStore, never in a plain file", async () => {
    const sealed = await readFile(join(d.stateDir, "secrets", "auth-keys"));
    expect(sealed.includes(Buffer.from("PRIVATE KEY"))).toBe(false);
    expect((await stat(join(d.stateDir, "secrets", "auth-keys"))).mode & 0o077).toBe(0);
    const { spawnSync } = await import("node:child_process");
    const r = spawnSync("systemd-creds", ["decrypt", "--name=piccolod_auth-keys", join(d.stateDir, "secrets", "auth-keys"), "-"], { encoding: "utf8" });
    expect(r.status).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual({ signing: expect.stringContaining("PRIVATE KEY"), tls: expect.stringContaining("PRIVATE KEY") });
    const info = await d.grpcUnix().auth.getAuthInfo({});
    expect(info.keyProtection).toBe(1); // KEY_PROTECTION_SEALED
    expect(info.tlsFingerprintSha256).toBe(d.endpoints.tlsFingerprint);
    expect(JSON.parse(info.tokenSigningJwk)).toMatchObject({ kty: "EC", crv: "P-256", alg: "ES256" });
    expect(JSON.parse(info.tokenSigningJwk)).not.toHaveProperty("d");
  });

  test("grpc.health.v1 is public on TCP; server reflection needs a token", async () => {
    const creds = (token: string | null): grpc.ChannelCredentials => d.channelCredentials({ token });
    const hp = protoLoader.loadSync(join(ROOT, "node_modules/grpc-health-check/proto/health/v1/health.proto"), { enums: String });
    const hproto = grpc.loadPackageDefinition(hp) as unknown as {
      grpc: { health: { v1: { Health: new (t: string, c: grpc.ChannelCredentials) => grpc.Client & Record<string, Function> } } };
    };
    const health = new hproto.grpc.health.v1.Health(d.endpoints.grpc, creds(null));
    const status = await new Promise<string>((resolve, reject) => health["check"]!({ service: "" }, (e: Error | null, r: { status: string }) => (e ? reject(e) : resolve(r.status))));
    expect(status).toBe("SERVING");
    health.close();

    const rp = protoLoader.loadSync(join(ROOT, "node_modules/@grpc/reflection/build/proto/grpc/reflection/v1/reflection.proto"), { keepCase: true });
    const rproto = grpc.loadPackageDefinition(rp) as unknown as {
      grpc: { reflection: { v1: { ServerReflection: new (t: string, c: grpc.ChannelCredentials) => grpc.Client & Record<string, Function> } } };
    };
    const list = (token: string | null): Promise<string[]> => {
      const client = new rproto.grpc.reflection.v1.ServerReflection(d.endpoints.grpc, creds(token));
      return new Promise<string[]>((resolve, reject) => {
        const call = client["ServerReflectionInfo"]!() as grpc.ClientDuplexStream<unknown, Record<string, any>>;
        call.on("data", (r) => {
          resolve((r["list_services_response"]["service"] as { name: string }[]).map((s) => s.name));
          call.end();
        });
        call.on("error", reject);
        call.write({ list_services: "" });
      }).finally(() => client.close());
    };
    await expect(list(null)).rejects.toMatchObject({ code: grpc.status.UNAUTHENTICATED });
    expect(await list(await d.token("reader"))).toContain("piccolo.auth.v1.AuthService");
    const records = await audit();
    expect(records.some((r) => r.method === "grpc.reflection.v1.ServerReflection/ServerReflectionInfo" && r.result === "UNAUTHENTICATED")).toBe(true);
  });
});

describe("piccoloctl auth", () => {
  test("token on the unix socket, then version over REST and gRPC with the fingerprint; login; tokens; revoke", async () => {
    const unix = `unix://${d.endpoints.socket}`;
    const fp = await cli(["--endpoint", unix, "auth", "fingerprint"]);
    expect(fp.code).toBe(0);
    expect(fp.stdout.trim()).toBe(d.endpoints.tlsFingerprint);
    const version = await cli(["--endpoint", unix, "version"]);
    expect(version.stdout).toMatch(new RegExp(`^tls sha256\\s+${d.endpoints.tlsFingerprint}$`, "m"));

    const minted = await cli(["--endpoint", unix, "auth", "token", "--role", "reader", "--ttl", "1h", "--subject", "cli-test"]);
    expect(minted.code).toBe(0);
    const token = minted.stdout.trim();
    expect(token).toMatch(/^[\w-]+\.[\w-]+\.[\w-]+$/);
    expect(minted.stderr).toMatch(/^token (\S+) \(role reader, for cli-test\) expires \S+; revoke it with: piccoloctl auth revoke \1$/m);
    const id = /^token (\S+)/.exec(minted.stderr)![1]!;

    for (const endpoint of [d.endpoints.grpc, d.endpoints.rest]) {
      const ok = await cli(["--endpoint", endpoint, "version", "-o", "json"], { PICCOLO_TOKEN: token, PICCOLO_TLS_FINGERPRINT: d.endpoints.tlsFingerprint });
      expect({ endpoint, code: ok.code, stderr: ok.stderr }).toEqual({ endpoint, code: 0, stderr: "" });
      const who = await cli(["--endpoint", endpoint, "--token", token, "--tls-fingerprint", d.endpoints.tlsFingerprint.replace(/:/g, "").toLowerCase(), "auth", "whoami"]);
      expect(who.stdout).toMatch(/^role\s+reader$/m);
      // Too low a role: PERMISSION_DENIED, exit 1.
      const denied = await cli(["--endpoint", endpoint, "--token", token, "--tls-fingerprint", d.endpoints.tlsFingerprint, "diagnostics"]);
      expect(denied.code).toBe(1);
      expect(denied.stderr).toMatch(/^piccoloctl: PERMISSION_DENIED: .*needs role operator/);
      // No token: UNAUTHENTICATED with a hint.
      const none = await cli(["--endpoint", endpoint, "--tls-fingerprint", d.endpoints.tlsFingerprint, "version"]);
      expect(none.code).toBe(1);
      expect(none.stderr).toMatch(/^piccoloctl: UNAUTHENTICATED: /);
      expect(none.stderr).toContain("piccoloctl auth token --role reader");
      // A wrong fingerprint: refused before anything is sent, and said so.
      const wrong = await cli(["--endpoint", endpoint, "--token", token, "--tls-fingerprint", "AA".repeat(32), "version"]);
      expect(wrong.code).toBe(2);
      expect(wrong.stderr).toMatch(/not the pinned AA:AA/);
      // No way to trust the certificate: said how to get one.
      const untrusted = await cli(["--endpoint", endpoint, "--token", token, "--tls-ca", join(d.dir, "missing.pem"), "version"]);
      expect(untrusted.code).toBe(2);
    }

    await cli(["--endpoint", unix, "auth", "passwd", "carol", "--role", "admin"], {}, "s3cret-enough\n");
    const login = await cli(["--endpoint", d.endpoints.rest, "--tls-fingerprint", d.endpoints.tlsFingerprint, "auth", "login", "--user", "carol"], { PICCOLO_PASSWORD: "s3cret-enough" });
    expect(login.code).toBe(0);
    expect(login.stderr).toMatch(/role admin, for carol/);
    const tokens = await cli(["--endpoint", d.endpoints.grpc, "--tls-fingerprint", d.endpoints.tlsFingerprint, "--token", login.stdout.trim(), "auth", "tokens"]);
    expect(tokens.code).toBe(0);
    expect(tokens.stdout).toMatch(new RegExp(`^${id}\\s+reader\\s+cli-test\\s+token\\s+\\S+\\s+-$`, "m"));
    expect(tokens.stdout).toMatch(/^\S+\s+admin\s+carol\s+login\s/m);

    const rev = await cli(["--endpoint", unix, "auth", "revoke", id]);
    expect(rev.code).toBe(0);
    expect(rev.stdout).toMatch(new RegExp(`^token ${id} revoked at `));
    const after = await cli(["--endpoint", d.endpoints.grpc, "--tls-fingerprint", d.endpoints.tlsFingerprint, "--token", token, "version"]);
    expect(after.code).toBe(1);
    expect(after.stderr).toMatch(/UNAUTHENTICATED: token \S+ was revoked/);
  }, 180_000);
});

describe("development switches", () => {
  test("insecurePlaintext and authDisabled are refused beyond loopback", async () => {
    for (const flag of ["--insecure-plaintext", "--auth-disabled"]) {
      const r = await new Promise<{ code: number | null; stderr: string }>((resolve) => {
        const p = spawn(process.execPath, [join(ROOT, "dist/src/server/main.js"), flag, "true", "--rest-listen", "0.0.0.0:0", "--state-dir", join(d.dir, "never")], {
          stdio: ["ignore", "ignore", "pipe"],
        });
        let stderr = "";
        p.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
        p.on("close", (code) => resolve({ code, stderr }));
      });
      expect(r.code).toBe(2);
      expect(r.stderr).toMatch(/only allowed while grpcListen and restListen are on loopback; 0\.0\.0\.0:0 is not/);
    }
  });

  test("on loopback, insecurePlaintext serves plain HTTP and gRPC (still with tokens); authDisabled needs none", async () => {
    const plain = await startTestDaemon({ extraArgs: ["--insecure-plaintext", "true", "--key-protection", "file"] });
    try {
      expect(plain.endpoints.rest).toMatch(/^http:\/\//);
      expect(plain.endpoints.tlsFingerprint).toBe("");
      expect((await plain.rest().system.getVersion()).version).not.toBe("");
      expect(await codeOf(plain.grpcTcp({ token: null }).system.getVersion({}))).toBe("UNAUTHENTICATED");
      expect((await plain.grpcTcp().system.getVersion({})).version).not.toBe("");
      // keyProtection "file": a 0600 file instead of a sealed credential.
      expect((await stat(join(plain.stateDir, "auth", "keys.json"))).mode & 0o777).toBe(0o600);
      expect((await plain.grpcUnix().auth.getAuthInfo({})).keyProtection).toBe(2); // KEY_PROTECTION_FILE
    } finally {
      await plain.cleanup();
    }
    const open = await startTestDaemon({ extraArgs: ["--insecure-plaintext", "true", "--auth-disabled", "true"] });
    try {
      expect((await open.grpcTcp({ token: null }).system.getVersion({})).version).not.toBe("");
      expect((await open.rest({ token: null }).auth.getAuthInfo()).authRequired).toBe(false);
    } finally {
      await open.cleanup();
    }
  }, 120_000);
});
