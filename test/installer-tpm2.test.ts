/**
 * Installer with TPM2 encryption against a real swtpm: ROOT becomes a LUKS2 volume whose header
 * luksDump shows with a systemd-tpm2 token bound to PCR 7, the recovery key from the final event
 * of the Install stream opens it (cryptsetup --test-passphrase; opening a mapping needs
 * device-mapper, which only a VM has), and that key is nowhere else: not in a later watch, not in
 * the state folder (journal, audit log), not in the daemon's log.
 */
import { spawnSync } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Encryption, InstallRequest, InstallResult, PlanInstallRequest } from "../gen/piccolo/installer/v1/installer.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { buildFlatcarImage, compress, makeSigningKey, readPartitions, sparseTarget, type SigningKey } from "./helpers/flatcar-image.js";
import { startSwtpm, type Swtpm } from "./helpers/swtpm.js";

const MiB = 1024 * 1024;
let work: string;
let tpm: Swtpm;
let key: SigningKey;
let d: TestDaemon;

const sh = (cmd: string, args: string[], input?: string) => {
  const r = spawnSync(cmd, args, { encoding: "utf8", input });
  return { status: r.status ?? -1, stdout: r.stdout, out: `${r.stdout}${r.stderr}` };
};

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-install-tpm-"));
  sh("mkdir", ["-p", join(work, "images"), join(work, "targets")]);
  tpm = await startSwtpm();
  key = makeSigningKey();
  const raw = buildFlatcarImage(join(work, "images", "piccolo-os-3.0.0.img"), 64);
  const zst = compress(raw.raw, "zstd");
  key.sign(zst);
  await rm(raw.raw);
  d = await startTestDaemon({
    extraArgs: [
      "--installer-image-dirs", join(work, "images"),
      "--installer-file-target-dirs", join(work, "targets"),
      "--signing-key-files", key.keyring,
      "--installer-min-disk-bytes", "0",
      "--tpm2-device", tpm.tcti,
    ],
  });
}, 120_000);

afterAll(async () => {
  await d?.cleanup();
  await tpm?.cleanup();
  key?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

test("encryption TPM2: LUKS2 on ROOT with a systemd-tpm2 token on PCR 7, a working recovery key returned once and stored nowhere", async () => {
  const target = sparseTarget(join(work, "targets", "enc.img"), 192 * MiB);
  const api = d.grpcUnix();
  const spec = { target, liveImage: true, encryption: Encryption.ENCRYPTION_TPM2, ignitionSettings: { hostname: "vault" } };
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  expect(plan.writes.map((w) => w.what).join()).toMatch(/LUKS2 header on ROOT/);
  expect(plan.warnings.join()).toMatch(/recovery key is shown once/);
  const events: OperationEvent[] = [];
  for await (const ev of api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }))) events.push(ev);
  const end = events[events.length - 1]!.outcome!;
  expect(end.error).toBeUndefined();
  expect(end.state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  const result = InstallResult.decode(end.result!.value);
  expect(result.recoveryKey).toMatch(/^([cbdefghijklnrtuv]{8}-){7}[cbdefghijklnrtuv]{8}$/);
  expect(result.luksUuid).toMatch(/^[0-9a-f-]{36}$/);
  expect(events.some((e) => e.progress?.phase === "encrypt")).toBe(true);

  // The LUKS2 header sits at the start of the grown ROOT.
  const root = readPartitions(target).find((p) => p.name === "ROOT")!;
  expect(root.lastLba).toBe((192 * MiB) / 512 - 34);
  const header = join(work, "root-header.img");
  sh("dd", [`if=${target}`, `of=${header}`, "bs=512", `skip=${root.firstLba}`, "count=65536", "status=none"]);
  const dump = sh("cryptsetup", ["luksDump", header]).out;
  expect(dump).toMatch(/Version:\s*2/);
  expect(dump).toContain(result.luksUuid);
  expect(dump).toMatch(/systemd-tpm2/);
  expect(dump).toMatch(/tpm2-hash-pcrs:\s*7\b/);
  expect(sh("cryptsetup", ["open", "--test-passphrase", "--key-file", "-", header], result.recoveryKey).status).toBe(0);
  expect(sh("cryptsetup", ["open", "--test-passphrase", "--key-file", "-", header], "cbdefghi-" + result.recoveryKey.slice(9)).status).not.toBe(0);

  // The OEM partition holds the Ignition config with the crypttab line and the initrd unlock line.
  const oem = readPartitions(target).find((p) => p.name === "OEM")!;
  const dev = `${target}?offset=${oem.firstLba * 512}`;
  const ign = sh("debugfs", ["-R", "cat config.ign", dev]).stdout;
  expect(JSON.parse(ign)).toMatchObject({ storage: { filesystems: [{ device: "/dev/mapper/rootencrypted", label: "ROOT" }] } });
  expect(decodeURIComponent(ign)).toContain(`rootencrypted UUID=${result.luksUuid} none tpm2-device=auto`);
  expect(sh("debugfs", ["-R", "cat grub.cfg", dev]).stdout).toContain(`rd.luks.name=${result.luksUuid}=rootencrypted`);

  // Returned once: a later watch over gRPC or REST, and GetOperation, carry no key.
  const id = events[0]!.operationId;
  for (const watch of [api.operations.watchOperation({ id, afterSequence: 0 }), d.rest().operations.watchOperation({ id, afterSequence: 0 })]) {
    const again: OperationEvent[] = [];
    for await (const ev of watch) again.push(ev);
    const r = InstallResult.decode(again[again.length - 1]!.outcome!.result!.value);
    expect(r.luksUuid).toBe(result.luksUuid);
    expect(r.recoveryKey).toBe("");
  }
  const op = await api.operations.getOperation({ id });
  expect(InstallResult.decode(op.result!.value).recoveryKey).toBe("");

  // Stored nowhere: not in the state folder (journals, audit log, credstore), not in the log.
  const grep = sh("grep", ["-r", "-F", "-l", result.recoveryKey, d.stateDir]);
  expect(grep.status).toBe(1); // 1: no match
  expect(grep.stdout).toBe("");
  const compact = result.recoveryKey.replace(/-/g, "");
  expect(sh("grep", ["-r", "-F", "-l", compact, d.stateDir]).status).toBe(1);
  expect(d.output()).not.toContain(result.recoveryKey);
  await writeFile(join(work, "daemon.log"), d.output());
  expect(sh("grep", ["-c", "-F", result.recoveryKey, join(work, "daemon.log")]).stdout.trim()).toBe("0");
}, 300_000);
