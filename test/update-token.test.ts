/**
 * The update manager in-process, with the trust area's device token wired as the coordinator will
 * wire it: CheckForUpdate and the download of an ApplyUpdate carry it as a bearer token to the
 * update server; without a token no authorization header is sent.
 */
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { createUpdateManager } from "../src/server/update/manager.js";
import { makeRelease, makeSigningKey, startUpdateServer, type SigningKey, type UpdateServer } from "./sim/update-server.js";

let dir: string;
let key: SigningKey;
let server: UpdateServer;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "upd-token-"));
  key = await makeSigningKey();
  server = await startUpdateServer([await makeRelease(join(dir, "r"), key, "1.1.0", 100_000)]);
  await writeFile(join(dir, "release"), "FLATCAR_RELEASE_VERSION=1.0.0\n");
}, 60_000);

afterAll(async () => {
  await server?.close();
  await key?.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

const manager = (deviceToken?: () => Promise<string | undefined>) =>
  createUpdateManager({
    stateDir: join(dir, "state"),
    systemBusAddress: `unix:path=${join(dir, "no-bus")}`,
    disk: join(dir, "no-disk.img"),
    mountInfoFile: "/proc/self/mountinfo",
    kernelCmdlineFile: join(dir, "cmdline"),
    updateConfFile: join(dir, "update.conf"),
    osReleaseFiles: [join(dir, "release")],
    defaultServer: server.url,
    defaultChannel: "stable",
    signingKeyFiles: [],
    downloadRetries: 0,
    engineStallMs: 10_000,
    log: pino({ level: "silent" }),
    deviceToken,
  });

test("a device token from the trust area goes to the update server as a bearer token", async () => {
  const m = manager(async () => "device-jwt-123");
  await m.init();
  const r = await m.check("");
  expect(r).toMatchObject({ version: "1.1.0", currentVersion: "1.0.0", updateAvailable: true });
  expect(server.requests[server.requests.length - 1]!.authorization).toBe("Bearer device-jwt-123");
});

test("without a token (none yet, or no trust area) no authorization header is sent", async () => {
  for (const m of [manager(), manager(async () => undefined)]) {
    await m.init();
    await m.check("stable");
    expect(server.requests[server.requests.length - 1]!.authorization).toBe("");
  }
});
