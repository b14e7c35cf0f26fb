/**
 * The installer: the live environment, target eligibility, the dry-run plan with its confirmation
 * token, and the `installer.install` operation (verify → write → read back → partition → encrypt →
 * configure → commit). The image is a file on the host (the live medium's) or a version from the
 * update server, which the verify phase downloads (resumably, into <stateDir>/installer/downloads)
 * before it checks it as it would a file. The first MiB of the target is zeroed before anything else is written and
 * gets the image's (grown) partition table only in the last step, so any target that did not get
 * there has no valid primary GPT, and the old backup GPT at the end is zeroed too.
 */
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { mkdir, mkdtemp, open, readFile, readdir, realpath, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, isAbsolute, join, relative } from "node:path";
import type { Logger } from "pino";
import { Any } from "../../../gen/google/protobuf/any.js";
import {
  Encryption,
  InstallRequest,
  InstallResult,
  Transport,
  type Disk,
  type GetInstallEnvironmentResponse,
  type InstallImage,
  type ImageDownload,
  type InstallPlan,
  type InstallSpec,
  type Partition,
  type PlannedWrite,
} from "../../../gen/piccolo/installer/v1/installer.js";
import type { Operation } from "../../../gen/piccolo/operations/v1/operations.js";
import { allMountPoints, type BlockDevice, type BlockPartition, type DiskInventory } from "../disks/inventory.js";
import { invalidArgument, PiccoloError, unavailable } from "../errors.js";
import type { OperationKind, WorkerContext } from "../operations/manager.js";
import { download } from "../releases/download.js";
import { fetchManifest, fetchSignature, VERSION_RE, type Manifest, type ReleaseFile } from "../releases/manifest.js";
import { findBootDisk } from "../system/health.js";
import type { SignatureVerifier } from "../verify/openpgp.js";
import { run } from "./exec.js";
import { fingerprint, growLastPartition, HEAD_BYTES, parseGpt, partitionNamed, SECTOR, type Gpt, type GptPartition } from "./gpt.js";
import { checkIgnition, encryptedGrubCfg, encryptedIgnition, generateIgnition } from "./ignition.js";
import { detectCompression, openImage, readImageHead, type Compression } from "./image.js";
import { makeTpm2Luks, newRecoveryKey } from "./luks.js";
import { hashFile, readBack, writeImage, zeroRange, type WriteResult } from "./writer.js";

/** Operation kind of Install. */
export const INSTALL_KIND = "installer.install";
/** How long a confirmation token is good for. */
const TOKEN_TTL_MS = 15 * 60_000;
/** Backup GPT: 32 sectors of entries and the header. */
const TAIL_BYTES = 33 * SECTOR;
const PHASES = ["verify", "write", "readback", "partition", "encrypt", "configure", "commit"] as const;
type Phase = (typeof PHASES)[number];
/** Where each phase starts and ends in the operation's percent (an image to download: DOWNLOAD_SPAN). */
const SPAN: Record<Phase, [number, number]> = {
  verify: [0, 10],
  write: [10, 75],
  readback: [75, 92],
  partition: [92, 93],
  encrypt: [93, 97],
  configure: [97, 98],
  commit: [98, 100],
};
/** The phases' spans when the verify phase downloads the image first: the download is most of the time. */
const DOWNLOAD_SPAN: Record<Phase, [number, number]> = Object.fromEntries(
  PHASES.map((ph) => [ph, ph === "verify" ? [0, 40] : (SPAN[ph].map((x) => 40 + ((x - 10) * 60) / 90) as [number, number])]),
) as Record<Phase, [number, number]>;
/** Share of the verify phase that the download takes. */
const DOWNLOAD_SHARE = 0.85;

/** What the installer needs. */
export interface InstallerDeps {
  readonly inventory: DiskInventory;
  readonly verifier: SignatureVerifier;
  readonly log: Logger;
  /** Folders install images may come from; the first is the live medium's. */
  readonly imageDirs: readonly string[];
  /** Folders image-file targets may be in (tests, VM images); empty: block devices only. */
  readonly fileTargetDirs: readonly string[];
  /** Smallest disk offered as a target, in bytes. */
  readonly minDiskBytes: number;
  readonly kernelCmdlineFile: string;
  readonly mountInfoFile: string;
  /** systemd's --tpm2-device= value for the TPM2 enrollment. */
  readonly tpm2Device: string;
  /** TPM device nodes looked for when tpm2Device is "auto". */
  readonly tpmDevices: readonly string[];
  readonly tools?: Partial<{ sgdisk: string; cryptsetup: string; cryptenroll: string; debugfs: string; blockdev: string }>;
  /** Where downloaded install images are kept (a partial one is resumed by the next install). */
  readonly downloadDir: string;
  /** The update server, channel and headers (the device token) as the update area has them now. */
  readonly releaseSource: () => Promise<{ server: string; channel: string; headers: Record<string, string> }>;
  /** Download attempts after the first. */
  readonly downloadRetries: number;
  /** Delay before download retry n (1-based), ms; the downloader's default when absent. */
  readonly downloadBackoffMs?: (n: number) => number;
}

/** An install image the verify phase downloads first. */
export interface PreparedDownload {
  readonly version: string;
  readonly url: string;
  readonly size: number;
}

/** A request checked and resolved by plan(); what the worker runs. */
export interface PreparedInstall {
  readonly request: InstallRequest;
  readonly target: string;
  readonly targetIsBlock: boolean;
  readonly targetBytes: number;
  readonly imagePath: string;
  readonly compression: Compression;
  readonly imageBytes: number;
  readonly sha256: string;
  readonly signature: string;
  readonly gpt: Gpt;
  readonly root: GptPartition;
  readonly oem: GptPartition | undefined;
  /** The generated or given Ignition config (before encryption wrapping); undefined for none. */
  readonly ignition: string | undefined;
  readonly encryption: Encryption;
  /** The version installed (the manifest's, or from the image's file name). */
  readonly version: string;
  /** Set for a version from the update server; imagePath is where it is downloaded to. */
  readonly download: PreparedDownload | undefined;
}

