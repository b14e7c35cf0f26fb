/**
 * Installer end to end against the real daemon: Flatcar-shaped images built with sgdisk (gzip,
 * bzip2, zstd), signed with a throwaway GPG key, installed onto loop devices and sparse files, and
 * read back with sgdisk, cgpt, debugfs and byte comparisons. Refusals are checked to leave the
 * target's bytes as they were; cancel and kill -9 mid-write to leave no valid primary GPT.
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile, copyFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Encryption, InstallRequest, InstallResult, PlanInstallRequest, type InstallSpec } from "../gen/piccolo/installer/v1/installer.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import type { PiccoloGrpcClients } from "../src/clients/grpc-client.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { collect, outcome } from "./helpers/events.js";
import {
  attachLoop,
  buildFlatcarImage,
  compress,
  detachLoops,
  makeSigningKey,
  readPartitions,
  readRange,
  sha256Of,
  sparseTarget,
  type FlatcarImage,
  type SigningKey,
} from "./helpers/flatcar-image.js";

const MiB = 1024 * 1024;
let work: string;
let images: string;
let targets: string;
let key: SigningKey;
let image: FlatcarImage;
let gz: string;
let d: TestDaemon;
let api: PiccoloGrpcClients;
const loops: string[] = [];
let bootLoop: string;

const sh = (cmd: string, args: string[], input?: string): { status: number; out: string; stdout: string } => {
  const r = spawnSync(cmd, args, { encoding: "utf8", input });
  return { status: r.status ?? -1, out: `${r.stdout}${r.stderr}`, stdout: r.stdout };
};
/** sgdisk found no valid GPT at all (it offers to create one) and cgpt sees no primary table. */
const expectNoGpt = (target: string): void => {
  expect(sh("sgdisk", ["-v", target]).out).toMatch(/Creating new GPT entries/);
  expect(readPartitions(target)).toEqual([]);
  expect(sh("cgpt", ["show", target]).status).not.toBe(0);
  expect(readRange(target, 0, MiB).every((b) => b === 0)).toBe(true);
};
const loop = (file: string, ro = false): string => {
  const l = attachLoop(file, ro);
  loops.push(l);
  return l;
};
const majMin = (dev: string): string => sh("lsblk", ["-dno", "MAJ:MIN", dev]).out.trim();

const resultOf = (evs: OperationEvent[]): InstallResult => InstallResult.decode(outcome(evs).result!.value);

async function planAndInstall(spec: Partial<InstallSpec>): Promise<OperationEvent[]> {
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  return collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken })));
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-install-"));
  images = join(work, "images");
  targets = join(work, "targets");
  sh("mkdir", ["-p", images, targets]);
  key = makeSigningKey();
  image = buildFlatcarImage(join(images, "piccolo-os-1.2.3.img"), 64);
  gz = compress(image.raw, "gzip");
  key.sign(gz);
  key.sign(image.raw);
  // A fake mountinfo that says the system boots from one of our loop devices.
  bootLoop = loop(sparseTarget(join(targets, "boot.img"), 128 * MiB));
  await writeFile(join(work, "mountinfo"), `22 1 ${majMin(bootLoop)} / / rw,relatime shared:1 - ext4 ${bootLoop} rw\n`);
  await writeFile(join(work, "cmdline"), "BOOT_IMAGE=/vmlinuz piccolo.live console=ttyS0\n");
  d = await startTestDaemon({
    extraArgs: [
      "--installer-image-dirs", images,
      "--installer-file-target-dirs", targets,
      "--signing-key-files", key.keyring,
      "--installer-min-disk-bytes", "0",
      "--mount-info-file", join(work, "mountinfo"),
      "--kernel-cmdline-file", join(work, "cmdline"),
    ],
  });
  api = d.grpcUnix();
}, 120_000);

afterAll(async () => {
  if (process.env["INSTALLER_TEST_DEBUG"]) console.log(d?.output().slice(-20000));
  await d?.cleanup();
  detachLoops(loops);
  key?.cleanup();
  if (work) await rm(work, { recursive: true, force: true });
});

