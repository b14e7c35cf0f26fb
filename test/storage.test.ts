/**
 * Storage end to end against the real tools: ListDisks against `lsblk -J -b -O` (with a loop
 * device holding a GPT disk image), ListFilesystems against `df` (with a tmpfs of our own), app
 * volumes against a private dockerd checked with `docker volume ls`, LUKS2 status and TPM2 reseal
 * on an image file with cryptsetup, systemd-cryptenroll and swtpm, and low-space alerts on a tmpfs.
 */
import * as grpc from "@grpc/grpc-js";
import { jest } from "@jest/globals";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import {
  ResealEncryptionRequest,
  ResealEncryptionResult,
  StorageAlertState,
  type Disk,
  type StorageAlert,
} from "../gen/piccolo/storage/v1/storage.js";
import { flushTpmContexts } from "../src/server/trust/credentials.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { run, startDockerd, type TestDockerd } from "./helpers/dockerd.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";

jest.setTimeout(180_000);

let engine: TestDockerd;
let tpm: Swtpm;
let d: TestDaemon;
let work: string;
let tmpfsDir: string;
let loopDev = "";

const ok = async (cmd: string, args: string[], input?: string): Promise<string> => {
  const r = await run(cmd, args, { input });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
};

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-storage-"));
  tmpfsDir = join(work, "small");
  await mkdir(tmpfsDir);
  await ok("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", tmpfsDir]);
  // A disk image with a GPT and two partitions on a loop device.
  const img = join(work, "disk.img");
  await ok("truncate", ["-s", "64M", img]);
  await ok("sgdisk", ["-n", "1:0:+16M", "-c", "1:PICCOLO-A", "-n", "2:0:0", "-c", "2:PICCOLO-DATA", img]);
  loopDev = (await ok("losetup", ["-f", "--show", "-P", img])).trim();
  [engine, tpm] = await Promise.all([startDockerd(), startSwtpm()]);
  d = await startTestDaemon({
    extraArgs: [
      "--docker-socket", engine.socket,
      "--tpm2-device", tpm.tcti,
      "--storage-alert-threshold-percent", "50",
      "--storage-alert-interval-ms", "200",
    ],
  });
});

afterAll(async () => {
  await d?.cleanup();
  await engine?.cleanup();
  await tpm?.cleanup();
  if (loopDev) await run("losetup", ["-d", loopDev]);
  if (tmpfsDir) await run("umount", [tmpfsDir]);
  if (work) await rm(work, { recursive: true, force: true });
});

/** The gRPC error of a call with the ErrorInfo it carries. */
async function failure(p: Promise<unknown> | AsyncIterable<unknown>): Promise<{ code: number; message: string; field: string; reason: string; metadata: Record<string, string> }> {
  let err: grpc.ServiceError | undefined;
  try {
    if (Symbol.asyncIterator in p) {
      for await (const _ of p) {
        // drain until the error
      }
    } else await p;
  } catch (e) {
    err = e as grpc.ServiceError;
  }
  if (!err) throw new Error("expected the call to fail");
  const bin = err.metadata?.get("grpc-status-details-bin")[0] as Buffer | undefined;
  const status = bin ? Status.decode(bin) : { details: [] };
  let field = "";
  let reason = "";
  let metadata: Record<string, string> = {};
  for (const any of status.details) {
    if (any.typeUrl.endsWith("google.rpc.ErrorInfo")) {
      const info = ErrorInfo.decode(any.value);
      field = info.metadata["field"] ?? "";
      reason = info.reason;
      metadata = info.metadata;
    }
  }
  return { code: err.code, message: err.details, field, reason, metadata };
}