/** The installer's manager. */
export interface Installer {
  environment(signal?: AbortSignal): Promise<GetInstallEnvironmentResponse>;
  listDisks(signal?: AbortSignal): Promise<Disk[]>;
  /** The dry run; throws what Install would refuse with. */
  plan(spec: InstallSpec | undefined, signal?: AbortSignal): Promise<{ plan: InstallPlan; prepared: PreparedInstall }>;
  /** Plans again and checks the token against it; returns what to run. */
  confirm(request: InstallRequest, signal?: AbortSignal): Promise<PreparedInstall>;
  /** The operation kind. */
  readonly kind: OperationKind<PreparedInstall>;
  /** The install streams that wait for a recovery key (the key is only ever held in memory). */
  readonly recoveryKeys: RecoveryKeyHandoff;
}

/** Hands a recovery key from the worker to the stream that started the install, once. */
export interface RecoveryKeyHandoff {
  /** The starting stream is listening for op `id`. */
  open(id: string): void;
  /** The worker made a key; kept only while the stream listens. */
  put(id: string, key: string): void;
  /** Takes the key (once). */
  take(id: string): string | undefined;
  /** The stream has gone; forget the key. */
  close(id: string): void;
}

function createHandoff(): RecoveryKeyHandoff {
  const m = new Map<string, string | null>();
  return {
    open: (id) => void m.set(id, null),
    put: (id, key) => {
      if (m.has(id)) m.set(id, key);
    },
    take(id) {
      const k = m.get(id) ?? undefined;
      m.delete(id);
      return k;
    },
    close: (id) => void m.delete(id),
  };
}

const TRANSPORT: Record<string, Transport> = {
  usb: Transport.TRANSPORT_USB,
  nvme: Transport.TRANSPORT_NVME,
  sata: Transport.TRANSPORT_SATA,
  virtio: Transport.TRANSPORT_VIRTIO,
  scsi: Transport.TRANSPORT_SCSI,
  loop: Transport.TRANSPORT_LOOP,
  other: Transport.TRANSPORT_OTHER,
};

const IMAGE_NAME = /^piccolo-os-(.+?)\.(img|raw|bin)(\.(gz|bz2|zst))?$/;

const below = (dir: string, path: string): boolean => {
  const r = relative(dir, path);
  return r !== "" && !r.startsWith("..") && !isAbsolute(r);
};

const mib = (n: number): string => `${(n / 1048576).toFixed(n % 1048576 === 0 ? 0 : 1)} MiB`;

const partitionOut = (p: BlockPartition): Partition => ({
  path: p.path,
  label: p.partLabel,
  fsLabel: p.fsLabel,
  fsType: p.fsType,
  sizeBytes: p.sizeBytes,
  mountPoints: [...p.mountPoints, ...p.children.flatMap((c) => c.mountPoints)],
});

async function readRange(fh: FileHandle, offset: number, length: number): Promise<Buffer> {
  const b = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const { bytesRead } = await fh.read(b, got, length - got, offset + got);
    if (bytesRead === 0) break;
    got += bytesRead;
  }
  return b.subarray(0, got);
}

async function writeRange(fh: FileHandle, data: Buffer, offset: number): Promise<void> {
  let off = 0;
  while (off < data.length) {
    const { bytesWritten } = await fh.write(data, off, data.length - off, offset + off);
    off += bytesWritten;
  }
}

/** The install's scratch folder (sparse GPT and LUKS header images), by operation id so recover() finds it. */
const scratchDirOf = (opId: string): string => join(tmpdir(), `piccolo-install-${opId.replace(/[^A-Za-z0-9-]/g, "")}`);