test("GetInstallEnvironment: live from the kernel command line, the boot disk, the live medium's images", async () => {
  const env = await api.installer.getInstallEnvironment({});
  expect(env.live).toBe(true);
  expect(env.bootDisk).toBe(bootLoop);
  const versions = env.images.map((i) => [i.version, i.signed, i.sha256.length]);
  expect(versions).toEqual(expect.arrayContaining([["1.2.3", true, 64]]));
});

test("ListTargetDisks: loop devices with size and transport; boot, mounted, read-only and too-small disks are not eligible", async () => {
  const good = loop(sparseTarget(join(targets, "list-good.img"), 96 * MiB));
  const ro = loop(sparseTarget(join(targets, "list-ro.img"), 96 * MiB), true);
  const small = loop(sparseTarget(join(targets, "list-small.img"), 16 * MiB));
  const mountedFile = sparseTarget(join(targets, "list-mounted.img"), 96 * MiB);
  sh("mkfs.ext4", ["-q", mountedFile]);
  const mounted = loop(mountedFile);
  const mnt = join(work, "mnt");
  sh("mkdir", ["-p", mnt]);
  expect(sh("mount", [mounted, mnt]).status).toBe(0);
  try {
    const { disks } = await api.installer.listTargetDisks({});
    const by = (p: string) => disks.find((x) => x.path === p)!;
    expect(by(good)).toMatchObject({ eligible: true, sizeBytes: 96 * MiB, ineligibleReasons: [], logicalSectorSize: 512 });
    expect(by(bootLoop).eligible).toBe(false);
    expect(by(bootLoop).ineligibleReasons.join()).toMatch(/boot disk/);
    expect(by(ro).ineligibleReasons.join()).toMatch(/read-only/);
    expect(by(small).ineligibleReasons.join()).toMatch(/too small/);
    expect(by(mounted).ineligibleReasons.join()).toMatch(new RegExp(`mounted: ${mnt}`));
    // REST agrees.
    const viaRest = await d.rest().installer.listTargetDisks({});
    expect(viaRest.disks.find((x) => x.path === good)?.eligible).toBe(true);
  } finally {
    sh("umount", [mnt]);
  }
});

