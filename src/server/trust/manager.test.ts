/**
 * The trust manager in-process, on a real swtpm and the reference central, with its clock moved
 * by hand: deviceToken() through ACTIVE → OFFLINE_GRACE → EXPIRED, and the PCR selection rules.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pino from "pino";
import { RegistrationState as R } from "../../../gen/piccolo/trust/v1/trust.js";
import { startCentralSim, type CentralSim } from "../../../test/sim/central.js";
import { startSwtpm, type Swtpm } from "../../../test/helpers/swtpm.js";
import { PiccoloError } from "../errors.js";
import type { WorkerContext } from "../operations/manager.js";
import { CredentialStore } from "./credentials.js";
import { createTrustManager, pcrSelectionString, type TrustManager } from "./manager.js";
import { createTpm, parsePcrListing } from "./tpm.js";

describe("pcrSelectionString", () => {
  it("defaults to sha256 PCRs 0-7 and normalises banks", () => {
    expect(pcrSelectionString([])).toBe("sha256:0,1,2,3,4,5,6,7");
    expect(pcrSelectionString([{ algorithm: "SHA256", pcrs: [7, 0, 7] }, { algorithm: "sha1", pcrs: [1] }])).toBe("sha256:0,7+sha1:1");
  });
  it("names the field at fault", () => {
    expect(() => pcrSelectionString([{ algorithm: "sha256", pcrs: [] }])).toThrow(/^pcr_selection\[0\]\.pcrs: /);
    expect(() => pcrSelectionString([{ algorithm: "sha256", pcrs: [1] }, { algorithm: "sha256", pcrs: [2] }])).toThrow(/^pcr_selection\[1\]\.algorithm: .*twice/);
    expect(() => pcrSelectionString([{ algorithm: "sha256", pcrs: [-1] }])).toThrow(PiccoloError);
  });
});

describe("parsePcrListing", () => {
  it("reads tpm2_quote's PCR listing and stops at the next section", () => {
    const text = "quoted: 00ff\npcrs:\n  sha256:\n    0 : 0x" + "00".repeat(32) + "\n    7 : 0x" + "ab".repeat(32) + "\n  sha1:\n    1 : 0x" + "01".repeat(20) + "\ncalcDigest: 1234\n";
    const v = parsePcrListing(text);
    expect(v.map((p) => `${p.algorithm}:${p.index}:${p.value.length}`)).toEqual(["sha256:0:32", "sha256:7:32", "sha1:1:20"]);
    expect(v[1]!.value.toString("hex")).toBe("ab".repeat(32));
  });
});

describe("TrustManager with a hand-moved clock (real swtpm, reference central)", () => {
  const GRACE = 24 * 3600 * 1000;
  let swtpm: Swtpm;
  let central: CentralSim;
  let dir: string;
  let trust: TrustManager;
  let clock = Date.now();

  beforeAll(async () => {
    swtpm = await startSwtpm({ manufacture: true });
    central = await startCentralSim({ tokenTtlSeconds: 3600 });
    dir = await mkdtemp(join(tmpdir(), "trust-manager-"));
    trust = createTrustManager({
      tpm: createTpm({ tpm2Device: swtpm.tcti, tpmDevices: [], stateDir: join(dir, "trust") }),
      credentials: new CredentialStore({ dir: join(dir, "credstore"), tpm2Device: swtpm.tcti, tpmDevices: [] }),
      dir: join(dir, "trust"),
      centralUrl: central.url,
      offlineGraceMs: GRACE,
      retryMinMs: 60_000,
      retryMaxMs: 60_000,
      osReleaseFiles: [],
      log: pino({ level: "silent" }),
      now: () => clock,
    });
    await trust.start();
  });

  afterAll(async () => {
    trust?.close();
    await central?.close();
    await swtpm?.cleanup();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  const ctx: WorkerContext = { id: "op-test", signal: new AbortController().signal, log: pino({ level: "silent" }), progress: () => undefined };

  it("hands out the device token while active and during the 24 h offline grace, and not after", async () => {
    expect(trust.registration().state).toBe(R.REGISTRATION_STATE_UNREGISTERED);
    expect(await trust.deviceToken()).toBeUndefined();

    // A refused first registration leaves the device unregistered, saying why.
    central.failAttestation = true;
    await expect(trust.registerKind.run({}, ctx)).rejects.toMatchObject({ reason: "TPM_ATTESTATION_FAILED" });
    central.failAttestation = false;
    expect(trust.registration()).toMatchObject({ state: R.REGISTRATION_STATE_UNREGISTERED, lastError: expect.stringMatching(/^TPM_ATTESTATION_FAILED: /) });

    await trust.registerKind.run({}, ctx);
    const jwt = central.issued[central.issued.length - 1]!.jwt;
    const reg = trust.registration();
    expect(reg.state).toBe(R.REGISTRATION_STATE_ACTIVE);
    expect(await trust.deviceToken()).toBe(jwt);
    const exp = reg.tokenExpiresAt!.getTime();
    expect(reg.graceEndsAt!.getTime()).toBe(exp + GRACE);

    clock = exp + 1000;
    expect(trust.registration().state).toBe(R.REGISTRATION_STATE_OFFLINE_GRACE);
    expect(await trust.deviceToken()).toBe(jwt);

    clock = exp + GRACE - 1000;
    expect(trust.registration().state).toBe(R.REGISTRATION_STATE_OFFLINE_GRACE);

    clock = exp + GRACE + 1000;
    expect(trust.registration().state).toBe(R.REGISTRATION_STATE_EXPIRED);
    expect(await trust.deviceToken()).toBeUndefined();
  });

  it("a refresh after the grace brings it back (the central still knows the device); an expired subscription withholds the token", async () => {
    clock = Date.now();
    await trust.refreshNow();
    expect(trust.registration().state).toBe(R.REGISTRATION_STATE_ACTIVE);
    expect(await trust.deviceToken()).toBe(central.issued[central.issued.length - 1]!.jwt);

    central.subscriptionExpired = true;
    await expect(trust.refreshNow()).rejects.toMatchObject({ kind: "failed_precondition", reason: "SUBSCRIPTION_EXPIRED" });
    central.subscriptionExpired = false;
    expect(trust.registration().state).toBe(R.REGISTRATION_STATE_SUBSCRIPTION_EXPIRED);
    expect(await trust.deviceToken()).toBeUndefined();
  });

  it("an unreachable central is UNAVAILABLE naming its URL", async () => {
    central.down = true;
    const e = await trust.refreshNow().catch((x: unknown) => x);
    central.down = false;
    expect(e).toBeInstanceOf(PiccoloError);
    expect((e as PiccoloError).kind).toBe("unavailable");
    expect((e as PiccoloError).reason).toBe("CENTRAL_UNAVAILABLE");
    expect((e as PiccoloError).message).toContain(central.url);
  });
});