async function all(it: AsyncIterable<OperationEvent>): Promise<OperationEvent[]> {
  const out: OperationEvent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

interface LsblkDev {
  name: string;
  path: string;
  type: string;
  size: number;
  fstype: string | null;
  partlabel: string | null;
  children?: LsblkDev[];
}

test("ListDisks is lsblk's inventory, with a loop device of our own and its backing file", async () => {
  const api = d.grpcUnix().storage;
  const [res, raw] = await Promise.all([api.listDisks({}), ok("lsblk", ["-J", "-b", "-O"])]);
  const lsblk = (JSON.parse(raw) as { blockdevices: LsblkDev[] }).blockdevices;
  const flatL = (ds: LsblkDev[]): string[] => ds.flatMap((x) => [`${x.path} ${x.type} ${x.size} ${x.fstype ?? ""} ${x.partlabel ?? ""}`, ...flatL(x.children ?? [])]);
  const flatD = (ds: Disk[]): string[] => ds.flatMap((x) => [`${x.path} ${x.type} ${x.sizeBytes} ${x.fsType} ${x.partitionLabel}`, ...flatD(x.children)]);
  expect(flatD(res.disks).sort()).toEqual(flatL(lsblk).sort());
  const loop = res.disks.find((x) => x.path === loopDev)!;
  expect(loop).toBeDefined();
  expect(loop.type).toBe("loop");
  expect(loop.sizeBytes).toBe(64 * 1024 * 1024);
  expect(loop.backingFile).toBe(join(work, "disk.img"));
  // Partitions (when the kernel scanned them here) and their labels were compared with lsblk's above.
});

test("ListFilesystems matches df, and the figures of a tmpfs of our own exactly", async () => {
  const api = d.grpcUnix().storage;
  await writeFile(join(tmpfsDir, "filler"), Buffer.alloc(3 * 1024 * 1024, 1));
  const [res, dfOut] = await Promise.all([api.listFilesystems({}), ok("df", ["-B1", "--output=target,fstype,size,used,avail"])]);
  const df = dfOut
    .trim()
    .split("\n")
    .slice(1)
    .map((l) => {
      const m = /^(.*\S)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)$/.exec(l)!;
      return { target: m[1]!, type: m[2]!, size: Number(m[3]), used: Number(m[4]), avail: Number(m[5]) };
    });
  expect(res.filesystems.map((f) => f.mountPoint).sort()).toEqual(df.map((x) => x.target).sort());
  for (const x of df) {
    const f = res.filesystems.find((y) => y.mountPoint === x.target)!;
    expect(f.type).toBe(x.type);
    expect(f.sizeBytes).toBe(x.size);
    // Other processes write to shared filesystems between the two reads; a tmpfs of our own is still.
    const slack = x.target === tmpfsDir ? 0 : Math.max(256 * 1024 * 1024, x.size * 0.01);
    expect(Math.abs(f.usedBytes - x.used)).toBeLessThanOrEqual(slack);
    expect(Math.abs(f.availableBytes - x.avail)).toBeLessThanOrEqual(slack);
  }
  const mine = res.filesystems.find((f) => f.mountPoint === tmpfsDir)!;
  expect(mine).toMatchObject({ type: "tmpfs", sizeBytes: 8 * 1024 * 1024, usedBytes: 3 * 1024 * 1024 });
  await rm(join(tmpfsDir, "filler"));
});

test("a storage alert is raised when free space falls under the threshold and cleared when it recovers", async () => {
  const api = d.grpcUnix().storage;
  const ac = new AbortController();
  const seen: StorageAlert[] = [];
  const waitFor = async (pred: (a: StorageAlert) => boolean): Promise<StorageAlert> => {
    for (let i = 0; i < 600; i++) {
      const hit = seen.find(pred);
      if (hit) return hit;
      await new Promise((r) => setTimeout(r, 100));
    }
    throw new Error(`no such alert; seen: ${JSON.stringify(seen.map((a) => [a.filesystem?.mountPoint, a.state]))}`);
  };
  const reading = (async () => {
    try {
      for await (const a of api.watchAlerts({}, { signal: ac.signal })) seen.push(a);
    } catch {
      // cancelled at the end
    }
  })();
  const mineRaised = (a: StorageAlert) => a.filesystem?.mountPoint === tmpfsDir && a.state === StorageAlertState.STORAGE_ALERT_STATE_RAISED;
  // The watch starts with the state of every filesystem.
  const ok = await waitFor((a) => a.filesystem?.mountPoint === tmpfsDir);
  expect(ok.state).toBe(StorageAlertState.STORAGE_ALERT_STATE_OK);
  await new Promise((r) => setTimeout(r, 1000));
  expect(seen.some(mineRaised)).toBe(false);
  await writeFile(join(tmpfsDir, "big"), Buffer.alloc(6 * 1024 * 1024, 1));
  const raised = await waitFor(mineRaised);
  expect(raised.thresholdPercent).toBe(50);
  expect(raised.freePercent).toBeCloseTo(25, 0);
  await rm(join(tmpfsDir, "big"));
  const cleared = await waitFor((a) => a.filesystem?.mountPoint === tmpfsDir && a.state === StorageAlertState.STORAGE_ALERT_STATE_CLEARED);
  expect(cleared.freePercent).toBeGreaterThan(99);
  ac.abort();
  await reading;
});