test("install a gzip image onto a larger loop device: bytes match, GPT valid with the backup at the end, ROOT grown, Ignition in OEM; gRPC and REST watchers agree", async () => {
  const target = loop(sparseTarget(join(targets, "t1.img"), 160 * MiB, true));
  const spec = { target, imagePath: gz, ignitionSettings: { hostname: "piccolo-test", sshAuthorizedKeys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ9 test@host"] } };
  const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
  expect(plan).toMatchObject({ imageBytes: image.bytes, compression: "gzip", imageVersion: "1.2.3" });
  expect(plan.rootBytes).toBeGreaterThan(96 * MiB);
  expect(plan.writes[plan.writes.length - 1]!.what).toMatch(/written last/);
  expect(plan.warnings.join()).toMatch(/erased/);

  const restEvents: Promise<OperationEvent[]>[] = [];
  const events: OperationEvent[] = [];
  for await (const ev of api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }))) {
    if (ev.attached) restEvents.push(collect(d.rest().operations.watchOperation({ id: ev.operationId, afterSequence: 0 })));
    events.push(ev);
  }
  expect(outcome(events).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
  const r = resultOf(events);
  expect(r).toMatchObject({ target, bytesWritten: image.bytes, ignitionWritten: true, recoveryKey: "" });

  // Progress from 0 to 100, never backwards, with a rate while writing.
  const progress = events.filter((e) => e.progress).map((e) => e.progress!);
  expect(progress[0]!.percent).toBe(0);
  expect(progress[progress.length - 1]!.percent).toBe(100);
  for (let i = 1; i < progress.length; i++) expect(progress[i]!.percent).toBeGreaterThanOrEqual(progress[i - 1]!.percent);
  expect(progress.map((p) => p.phase)).toEqual(expect.arrayContaining(["verify", "write", "readback", "partition", "configure", "commit"]));
  const writing = progress.filter((p) => p.phase === "write" && p.bytesDone > 0);
  expect(writing.length).toBeGreaterThan(0);
  for (const p of writing) expect(p.bytesTotal).toBe(image.bytes);
  // Sane rates: positive and below 100 GB/s wherever a rate is given.
  const rated = progress.filter((p) => p.bytesPerSecond > 0);
  expect(rated.length).toBeGreaterThan(0);
  for (const p of rated) expect(p.bytesPerSecond).toBeLessThan(100e9);

  // The REST watcher saw the same journaled events.
  const rest = (await restEvents[0]!).filter((e) => !e.attached);
  const strip = (e: OperationEvent) => ({ seq: e.sequence, progress: e.progress, state: e.outcome?.state });
  expect(rest.map(strip)).toEqual(events.filter((e) => !e.attached).map(strip));

  // GPT: valid, backup at the end of the target, ROOT to the last usable sector.
  expect(sh("sgdisk", ["-v", target]).out).toMatch(/No problems found/);
  const parts = readPartitions(target);
  const root = parts.find((p) => p.name === "ROOT")!;
  expect(root.lastLba).toBe((160 * MiB) / 512 - 34);
  expect(sh("cgpt", ["show", target]).out).toMatch(/Sec GPT header/);
  expect(sh("cgpt", ["show", target]).out).toContain(String((160 * MiB) / 512 - 1));
  expect(parts.map((p) => [p.number, p.name, p.firstLba])).toEqual(image.partitions.map((p) => [p.number, p.name, p.firstLba]));

  // Every byte of the written region matches, apart from OEM (which got config.ign).
  const oem = image.partitions.find((p) => p.name === "OEM")!;
  const pre = oem.firstLba * 512 - MiB;
  expect(sha256Of(target, MiB, pre)).toBe(sha256Of(image.raw, MiB, pre));
  const post = (oem.lastLba + 1) * 512;
  expect(sha256Of(target, post, image.bytes - post - 33 * 512)).toBe(sha256Of(image.raw, post, image.bytes - post - 33 * 512));
  // The MBR boot code is the image's; only the protective partition entry grew with the disk.
  expect(readRange(target, 0, 440).equals(readRange(image.raw, 0, 440))).toBe(true);

  // Ignition in OEM, next to what was there.
  const dev = `${target}?offset=${oem.firstLba * 512}`;
  const ign = JSON.parse(sh("debugfs", ["-R", "cat config.ign", dev]).stdout) as Record<string, unknown>;
  expect(ign).toMatchObject({ ignition: { version: "3.3.0" }, passwd: { users: [{ name: "core" }] } });
  expect(sh("debugfs", ["-R", "cat oem-release", dev]).out).toContain("ID=piccolo-test");
  expect(sh("e2fsck", ["-fn", dev]).status).toBe(0);
});

test("install bzip2 and zstd images onto image files without Ignition: every byte past the first MiB matches", async () => {
  for (const how of ["bzip2", "zstd"] as const) {
    const file = compress(image.raw, how);
    key.sign(file);
    const target = sparseTarget(join(targets, `t-${how}.img`), image.bytes + 32 * MiB);
    const evs = await planAndInstall({ target, imagePath: file });
    expect(outcome(evs).state).toBe(OperationState.OPERATION_STATE_SUCCEEDED);
    expect(sha256Of(target, MiB, image.bytes - MiB - 33 * 512)).toBe(sha256Of(image.raw, MiB, image.bytes - MiB - 33 * 512));
    expect(sh("sgdisk", ["-v", target]).out).toMatch(/No problems found/);
  }
});