/** Creates the installer. */
export function createInstaller(deps: InstallerDeps): Installer {
  const tools = {
    sgdisk: deps.tools?.sgdisk ?? "sgdisk",
    cryptsetup: deps.tools?.cryptsetup ?? "cryptsetup",
    cryptenroll: deps.tools?.cryptenroll ?? "systemd-cryptenroll",
    debugfs: deps.tools?.debugfs ?? "debugfs",
    blockdev: deps.tools?.blockdev ?? "blockdev",
  };
  const secret = randomBytes(32);
  const handoff = createHandoff();
  const log = deps.log;

  const bootDisk = async (): Promise<string> => {
    const r = await findBootDisk(deps.mountInfoFile);
    return "disk" in r ? r.disk : "";
  };

  /** The disk holding a folder (the live medium's image folder), from its st_dev. */
  const diskOfFolder = async (dir: string): Promise<string> => {
    try {
      const dev = (await stat(dir)).dev;
      const major = Math.floor(dev / 256) & 0xfff;
      const minor = (dev & 0xff) | (Math.floor(dev / 4096) & 0xfff00);
      let p = await realpath(`/sys/dev/block/${major}:${minor}`);
      try {
        await stat(join(p, "partition"));
        p = join(p, "..");
      } catch {
        // a whole disk
      }
      return `/dev/${basename(await realpath(p))}`;
    } catch {
      return "";
    }
  };

  const listImages = async (): Promise<InstallImage[]> => {
    const dir = deps.imageDirs[0];
    if (!dir) return [];
    let names: string[];
    try {
      names = await readdir(dir);
    } catch {
      return [];
    }
    const out: InstallImage[] = [];
    for (const n of names) {
      const m = IMAGE_NAME.exec(n);
      if (!m) continue;
      const path = join(dir, n);
      const st = await stat(path).catch(() => undefined);
      if (!st?.isFile()) continue;
      const signed = await stat(`${path}.asc`).then(
        () => true,
        () => false,
      );
      const sha256 = await readSha256File(path);
      out.push({ path, version: m[1]!, sizeBytes: st.size, signed, sha256 });
    }
    return out.sort((a, b) => b.version.localeCompare(a.version, "en", { numeric: true }));
  };

  const readSha256File = async (imagePath: string): Promise<string> => {
    try {
      const t = (await readFile(`${imagePath}.sha256`, "utf8")).trim().split(/\s+/)[0] ?? "";
      return /^[0-9a-f]{64}$/i.test(t) ? t.toLowerCase() : "";
    } catch {
      return "";
    }
  };

  const tpmPresent = async (): Promise<boolean> => {
    if (deps.tpm2Device !== "auto") return true;
    for (const d of deps.tpmDevices) if (await stat(d).then(() => true, () => false)) return true;
    return false;
  };

  const diskOut = (d: BlockDevice, reasons: string[]): Disk => ({
    path: d.path,
    model: d.model,
    serial: d.serial,
    sizeBytes: d.sizeBytes,
    transport: TRANSPORT[d.transport] ?? Transport.TRANSPORT_UNSPECIFIED,
    rotational: d.rotational,
    removable: d.removable,
    readOnly: d.readOnly,
    logicalSectorSize: d.logicalSectorSize,
    partitions: d.partitions.map(partitionOut),
    mountPoints: [...d.mountPoints],
    eligible: reasons.length === 0,
    ineligibleReasons: reasons,
  });

  const reasonsFor = (d: BlockDevice, boot: string, live: string, minBytes: number): string[] => {
    const r: string[] = [];
    if (d.type !== "disk" && d.type !== "loop") r.push(`not a disk (${d.type})`);
    if (boot && d.path === boot) r.push("boot disk: the running system boots from it");
    if (live && d.path === live && d.path !== boot) r.push("live medium: the install image is on it");
    const mounted = allMountPoints(d);
    if (mounted.length > 0) r.push(`mounted: ${[...new Set(mounted)].join(", ")}`);
    if (d.readOnly) r.push("read-only");
    if (d.sizeBytes < minBytes) r.push(`too small: ${mib(d.sizeBytes)}, needs at least ${mib(minBytes)}`);
    if (d.logicalSectorSize !== SECTOR) r.push(`${d.logicalSectorSize}-byte sectors: Piccolo images are made for ${SECTOR}-byte sectors`);
    return r;
  };

  const liveImageBytes = async (): Promise<number> => {
    const [img] = await listImages();
    if (!img) return 0;
    try {
      const c = await detectCompression(img.path);
      const g = parseGpt(await readImageHead(img.path, c));
      return g ? (g.backupLba + 1) * SECTOR : 0;
    } catch {
      return 0;
    }
  };

  /** The partitions a disk's primary GPT lists (what an install erases). */
  const gptPartitionsOf = async (path: string, prefix: string): Promise<Partition[]> => {
    const fh = await open(path, "r");
    try {
      const g = parseGpt(await readRange(fh, 0, HEAD_BYTES));
      return (g?.partitions ?? []).map((p) => ({
        path: `${prefix}${p.number}`,
        label: p.name,
        fsLabel: "",
        fsType: "",
        sizeBytes: (p.lastLba - p.firstLba + 1) * SECTOR,
        mountPoints: [],
      }));
    } finally {
      await fh.close();
    }
  };

  /** Finds the target: a whole block device lsblk lists, or an image file below a file-target folder. */
  const resolveTarget = async (
    target: string,
    imageBytes: number,
    signal?: AbortSignal,
  ): Promise<{ disk: Disk; block: boolean; bytes: number; lsblk: string }> => {
    const field = "spec.target";
    if (!target) throw invalidArgument(field, "required: a whole-disk device such as /dev/sdb");
    if (!isAbsolute(target) || target.length > 4096 || target.includes("\0")) throw invalidArgument(field, "must be an absolute path");
    const st = await stat(target).catch(() => undefined);
    if (!st) throw invalidArgument(field, `${target} does not exist`);
    const minBytes = Math.max(deps.minDiskBytes, imageBytes);
    if (st.isBlockDevice()) {
      const d = await deps.inventory.get(target, signal);
      if (!d) throw invalidArgument(field, `${target} is not a whole disk (a partition? give the disk it is on)`);
      const reasons = reasonsFor(d, await bootDisk(), await diskOfFolder(deps.imageDirs[0] ?? "/nonexistent"), minBytes);
      const disk = diskOut(d, reasons);
      // Without udev (or partition scanning on a loop device) lsblk lists no partitions: read the GPT.
      if (disk.partitions.length === 0) disk.partitions = await gptPartitionsOf(d.path, /\d$/.test(d.path) ? `${d.path}p` : d.path);
      return { disk, block: true, bytes: d.sizeBytes, lsblk: JSON.stringify(d) };
    }
    if (st.isFile()) {
      const real = await realpath(target);
      if (!deps.fileTargetDirs.some((dir) => below(dir, real))) {
        throw invalidArgument(field, `${target} is not a block device (image files are only accepted below ${deps.fileTargetDirs.join(", ") || "the configured installerFileTargetDirs, which are empty"})`);
      }
      const d: BlockDevice = {
        path: real,
        name: basename(real),
        majMin: "",
        type: "disk",
        model: "image file",
        serial: "",
        sizeBytes: st.size,
        transport: "",
        rotational: false,
        removable: false,
        readOnly: false,
        logicalSectorSize: SECTOR,
        partitionTable: "",
        fsType: "",
        mountPoints: [],
        partitions: [],
      };
      const reasons = reasonsFor(d, "", "", minBytes);
      try {
        const fh = await open(real, "r+");
        await fh.close();
      } catch (e) {
        reasons.push(`read-only (${(e as NodeJS.ErrnoException).code ?? "not writable"})`);
      }
      const disk = diskOut(d, reasons);
      disk.partitions = await gptPartitionsOf(real, `${real}#`);
      return { disk, block: false, bytes: st.size, lsblk: JSON.stringify(disk) };
    }
    throw invalidArgument(field, `${target} is not a block device or an image file`);
  };

  /** The target's state as far as the token cares: size, first and last MiB, partitions and mounts. */
  const targetFingerprint = async (path: string, bytes: number, lsblk: string): Promise<string> => {
    const fh = await open(path, "r");
    try {
      const head = await readRange(fh, 0, Math.min(HEAD_BYTES, bytes));
      const tail = await readRange(fh, Math.max(0, bytes - HEAD_BYTES), Math.min(HEAD_BYTES, bytes));
      return fingerprint(String(bytes), head, tail, lsblk);
    } finally {
      await fh.close();
    }
  };

  const sign = (payload: object): string => {
    const body = Buffer.from(JSON.stringify(payload)).toString("base64url");
    return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
  };

  /** Where a release's image is downloaded to: by version and SHA-256, so a re-published image never resumes an old one's bytes. */
  const downloadPath = (version: string, sha256: string): string => join(deps.downloadDir, `piccolo-os-${version}-${sha256.slice(0, 16)}.img`);

  /** Bytes of a download already there: the whole file, or what an earlier install left in `.part`. */
  const cachedBytes = async (dest: string, size: number): Promise<number> => {
    const whole = await stat(dest).catch(() => undefined);
    if (whole?.isFile() && whole.size === size) return size;
    const part = await stat(`${dest}.part`).catch(() => undefined);
    return part?.isFile() && part.size <= size ? part.size : 0;
  };

  /** The manifest of `version` on the update area's server and channel, with its install image. */
  const resolveVersion = async (
    version: string,
    signal?: AbortSignal,
  ): Promise<{ src: { server: string; channel: string; headers: Record<string, string> }; manifest: Manifest; file: ReleaseFile }> => {
    if (version !== "latest" && !VERSION_RE.test(version)) throw invalidArgument("spec.version", 'letters, digits, ".", "+", "_" and "-", up to 64 characters, or "latest"');
    const src = await deps.releaseSource();
    let manifest: Manifest;
    try {
      manifest = await fetchManifest({ server: src.server, headers: src.headers }, { channel: src.channel, version }, signal);
    } catch (e) {
      if (e instanceof PiccoloError && e.kind === "not_found") throw new PiccoloError("not_found", `spec.version: ${e.message}`, { field: "spec.version", reason: "VERSION_NOT_FOUND", cause: e });
      throw e;
    }
    if (!manifest.installImage) {
      throw new PiccoloError("failed_precondition", `spec.version: the update server ${src.server} publishes no install image for version ${manifest.version}`, {
        field: "spec.version",
        reason: "NO_INSTALL_IMAGE",
      });
    }
    return { src, manifest, file: manifest.installImage };
  };

  /**
   * The compression and the first decompressed MiB of a release's image: from its download when
   * one is there, else from the first 2 MiB the server sends (into a scratch file, then removed);
   * the first MiB of a Flatcar image (tables and zeros) compresses to a few KiB.
   */
  const releaseHead = async (
    src: { headers: Record<string, string> },
    file: ReleaseFile,
    dest: string,
    signal?: AbortSignal,
  ): Promise<{ compression: Compression; head: Buffer }> => {
    const prefix = Math.min(file.size, 2 << 20);
    const cached = await cachedBytes(dest, file.size);
    let path = cached === file.size ? dest : cached >= prefix ? `${dest}.part` : undefined;
    let tmp: string | undefined;
    try {
      if (!path) {
        let res: Response;
        try {
          res = await fetch(file.url, { headers: { ...src.headers, range: `bytes=0-${prefix - 1}` }, signal: signal ? AbortSignal.any([signal, AbortSignal.timeout(60_000)]) : AbortSignal.timeout(60_000) });
        } catch (e) {
          if (signal?.aborted) throw signal.reason;
          throw unavailable(`the install image at ${file.url}`, new Error((e as { cause?: { code?: string } }).cause?.code ?? (e as Error).message));
        }
        if ((res.status !== 200 && res.status !== 206) || !res.body) {
          await res.body?.cancel();
          throw new PiccoloError("unavailable", `the install image at ${file.url} answered HTTP ${res.status}`, { reason: "HOST_PART_UNAVAILABLE" });
        }
        const parts: Buffer[] = [];
        let n = 0;
        const reader = res.body.getReader();
        try {
          while (n < prefix) {
            const { done, value } = await reader.read();
            if (done) break;
            parts.push(Buffer.from(value));
            n += value.byteLength;
          }
        } catch (e) {
          if (signal?.aborted) throw signal.reason;
          // A connection that broke still gave its bytes, enough when they hold the first MiB.
          if (n < HEAD_BYTES) throw unavailable(`the install image at ${file.url} (the connection broke after ${n} bytes)`, e);
        } finally {
          await reader.cancel().catch(() => undefined);
        }
        tmp = await mkdtemp(join(tmpdir(), "piccolo-install-head-"));
        path = join(tmp, "head");
        await writeFile(path, Buffer.concat(parts).subarray(0, prefix), { mode: 0o600 });
      }
      const compression = await detectCompression(path);
      return { compression, head: await readImageHead(path, compression) };
    } finally {
      if (tmp) await rm(tmp, { recursive: true, force: true });
    }
  };

  const planImpl = async (
    spec: InstallSpec | undefined,
    signal?: AbortSignal,
  ): Promise<{ plan: InstallPlan; prepared: PreparedInstall; binding: Record<string, unknown> }> => {
    if (!spec) throw invalidArgument("spec", "required");
    // The image: a version from the update server, or a file.
    let imagePath: string;
    let release: Awaited<ReturnType<typeof resolveVersion>> | undefined;
    if (spec.version !== undefined) {
      release = await resolveVersion(spec.version, signal);
      imagePath = downloadPath(release.manifest.version, release.file.sha256);
    } else if (spec.liveImage) {
      const [img] = await listImages();
      if (!img) throw new PiccoloError("failed_precondition", `no install image on the live medium (${deps.imageDirs[0] ?? "no image folder configured"})`, { reason: "NO_LIVE_IMAGE" });
      imagePath = img.path;
    } else if (spec.imagePath !== undefined && spec.imagePath !== "") {
      imagePath = spec.imagePath;
    } else {
      throw invalidArgument("spec.image_path", "required: an image file, or live_image");
    }
    let realImage: string;
    let compression: Compression;
    let head: Buffer;
    let imageFile: { size: number; mtime: number };
    const imageField = release ? "spec.version" : "spec.image_path";
    if (release) {
      realImage = imagePath;
      ({ compression, head } = await releaseHead(release.src, release.file, imagePath, signal));
      imageFile = { size: release.file.size, mtime: 0 };
    } else {
      if (!isAbsolute(imagePath) || imagePath.includes("\0")) throw invalidArgument("spec.image_path", "must be an absolute path");
      const ist = await stat(imagePath).catch(() => undefined);
      if (!ist) throw invalidArgument("spec.image_path", `${imagePath} does not exist`);
      if (!ist.isFile()) throw invalidArgument("spec.image_path", `${imagePath} is not a file`);
      realImage = await realpath(imagePath);
      if (!deps.imageDirs.some((d) => below(d, realImage))) {
        throw invalidArgument("spec.image_path", `must be below ${deps.imageDirs.join(", ") || "the configured installerImageDirs"}`);
      }
      compression = await detectCompression(realImage);
      head = await readImageHead(realImage, compression);
      imageFile = { size: ist.size, mtime: ist.mtimeMs };
    }
    const what = release ? `the install image of ${release.manifest.version}` : imagePath;
    const gpt = parseGpt(head);
    if (!gpt) throw invalidArgument(imageField, `${what} is not a disk image (no GUID partition table in its first MiB${compression === "none" ? "" : ` after ${compression} decompression`})`);
    const root = partitionNamed(gpt, "ROOT");
    if (!root) throw invalidArgument(imageField, `${what} has no ROOT partition; not a Flatcar-based image`);
    if (gpt.partitions.some((p) => p.lastLba > root.lastLba)) throw invalidArgument(imageField, `ROOT is not the last partition of ${what}, so it cannot be grown`);
    const oem = partitionNamed(gpt, "OEM");
    const imageBytes = (gpt.backupLba + 1) * SECTOR;

    // Hash and signature: given, or beside the image (or published with the release).
    let sha256 = spec.sha256.trim().toLowerCase();
    if (sha256 && !/^[0-9a-f]{64}$/.test(sha256)) throw invalidArgument("spec.sha256", "must be 64 hex digits");
    if (release) {
      if (sha256 && sha256 !== release.file.sha256) throw invalidArgument("spec.sha256", `is not the SHA-256 the update server publishes for ${release.manifest.version} (${release.file.sha256})`);
      sha256 = release.file.sha256;
    }
    sha256 ||= await readSha256File(realImage);
    if (!sha256) throw invalidArgument("spec.sha256", `required: no SHA-256 given and no ${basename(realImage)}.sha256 beside the image`);
    let signature = spec.signature;
    if (signature.length > 64 * 1024) throw invalidArgument("spec.signature", "longer than 64 KiB; expected one detached signature");
    if (!signature && release) signature = (await fetchSignature({ server: release.src.server, headers: release.src.headers }, release.file.signatureUrl, signal)).toString("utf8");
    if (!signature) signature = await readFile(`${realImage}.asc`, "utf8").catch(() => "");
    if (!signature) throw invalidArgument("spec.signature", `required: no signature given and no ${basename(realImage)}.asc beside the image`);

    // Ignition and encryption.
    if (spec.ignitionConfig.length > 1 << 20) throw invalidArgument("spec.ignition_config", "longer than 1 MiB");
    let ignition: string | undefined;
    if (spec.ignitionConfig) {
      checkIgnition(spec.ignitionConfig, "spec.ignition_config");
      ignition = spec.ignitionConfig;
    } else {
      ignition = generateIgnition(spec.ignitionSettings?.hostname ?? "", spec.ignitionSettings?.sshAuthorizedKeys ?? []);
    }
    if (!(spec.encryption in Encryption) || spec.encryption < 0) throw invalidArgument("spec.encryption", `unknown value ${spec.encryption}`);
    const encryption = spec.encryption === Encryption.ENCRYPTION_TPM2 ? Encryption.ENCRYPTION_TPM2 : Encryption.ENCRYPTION_NONE;
    if ((ignition || encryption === Encryption.ENCRYPTION_TPM2) && !oem) {
      throw invalidArgument(imageField, "the image has no OEM partition to hold the Ignition config");
    }
    if (encryption === Encryption.ENCRYPTION_TPM2 && !(await tpmPresent())) {
      throw new PiccoloError("failed_precondition", `encryption TPM2: no TPM on this machine (looked for ${deps.tpmDevices.join(", ")})`, { reason: "NO_TPM" });
    }

    // The target.
    const t = await resolveTarget(spec.target, imageBytes, signal);
    if (!t.disk.eligible) {
      throw new PiccoloError("failed_precondition", `${spec.target} cannot be installed to: ${t.disk.ineligibleReasons.join("; ")}`, {
        reason: "TARGET_NOT_ELIGIBLE",
        metadata: { target: spec.target },
      });
    }
    const lastLba = Math.floor(t.bytes / SECTOR) - 1;
    const rootLast = lastLba - 33; // sgdisk's last usable sector with 128 entries
    const rootBytes = (rootLast - root.firstLba + 1) * SECTOR;

    const writes: PlannedWrite[] = [{ what: "zeros over the old partition tables (first and last MiB)", offset: 0, length: HEAD_BYTES }];
    writes.push({ what: "image, from its second MiB on", offset: HEAD_BYTES, length: imageBytes - HEAD_BYTES });
    if (encryption === Encryption.ENCRYPTION_TPM2) writes.push({ what: "LUKS2 header on ROOT (TPM2, PCR 7)", offset: root.firstLba * SECTOR, length: 16 << 20 });
    if (oem && (ignition || encryption === Encryption.ENCRYPTION_TPM2)) {
      writes.push({ what: "Ignition config (config.ign) into the OEM filesystem", offset: oem.firstLba * SECTOR, length: (oem.lastLba - oem.firstLba + 1) * SECTOR });
    }
    writes.push({ what: "backup GPT at the end of the disk", offset: t.bytes - TAIL_BYTES, length: TAIL_BYTES });
    writes.push({ what: "protective MBR and primary GPT with ROOT grown (written last)", offset: 0, length: HEAD_BYTES });

    const warnings: string[] = [];
    if (t.disk.removable || t.disk.transport === Transport.TRANSPORT_USB) warnings.push("the target is removable or on USB; it may be another USB stick, not an internal disk");
    if (t.disk.partitions.length > 0) warnings.push(`everything on ${spec.target} is erased: ${t.disk.partitions.length} partition(s)`);
    if (t.disk.partitions.some((p) => ["USR-A", "USR-B", "ROOT"].includes(p.label))) warnings.push("the target already holds a Flatcar or Piccolo installation");
    if (encryption === Encryption.ENCRYPTION_TPM2) warnings.push("with TPM2 encryption the recovery key is shown once, at the end: write it down");

    const fp = await targetFingerprint(t.disk.path, t.bytes, t.lsblk);
    const binding = {
      target: t.disk.path,
      bytes: t.bytes,
      fp,
      image: realImage,
      imageSize: imageFile.size,
      imageMtime: imageFile.mtime,
      version: release?.manifest.version ?? "",
      url: release?.file.url ?? "",
      sha256,
      sig: fingerprint(signature),
      ign: fingerprint(ignition ?? ""),
      enc: encryption,
    };
    const prepared: PreparedInstall = {
      request: InstallRequest.fromPartial({ spec }),
      target: t.disk.path,
      targetIsBlock: t.block,
      targetBytes: t.bytes,
      imagePath: realImage,
      compression,
      imageBytes,
      sha256,
      signature,
      gpt,
      root,
      oem,
      ignition,
      encryption,
      version: release?.manifest.version ?? IMAGE_NAME.exec(basename(realImage))?.[1] ?? "",
      download: release ? { version: release.manifest.version, url: release.file.url, size: release.file.size } : undefined,
    };
    const downloadOut: ImageDownload | undefined = release
      ? { url: release.file.url, sizeBytes: release.file.size, sha256, cachedBytes: await cachedBytes(realImage, release.file.size), signatureUrl: release.file.signatureUrl }
      : undefined;
    const plan: InstallPlan = {
      target: t.disk,
      imagePath: realImage,
      imageVersion: prepared.version,
      imageFileBytes: imageFile.size,
      imageBytes,
      compression,
      writes,
      erased: t.disk.partitions,
      rootBytes,
      warnings,
      confirmationToken: "",
      download: downloadOut,
    };
    return { plan, prepared, binding };
  };

  // -------------------------------------------------------------------------------------------
  // The worker

  const runInstall = async (p: PreparedInstall, ctx: WorkerContext): Promise<Any> => {
    const { signal } = ctx;
    let phase: Phase = "verify";
    const span = p.download ? DOWNLOAD_SPAN : SPAN;
    const at = (ph: Phase, frac: number): number => span[ph][0] + (span[ph][1] - span[ph][0]) * Math.max(0, Math.min(1, frac));
    const report = (ph: Phase, frac: number, message: string, bytesDone = 0, bytesTotal = 0): void => {
      phase = ph;
      ctx.progress({ phase: ph, phaseIndex: PHASES.indexOf(ph) + 1, phaseCount: PHASES.length, percent: at(ph, frac), message, bytesDone, bytesTotal });
    };
    let touched = false; // the target has been written to
    let committed = false;
    const scratchDir = scratchDirOf(ctx.id);
    await rm(scratchDir, { recursive: true, force: true });
    await mkdir(scratchDir, { mode: 0o700 });
    let fh: FileHandle | undefined;
    try {
      // 1. verify: download a release's image first (resuming what an earlier install left), then
      // hash and signature, both over the file as stored, in parallel.
      const dl = p.download;
      const checkFrom = dl ? DOWNLOAD_SHARE : 0;
      if (dl) {
        const have = await cachedBytes(p.imagePath, dl.size);
        if (have < dl.size) {
          const src = await deps.releaseSource();
          await mkdir(deps.downloadDir, { recursive: true, mode: 0o700 });
          report("verify", 0, `downloading ${dl.version} from ${src.server}${have ? `, resuming at byte ${have}` : ""}`, have, dl.size);
          const r = await download({
            url: dl.url,
            dest: p.imagePath,
            size: dl.size,
            headers: src.headers,
            retries: deps.downloadRetries,
            signal,
            backoffMs: deps.downloadBackoffMs,
            progress: (done, total, note) => report("verify", (DOWNLOAD_SHARE * done) / total, note ?? `downloading ${dl.version}`, done, total),
          });
          ctx.log.info({ version: dl.version, attempts: r.attempts, resumedFrom: r.resumedFrom }, "install image downloaded");
        }
        report("verify", DOWNLOAD_SHARE, `${dl.version} is downloaded (${dl.size} bytes); checking it`, dl.size, dl.size);
      }
      report("verify", checkFrom, `checking the SHA-256 and signature of ${basename(p.imagePath)}`, 0, 0);
      const fileBytes = (await stat(p.imagePath)).size;
      const hashing = hashFile(p.imagePath, signal, (n) =>
        report("verify", checkFrom + ((1 - checkFrom) * n) / fileBytes, "checking the image's SHA-256 and signature", n, fileBytes),
      );
      const [hashed, signed] = await Promise.allSettled([hashing, deps.verifier.verifyFile(p.imagePath, p.signature, "spec.signature", signal)]);
      if (hashed.status === "rejected") throw hashed.reason;
      const digest = hashed.value;
      // A download that is not what was published is deleted, so the next install fetches it anew.
      if (dl && digest !== p.sha256) await rm(p.imagePath, { force: true });
      if (signed.status === "rejected") throw signed.reason;
      const sig = signed.value;
      if (digest !== p.sha256) {
        throw invalidArgument(
          dl ? "spec.version" : "spec.sha256",
          `the image's SHA-256 is ${digest}, not the expected ${p.sha256}; the image is damaged or not the one that was published${dl ? " (the download was deleted)" : ""}`,
        );
      }
      ctx.log.info({ key: sig.fingerprint }, "image signature good");

      // 2. write: old tables gone first, then everything but the first MiB.
      fh = await open(p.target, "r+");
      const size = p.targetIsBlock ? (await deps.inventory.get(p.target, signal))?.sizeBytes ?? 0 : (await fh.stat()).size;
      if (size !== p.targetBytes) throw new PiccoloError("failed_precondition", `${p.target} changed size since the plan (${size} bytes now)`, { reason: "TARGET_CHANGED" });
      touched = true;
      await zeroRange(fh, 0, HEAD_BYTES);
      await zeroRange(fh, p.targetBytes - HEAD_BYTES, HEAD_BYTES);
      await fh.sync();
      report("write", 0, `writing ${basename(p.imagePath)} to ${p.target}`, 0, p.imageBytes);
      // An uncompressed image is read straight into the write blocks; a compressed one streams
      // through its decompressor.
      const raw = p.compression === "none" ? await open(p.imagePath, "r") : undefined;
      const img = raw ? undefined : openImage(p.imagePath, p.compression, signal);
      let w: WriteResult;
      try {
        w = await writeImage({
          source: raw ?? img!.stream,
          target: fh,
          capacity: p.targetBytes,
          signal,
          onProgress: (n) => report("write", n / p.imageBytes, `writing to ${p.target}`, n, p.imageBytes),
          hash: raw === undefined,
        });
        await img?.done;
      } finally {
        await raw?.close();
      }
      if (w.bytes !== p.imageBytes) {
        throw invalidArgument("spec.image_path", `the image is ${w.bytes} bytes once decompressed, but its GPT says ${p.imageBytes}`);
      }
      report("write", 1, "flushing to the disk", w.bytes, p.imageBytes);
      await fh.sync();

      // 3. read back: from the medium, not the page cache, for a block device.
      if (p.targetIsBlock) await run(tools.blockdev, ["--flushbufs", p.target], { signal, allowFailure: true });
      report("readback", 0, "reading the written image back", 0, p.imageBytes);
      const back = await readBack(fh, w.head, w.bytes, signal, (n) => report("readback", n / w.bytes, "reading the written image back", n, w.bytes));
      // An uncompressed image was not hashed again while written: what was read back must be the
      // verified file itself.
      const wrote = w.sha256 || p.sha256;
      if (back !== wrote) {
        throw new PiccoloError("internal", `read back ${back}, wrote ${wrote}: the target does not hold what was written (a failing disk, or the image changed since it was verified)`, { reason: "READBACK_MISMATCH" });
      }

      // 4. partition: the new first MiB and backup GPT, made by sgdisk on a sparse scratch copy.
      report("partition", 0, "moving the backup GPT to the end of the disk and growing ROOT");
      const scratch = join(scratchDir, "gpt.img");
      await writeFile(scratch, w.head, { mode: 0o600 });
      const sfh = await open(scratch, "r+");
      await sfh.truncate(p.targetBytes);
      await sfh.close();
      const rootLast = await growLastPartition(tools.sgdisk, scratch, p.root, signal);
      const sfh2 = await open(scratch, "r");
      const newHead = await readRange(sfh2, 0, HEAD_BYTES);
      const newTail = await readRange(sfh2, p.targetBytes - TAIL_BYTES, TAIL_BYTES);
      await sfh2.close();
      const rootBytes = (rootLast - p.root.firstLba + 1) * SECTOR;

      // 5. encrypt ROOT.
      let luksUuid = "";
      if (p.encryption === Encryption.ENCRYPTION_TPM2) {
        report("encrypt", 0, "making ROOT a LUKS2 volume and enrolling the TPM (PCR 7)");
        const lscratch = join(scratchDir, "root.luks");
        const lfh = await open(lscratch, "w", 0o600);
        await lfh.truncate(rootBytes);
        await lfh.close();
        const key = newRecoveryKey();
        const v = await makeTpm2Luks(tools, lscratch, key, deps.tpm2Device, "ROOT", signal);
        const hf = await open(lscratch, "r");
        const header = await readRange(hf, 0, v.headerBytes);
        await hf.close();
        await writeRange(fh, header, p.root.firstLba * SECTOR);
        await fh.sync();
        luksUuid = v.uuid;
        handoff.put(ctx.id, key);
        report("encrypt", 1, `ROOT is LUKS2 ${v.uuid}, unlocked by the TPM at boot`);
      }

      // 6. configure: Ignition (and the unlock line) into OEM.
      let ignitionWritten = false;
      const ign = luksUuid ? encryptedIgnition(luksUuid, p.ignition) : p.ignition;
      if (ign && p.oem) {
        report("configure", 0, "writing the Ignition config into OEM");
        await fh.sync();
        const files: Record<string, string> = { "config.ign": ign };
        if (luksUuid) files["grub.cfg"] = encryptedGrubCfg(luksUuid);
        await writeOemFiles(p.target, p.oem, files, scratchDir, signal);
        ignitionWritten = true;
      }

      // 7. commit: backup GPT, then the first MiB; not interruptible by cancel from here.
      report("commit", 0, "writing the partition table (the first MiB, last)");
      await writeRange(fh, newTail, p.targetBytes - TAIL_BYTES);
      await fh.sync();
      await writeRange(fh, newHead, 0);
      await fh.sync();
      committed = true;
      await fh.close();
      fh = undefined;
      if (p.targetIsBlock) await run(tools.blockdev, ["--rereadpt", p.target], { allowFailure: true });
      report("commit", 1, `installed on ${p.target}`);
      const result = InstallResult.fromPartial({
        target: p.target,
        imagePath: p.imagePath,
        imageVersion: p.version,
        bytesWritten: w.bytes,
        writtenSha256: back,
        rootBytes,
        ignitionWritten,
        encryption: p.encryption,
        luksUuid,
        recoveryKey: "", // never journaled; the starting stream gets it from the handoff
      });
      return Any.fromPartial({ typeUrl: "type.googleapis.com/piccolo.installer.v1.InstallResult", value: InstallResult.encode(result).finish() });
    } catch (e) {
      if (touched && !committed) {
        const left = `${p.target} was left with its first MiB zeroed (no partition table, not bootable) during phase "${phase}"; plan and install again`;
        if (signal.aborted) throw new PiccoloError("cancelled", left, { cause: e });
        const pe = e instanceof PiccoloError ? e : undefined;
        throw new PiccoloError(pe?.kind ?? "internal", `${(e as Error).message}; ${left}`, { cause: e, reason: pe?.reason, field: pe?.field });
      }
      throw e;
    } finally {
      await fh?.close().catch(() => undefined);
      await rm(scratchDir, { recursive: true, force: true });
    }
  };

  /** Writes files into the OEM filesystem: ext4 with debugfs at the partition's offset, others through a loop mount. */
  const writeOemFiles = async (target: string, oem: GptPartition, files: Record<string, string>, dir: string, signal: AbortSignal): Promise<void> => {
    const offset = oem.firstLba * SECTOR;
    const fh = await open(target, "r");
    const sb = await readRange(fh, offset + 1024, 64);
    await fh.close();
    const ext = sb.length >= 58 && sb.readUInt16LE(56) === 0xef53;
    if (ext) {
      const dev = `${target}?offset=${offset}`;
      const cmds: string[] = [];
      for (const [name, text] of Object.entries(files)) {
        const src = join(dir, name);
        await writeFile(src, text, { mode: 0o644 });
        cmds.push(`rm ${name}`, `write ${src} ${name}`);
      }
      const cmdFile = join(dir, "debugfs.cmds");
      await writeFile(cmdFile, cmds.join("\n") + "\n");
      await run(tools.debugfs, ["-w", "-f", cmdFile, dev], { signal });
      for (const [name, text] of Object.entries(files)) {
        const back = await run(tools.debugfs, ["-R", `cat ${name}`, dev], { signal });
        if (back.stdout !== text) throw new PiccoloError("internal", `debugfs did not write ${name} into the OEM filesystem: ${back.stderr.trim()}`);
      }
      return;
    }
    const mnt = join(dir, "oem");
    await run("mkdir", ["-p", mnt]);
    const size = (oem.lastLba - oem.firstLba + 1) * SECTOR;
    await run("mount", ["-o", `loop,offset=${offset},sizelimit=${size}`, target, mnt], { signal });
    try {
      for (const [name, text] of Object.entries(files)) await writeFile(join(mnt, name), text, { mode: 0o644 });
    } finally {
      await run("umount", [mnt], { allowFailure: true });
    }
  };

  const kind: OperationKind<PreparedInstall> = {
    kind: INSTALL_KIND,
    requestType: "piccolo.installer.v1.InstallRequest",
    encodeRequest: (p) => InstallRequest.encode(p.request).finish(),
    exclusive: true,
    single: true,
    cancellable: true,
    run: runInstall,
    async recover(op: Operation) {
      // A killed daemon left its scratch files (sparse GPT and LUKS header copies; never a key).
      await rm(scratchDirOf(op.id), { recursive: true, force: true });
      let target = "";
      try {
        target = InstallRequest.decode(op.request?.value ?? new Uint8Array()).spec?.target ?? "";
        const fh = await open(target, "r");
        const head = await readRange(fh, 0, HEAD_BYTES);
        await fh.close();
        if (!parseGpt(head)) return `${target} has no valid primary partition table (its first MiB was written last and never was): not bootable; plan and install again`;
        return `${target} has a partition table: the install was interrupted while committing; check it with sgdisk -v ${target} and install again`;
      } catch (e) {
        return `the target ${target || "(unknown)"} could not be checked (${(e as Error).message})`;
      }
    },
  };

  return {
    async environment() {
      const cmdline = (await readFile(deps.kernelCmdlineFile, "utf8").catch(() => "")).trim();
      const live = cmdline.split(/\s+/).some((t) => t === "piccolo.live" || (t.startsWith("piccolo.live=") && !["0", "no", "false"].includes(t.slice(13))));
      return { live, kernelCmdline: cmdline, bootDisk: await bootDisk(), images: await listImages() };
    },
    async listDisks(signal) {
      const [devices, boot, live, min] = await Promise.all([
        deps.inventory.list(signal),
        bootDisk(),
        diskOfFolder(deps.imageDirs[0] ?? "/nonexistent"),
        liveImageBytes(),
      ]);
      return devices.map((d) => diskOut(d, reasonsFor(d, boot, live, Math.max(deps.minDiskBytes, min))));
    },
    async plan(spec, signal) {
      const { plan, prepared, binding } = await planImpl(spec, signal);
      plan.confirmationToken = sign({ ...binding, exp: Date.now() + TOKEN_TTL_MS });
      log.info({ target: prepared.target, image: prepared.imagePath }, "install planned");
      return { plan, prepared };
    },
    async confirm(request, signal) {
      const token = request.confirmationToken;
      if (!token) throw invalidArgument("confirmation_token", "required: run PlanInstall with the same spec first and pass its confirmation_token");
      const [body = "", mac = ""] = token.split(".");
      const want = createHmac("sha256", secret).update(body).digest();
      const got = Buffer.from(mac, "base64url");
      if (got.length !== want.length || !timingSafeEqual(got, want)) {
        throw invalidArgument("confirmation_token", "not a token from this piccolod's PlanInstall (or piccolod restarted since); plan again");
      }
      const claimed = JSON.parse(Buffer.from(body, "base64url").toString("utf8")) as Record<string, unknown>;
      if (typeof claimed["exp"] !== "number" || claimed["exp"] < Date.now()) {
        throw new PiccoloError("failed_precondition", "confirmation_token: expired; plan again", { reason: "STALE_CONFIRMATION", field: "confirmation_token" });
      }
      const { prepared, binding } = await planImpl(request.spec, signal);
      const changed = Object.keys(binding).filter((k) => JSON.stringify(binding[k as keyof typeof binding]) !== JSON.stringify(claimed[k]));
      if (changed.length > 0) {
        const what =
          changed.includes("fp") || changed.includes("bytes")
            ? "the target disk changed since the plan"
            : claimed["version"] && ["version", "sha256", "url", "sig"].some((k) => changed.includes(k))
              ? `the update server's release changed since the plan (${changed.join(", ")})`
              : `the request differs from the plan (${changed.join(", ")})`;
        throw new PiccoloError("failed_precondition", `confirmation_token: stale: ${what}; plan again`, { reason: "STALE_CONFIRMATION", field: "confirmation_token" });
      }
      return { ...prepared, request };
    },
    kind,
    recoveryKeys: handoff,
  };
}