test("volumes: create and delete are seen by docker volume ls; deleting one in use is refused and changes nothing", async () => {
  const api = d.grpcUnix().storage;
  const volumeLs = async (): Promise<string[]> =>
    (await engine.dockerOk(["volume", "ls", "--format", "{{.Name}} {{.Labels}}"]))
      .split("\n")
      .filter(Boolean)
      // The engine prints a volume's labels in no fixed order.
      .map((l) => {
        const [name, labels = ""] = l.split(" ");
        return `${name} ${labels.split(",").sort().join(",")}`;
      })
      .sort();

  const a = await api.createVolume({ name: "app-data", labels: { app: "notes" } });
  expect(a).toMatchObject({ name: "app-data", driver: "local", managed: true, labels: { app: "notes" }, containers: [] });
  await api.createVolume({ name: "spare", labels: {} });
  const ls = await volumeLs();
  expect(ls.find((l) => l.startsWith("app-data "))).toMatch(/space\.piccolo\.managed=true/);
  expect(ls.find((l) => l.startsWith("spare "))).toBeDefined();
  expect(a.mountPoint).toBe((await engine.dockerOk(["volume", "inspect", "-f", "{{.Mountpoint}}", "app-data"])).trim());

  expect((await failure(api.createVolume({ name: "app-data", labels: {} }))).code).toBe(grpc.status.ALREADY_EXISTS);
  expect(await failure(api.createVolume({ name: "-bad name", labels: {} }))).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, field: "name" });
  expect(await failure(api.createVolume({ name: "x1", labels: { "space.piccolo.managed": "no" } }))).toMatchObject({ code: grpc.status.INVALID_ARGUMENT });

  await engine.makeImage("piccolo-test/vol:1");
  await engine.dockerOk(["create", "--name", "notes", "--network", "none", "-v", "app-data:/data", "piccolo-test/vol:1", "sleep", "3600"]);
  const listed = await api.listVolumes({ includeUnmanaged: false });
  expect(listed.volumes.map((v) => [v.name, v.containers])).toEqual([
    ["app-data", ["notes"]],
    ["spare", []],
  ]);

  const before = await volumeLs();
  const inUse = await failure(api.deleteVolume({ name: "app-data" }));
  expect(inUse.code).toBe(grpc.status.FAILED_PRECONDITION);
  expect(inUse.reason).toBe("VOLUME_IN_USE");
  expect(inUse.message).toContain("notes");
  expect(await volumeLs()).toEqual(before);

  await engine.dockerOk(["volume", "create", "foreign"]);
  expect((await failure(api.deleteVolume({ name: "foreign" }))).reason).toBe("NOT_MANAGED");
  expect((await api.listVolumes({ includeUnmanaged: true })).volumes.map((v) => v.name)).toContain("foreign");
  expect((await failure(api.deleteVolume({ name: "nothing-here" }))).code).toBe(grpc.status.NOT_FOUND);

  expect(await api.deleteVolume({ name: "spare" })).toEqual({ name: "spare" });
  expect((await volumeLs()).some((l) => l.startsWith("spare "))).toBe(false);
  await engine.dockerOk(["rm", "notes"]);
  await api.deleteVolume({ name: "app-data" });
  expect((await volumeLs()).some((l) => l.startsWith("app-data "))).toBe(false);
  // Over REST too.
  const r = d.rest().storage;
  await r.createVolume({ name: "via-rest", labels: {} });
  expect((await r.listVolumes({ includeUnmanaged: false })).volumes.map((v) => v.name)).toContain("via-rest");
  await r.deleteVolume({ name: "via-rest" });
  expect((await volumeLs()).some((l) => l.startsWith("via-rest "))).toBe(false);
});