describe("refusals change nothing", () => {
  let target: string;
  let before: string;
  beforeAll(() => {
    target = loop(sparseTarget(join(targets, "refuse.img"), 128 * MiB, true));
    before = sha256Of(target);
  });
  afterEach(() => expect(sha256Of(target)).toBe(before));

  const code = async (p: Promise<unknown>): Promise<{ code: number; details: string }> => {
    try {
      await p;
    } catch (e) {
      return e as { code: number; details: string };
    }
    throw new Error("expected a refusal");
  };

  test("the boot disk, a read-only device, a too-small disk, a mounted disk", async () => {
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target: bootLoop, imagePath: gz } })))).toMatchObject({ code: 9, details: expect.stringMatching(/boot disk/) });
    const ro = loop(sparseTarget(join(targets, "ro.img"), 128 * MiB), true);
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target: ro, imagePath: gz } })))).toMatchObject({ code: 9, details: expect.stringMatching(/read-only/) });
    const small = loop(sparseTarget(join(targets, "small.img"), 32 * MiB));
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target: small, imagePath: gz } })))).toMatchObject({ code: 9, details: expect.stringMatching(/too small/) });
    const mf = sparseTarget(join(targets, "mounted.img"), 128 * MiB);
    sh("mkfs.ext4", ["-q", mf]);
    const m = loop(mf);
    const mnt = join(work, "mnt2");
    sh("mkdir", ["-p", mnt]);
    sh("mount", [m, mnt]);
    try {
      expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target: m, imagePath: gz } })))).toMatchObject({ code: 9, details: expect.stringMatching(/mounted/) });
    } finally {
      sh("umount", [mnt]);
    }
  });

  test("not a block device or image; not a disk image", async () => {
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target: "/etc/hostname", imagePath: gz } })))).toMatchObject({ code: 3, details: expect.stringMatching(/^spec.target: .*not a block device/) });
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target: "/dev/null", imagePath: gz } })))).toMatchObject({ code: 3, details: expect.stringMatching(/^spec.target/) });
    const notImage = join(images, "notes.txt");
    await writeFile(notImage, "hello\n".repeat(300000));
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, imagePath: notImage } })))).toMatchObject({ code: 3, details: expect.stringMatching(/^spec.image_path: .*not a disk image/) });
    expect(await code(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, imagePath: "/etc/passwd" } })))).toMatchObject({ code: 3, details: expect.stringMatching(/^spec.image_path: must be below/) });
  });

  test("a missing, forged or stale confirmation token", async () => {
    const spec = { target, imagePath: gz };
    expect(await code(collect(api.installer.install(InstallRequest.fromPartial({ spec }))))).toMatchObject({ code: 3, details: expect.stringMatching(/^confirmation_token: required/) });
    expect(await code(collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: "e30.AAAA" }))))).toMatchObject({ code: 3 });
    const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
    // Another spec with this token.
    expect(await code(collect(api.installer.install(InstallRequest.fromPartial({ spec: { ...spec, ignitionSettings: { hostname: "other" } }, confirmationToken: plan.confirmationToken }))))).toMatchObject({
      code: 9,
      details: expect.stringMatching(/stale: the request differs/),
    });
    // The disk changes after the plan.
    sh("sgdisk", ["-n2:20480:+1M", "-c2:NEW", target]);
    before = sha256Of(target);
    expect(await code(collect(api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }))))).toMatchObject({
      code: 9,
      details: expect.stringMatching(/stale: the target disk changed/),
    });
  });

  test("a bad image hash or signature fails the verify phase before anything is written", async () => {
    const bad = await planAndInstall({ target, imagePath: gz, sha256: "0".repeat(64) });
    expect(outcome(bad)).toMatchObject({ state: OperationState.OPERATION_STATE_FAILED, error: { code: 3, message: expect.stringMatching(/^spec.sha256: the image's SHA-256 is/) } });
    const other = makeSigningKey("Not Trusted");
    try {
      const forged = await planAndInstall({ target, imagePath: gz, signature: other.signature(gz) });
      expect(outcome(forged)).toMatchObject({ state: OperationState.OPERATION_STATE_FAILED, error: { code: 3, message: expect.stringMatching(/^spec.signature: .*(unknown|untrusted) key/) } });
      const tampered = join(images, "piccolo-os-9.9.9.img.gz");
      await copyFile(gz, tampered);
      await writeFile(`${tampered}.asc`, key.signature(image.raw)); // a good signature over other bytes
      const evs = await planAndInstall({ target, imagePath: tampered, sha256: sha256Of(tampered) });
      expect(outcome(evs)).toMatchObject({ state: OperationState.OPERATION_STATE_FAILED, error: { message: expect.stringMatching(/^spec.signature: bad signature/) } });
      await rm(tampered);
      await rm(`${tampered}.asc`);
    } finally {
      other.cleanup();
    }
  });
});

/** A bigger, slowly decompressed image so there is time to cancel or kill mid-write. */
async function slowImage(): Promise<string> {
  const raw = join(images, "piccolo-os-2.0.0.img");
  buildFlatcarImage(raw, 320);
  // Random data in ROOT (MiB 224 to 318), so bunzip2 has real work to do (seconds of writing).
  spawnSync("sh", ["-c", `dd if=/dev/urandom of="${raw}" bs=1M seek=224 count=94 conv=notrunc status=none`]);
  spawnSync("sgdisk", ["-e", raw]);
  const bz = compress(raw, "bzip2");
  await rm(raw);
  key.sign(bz);
  return bz;
}

describe("cancel and kill -9 mid-write", () => {
  let bz: string;
  beforeAll(async () => {
    bz = await slowImage();
  }, 300_000);

  const startAndWaitForWrite = async (target: string): Promise<{ id: string; rest: Promise<OperationEvent[]> }> => {
    const spec = { target, imagePath: bz };
    const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
    const stream = api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }));
    let id = "";
    const it = stream[Symbol.asyncIterator]();
    for (;;) {
      const { value, done } = await it.next();
      if (done) throw new Error("install ended before writing");
      const ev = value;
      id ||= ev.operationId;
      if (ev.progress?.phase === "write" && ev.progress.bytesDone > 16 * MiB) break;
      if (ev.outcome) throw new Error(`install ended: ${JSON.stringify(ev.outcome.error)}`);
    }
    const rest = (async () => {
      const out: OperationEvent[] = [];
      try {
        for (;;) {
          const { value, done } = await it.next();
          if (done) break;
          out.push(value);
        }
      } catch {
        // the daemon went away
      }
      return out;
    })();
    return { id, rest };
  };

  test("CancelInstall: CANCELLED, and the target has no valid primary GPT (it had one before)", async () => {
    const target = loop(sparseTarget(join(targets, "cancel.img"), 384 * MiB, true));
    expect(sh("sgdisk", ["-v", target]).out).toMatch(/No problems found/);
    const { id, rest } = await startAndWaitForWrite(target);
    const c = await api.installer.cancelInstall({ operationId: "" });
    expect(c.operation?.id).toBe(id);
    const evs = await rest;
    expect(outcome(evs)).toMatchObject({ state: OperationState.OPERATION_STATE_CANCELLED, error: { message: expect.stringMatching(/first MiB zeroed.*not bootable/) } });
    expectNoGpt(target);
  }, 300_000);

  test("kill -9: INTERRUPTED at the next start, saying the target has no valid primary GPT", async () => {
    const target = loop(sparseTarget(join(targets, "kill.img"), 384 * MiB, true));
    const { id } = await startAndWaitForWrite(target);
    await d.kill9();
    expectNoGpt(target);
    await d.restart();
    api = d.grpcUnix();
    const op = await api.operations.getOperation({ id });
    expect(op.state).toBe(OperationState.OPERATION_STATE_INTERRUPTED);
    expect(op.error?.message).toMatch(/no valid primary partition table/);
    // recover() removed the scratch folder the killed worker left.
    expect(existsSync(join(tmpdir(), `piccolo-install-${id}`))).toBe(false);
  }, 300_000);
});

test("Install with TPM2 encryption is refused without a TPM", async () => {
  const target = sparseTarget(join(targets, "notpm.img"), 128 * MiB);
  await expect(api.installer.planInstall(PlanInstallRequest.fromPartial({ spec: { target, imagePath: gz, encryption: Encryption.ENCRYPTION_TPM2 } }))).rejects.toMatchObject({
    code: 9,
    details: expect.stringMatching(/no TPM/),
  });
});