describe("encryption", () => {
  const PASS = "correct horse battery staple";
  let img: string;
  const luksJson = async (): Promise<{ keyslots: Record<string, unknown>; tokens: Record<string, { type: string; keyslots: string[]; "tpm2-pcrs"?: number[]; "tpm2-policy-hash"?: string }> }> =>
    JSON.parse(await ok("cryptsetup", ["luksDump", "--dump-json-metadata", img])) as never;

  beforeAll(async () => {
    img = join(work, "luks.img");
    await ok("truncate", ["-s", "32M", img]);
    // Fast key derivation: the test is about slots and tokens, not KDF strength.
    await ok("cryptsetup", ["luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file=-", img], PASS);
    const env = { ...process.env, PASSWORD: PASS };
    for (const args of [[`--tpm2-device=${tpm.tcti}`, "--tpm2-pcrs=7", img], ["--recovery-key", img]]) {
      const r = await run("systemd-cryptenroll", args, { env });
      await flushTpmContexts(tpm.tcti);
      if (r.code !== 0) throw new Error(`systemd-cryptenroll ${args.join(" ")}: ${r.stderr}`);
    }
  });

  test("GetEncryptionStatus reads keyslots, the TPM2 token with its PCRs and the recovery key, as luksDump has them", async () => {
    const api = d.grpcUnix().storage;
    const { devices } = await api.getEncryptionStatus({ devices: [img] });
    const j = await luksJson();
    expect(devices).toHaveLength(1);
    const dev = devices[0]!;
    expect(dev.version).toBe(2);
    expect(dev.uuid).toBe((await ok("cryptsetup", ["luksUUID", img])).trim());
    expect(dev.keyslots.map((k) => k.id)).toEqual(Object.keys(j.keyslots).map(Number).sort());
    expect(dev.tokens.map((t) => [t.type, t.keyslots])).toEqual(Object.values(j.tokens).map((t) => [t.type, t.keyslots.map(Number)]));
    const tpmToken = dev.tokens.find((t) => t.type === "systemd-tpm2")!;
    expect(tpmToken.tpm2Pcrs).toEqual([7]);
    expect(dev.tpm2Enrolled).toBe(true);
    expect(dev.recoveryKeyPresent).toBe(true);

    expect(await failure(api.getEncryptionStatus({ devices: ["relative/path"] }))).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, field: "devices[0]" });
    const plain = join(work, "plain.img");
    await ok("truncate", ["-s", "1M", plain]);
    expect((await failure(api.getEncryptionStatus({ devices: [plain] }))).reason).toBe("NOT_LUKS");
  });

  test("ResealEncryption: a wrong key changes nothing; the right one re-enrols the TPM2 slot against the PCR values of now", async () => {
    const api = d.grpcUnix().storage;
    // An update measured something new into PCR 7.
    await ok("tpm2_pcrextend", [`--tcti=${tpm.tcti}`, "7:sha256=" + "ab".repeat(32)]);
    const before = await luksJson();
    const oldToken = Object.values(before.tokens).find((t) => t.type === "systemd-tpm2")!;

    const wrong = await failure(api.resealEncryption({ device: img, key: "not the key", keyCredential: "", pcrs: [7] }));
    expect(wrong).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, field: "key", reason: "WRONG_KEY" });
    expect(await luksJson()).toEqual(before);
    expect(await failure(api.resealEncryption({ device: img, key: PASS, keyCredential: "", pcrs: [24] }))).toMatchObject({ field: "pcrs[0]" });

    const events = await all(api.resealEncryption({ device: img, key: PASS, keyCredential: "", pcrs: [7] }));
    const outcome = events[events.length - 1]!.outcome!;
    expect(outcome.error?.message ?? "").toBe("");
    expect(outcome.state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
    const result = ResealEncryptionResult.decode(outcome.result!.value);
    const after = await luksJson();
    const tpmTokens = Object.values(after.tokens).filter((t) => t.type === "systemd-tpm2");
    expect(tpmTokens).toHaveLength(1);
    expect(tpmTokens[0]!.keyslots).toEqual([String(result.newKeyslot)]);
    expect(result.wipedKeyslots).toEqual(oldToken.keyslots.map(Number));
    expect(Object.keys(after.keyslots)).not.toContain(oldToken.keyslots[0]);
    expect(tpmTokens[0]!["tpm2-pcrs"]).toEqual([7]);
    expect(tpmTokens[0]!["tpm2-policy-hash"]).not.toBe(oldToken["tpm2-policy-hash"]);
    expect(Object.values(after.tokens).some((t) => t.type === "systemd-recovery")).toBe(true);
    // The passphrase still opens it, and the key never reached the operation journal.
    expect((await run("cryptsetup", ["open", "--test-passphrase", "--key-file=-", img], { input: PASS })).code).toBe(0);
    const op = await d.grpcUnix().operations.getOperation({ id: events[0]!.operationId });
    expect(ResealEncryptionRequest.decode(op.request!.value)).toMatchObject({ device: img, key: "", pcrs: [7] });
    const journal = await ok("cat", [join(d.stateDir, "operations", `${op.id}.journal`)]);
    expect(journal).not.toContain(PASS);
  });
});
