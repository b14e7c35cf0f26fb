/**
 * Builds Flatcar-shaped GPT disk images for installer tests with sgdisk: EFI-SYSTEM, BIOS-BOOT,
 * USR-A, USR-B, OEM (ext4) and ROOT (ext4, last, so it can be grown), numbered as Flatcar numbers
 * them (1, 2, 3, 4, 6, 9), with random bytes spread over the EFI and USR partitions so a comparison means
 * something. Also compresses them, signs them with a throwaway GPG key, and manages loop devices.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdtempSync, openSync, closeSync, writeSync, ftruncateSync, readSync, writeFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** Flatcar's partition type GUIDs. */
export const TYPE = {
  efi: "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
  biosBoot: "21686148-6449-6E6F-744E-656564454649",
  usr: "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6",
  oem: "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
  root: "3884DD41-8582-4404-B9A8-E9B84F2DF50E",
} as const;

/** One partition of the fixture, in sectors of 512 bytes. */
export interface FixturePartition {
  readonly number: number;
  readonly name: string;
  readonly type: string;
  readonly firstLba: number;
  readonly lastLba: number;
}

/** A built image. */
export interface FlatcarImage {
  /** The raw image. */
  readonly raw: string;
  readonly bytes: number;
  readonly partitions: readonly FixturePartition[];
}

const MiB = 1024 * 1024;
const sh = (cmd: string, args: string[], input?: string | Buffer): string => {
  const r = spawnSync(cmd, args, { input, encoding: "buffer", maxBuffer: 64 * MiB });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr.toString()}${r.stdout.toString()}`);
  return r.stdout.toString();
};

/**
 * Builds a raw Flatcar-shaped image of `sizeMiB` MiB at `path` (default 64): partitions sized in
 * proportion, ROOT taking what is left. `fill` writes random bytes into EFI, USR-A and USR-B
 * (default true; the benchmark fills everything with random data itself).
 */
export function buildFlatcarImage(path: string, sizeMiB = 64, fill = true): FlatcarImage {
  const bytes = sizeMiB * MiB;
  const fd = openSync(path, "w");
  ftruncateSync(fd, bytes);
  closeSync(fd);
  const unit = Math.max(1, Math.floor(sizeMiB / 32)); // MiB
  const plan: [number, string, string, number][] = [
    [1, "EFI-SYSTEM", TYPE.efi, 4 * unit],
    [2, "BIOS-BOOT", TYPE.biosBoot, 1],
    [3, "USR-A", TYPE.usr, 8 * unit],
    [4, "USR-B", TYPE.usr, 8 * unit],
    [6, "OEM", TYPE.oem, Math.max(4, 2 * unit)],
  ];
  const args = ["-o"];
  let start = 2048; // 1 MiB, as Flatcar's images begin
  for (const [n, name, type, mib] of plan) {
    const end = start + mib * 2048 - 1;
    args.push(`-n${n}:${start}:${end}`, `-t${n}:${type}`, `-c${n}:${name}`);
    start = end + 1;
  }
  args.push(`-n9:${start}:0`, `-t9:${TYPE.root}`, "-c9:ROOT");
  sh("sgdisk", [...args, path]);
  const partitions = readPartitions(path);
  const w = openSync(path, "r+");
  try {
    for (const p of partitions) {
      const off = p.firstLba * 512;
      const len = (p.lastLba - p.firstLba + 1) * 512;
      if (fill && ["EFI-SYSTEM", "USR-A", "USR-B"].includes(p.name)) {
        // 64 KiB of random bytes in every 256 KiB: any misplaced or lost block shows, and the
        // image still compresses quickly.
        for (let o = 0; o < len; o += 256 * 1024) writeSync(w, randomBytes(Math.min(65536, len - o)), 0, Math.min(65536, len - o), off + o);
      }
    }
  } finally {
    closeSync(w);
  }
  for (const p of partitions.filter((x) => x.name === "OEM" || x.name === "ROOT")) {
    const off = p.firstLba * 512;
    const kib = Math.floor(((p.lastLba - p.firstLba + 1) * 512) / 4096) * 4;
    sh("mkfs.ext4", ["-q", "-F", "-L", p.name, "-E", `offset=${off}`, path, `${kib}k`]);
  }
  // Something in OEM that must survive the installer's write of config.ign.
  const tmp = mkdtempSync(join(tmpdir(), "piccolo-oem-"));
  try {
    writeFileSync(join(tmp, "oem-release"), "ID=piccolo-test\n");
    const oem = partitions.find((p) => p.name === "OEM")!;
    sh("debugfs", ["-w", "-R", `write ${join(tmp, "oem-release")} oem-release`, `${path}?offset=${oem.firstLba * 512}`]);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return { raw: path, bytes, partitions };
}

/** The partitions sgdisk reads from a disk or image. */
export function readPartitions(path: string): FixturePartition[] {
  const out = sh("sgdisk", ["-p", path]);
  const parts: FixturePartition[] = [];
  for (const line of out.split("\n")) {
    const m = /^\s+(\d+)\s+(\d+)\s+(\d+)\s+\S+\s+\S+\s+(\S+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const number = Number(m[1]);
    const info = sh("sgdisk", ["-i", String(number), path]);
    const type = /Partition GUID code: (\S+)/.exec(info)?.[1] ?? "";
    parts.push({ number, firstLba: Number(m[2]), lastLba: Number(m[3]), name: m[5]!.trim(), type });
  }
  return parts;
}

/** Compresses `raw` next to it; returns the compressed file's path. */
export function compress(raw: string, how: "gzip" | "bzip2" | "zstd"): string {
  if (how === "gzip") sh("gzip", ["-1", "-k", "-f", raw]);
  if (how === "bzip2") sh("bzip2", ["-1", "-k", "-f", raw]);
  if (how === "zstd") sh("zstd", ["-q", "-1", "-f", "-k", raw]);
  return `${raw}.${how === "gzip" ? "gz" : how === "bzip2" ? "bz2" : "zst"}`;
}

/** A throwaway signing key in its own GnuPG home. */
export interface SigningKey {
  readonly home: string;
  /** The public keyring (gpg --export) to trust. */
  readonly keyring: string;
  /** Writes `<file>.asc` (armored detached signature) and `<file>.sha256`; returns the signature text. */
  sign(file: string): string;
  /** Armored detached signature of `file` without writing it. */
  signature(file: string): string;
  cleanup(): void;
}

/** Makes a new ed25519 signing key. */
export function makeSigningKey(name = "Piccolo Test Signing"): SigningKey {
  const home = mkdtempSync(join(tmpdir(), "piccolo-gpg-"));
  const gpg = (...a: string[]): string => sh("gpg", ["--homedir", home, "--batch", "--pinentry-mode", "loopback", "--passphrase", "", ...a]);
  gpg("--quick-gen-key", `${name} <test@piccolo.space>`, "ed25519", "sign", "never");
  const keyring = join(home, "trusted.gpg");
  writeFileSync(keyring, execFileSync("gpg", ["--homedir", home, "--batch", "--export"]));
  const signature = (file: string): string => gpg("--armor", "--detach-sign", "--output", "-", file);
  return {
    home,
    keyring,
    signature,
    sign(file) {
      const s = signature(file);
      writeFileSync(`${file}.asc`, s);
      writeFileSync(`${file}.sha256`, `${sh("sha256sum", [file]).split(" ")[0]}  ${file.split("/").pop()}\n`);
      return s;
    },
    cleanup() {
      spawnSync("gpgconf", ["--homedir", home, "--kill", "all"]);
      rmSync(home, { recursive: true, force: true });
    },
  };
}

/** SHA-256 of a file or a byte range of it, by sha256sum/dd. */
export function sha256Of(path: string, offset = 0, length?: number): string {
  if (offset === 0 && length === undefined) return sh("sha256sum", [path]).split(" ")[0]!;
  const r = spawnSync("sh", ["-c", `dd if="$1" bs=512 skip=$2 count=$3 iflag=skip_bytes,count_bytes status=none | sha256sum`, "sh", path, String(offset), String(length)], { encoding: "utf8" });
  return r.stdout.split(" ")[0]!;
}

/** Attaches a loop device; `readOnly` makes it read-only. */
export function attachLoop(file: string, readOnly = false): string {
  return sh("losetup", ["-f", "--show", ...(readOnly ? ["-r"] : []), file]).trim();
}

/** Detaches loop devices, ignoring ones already gone. */
export function detachLoops(devs: readonly string[]): void {
  for (const d of devs) spawnSync("losetup", ["-d", d]);
}

/** Makes a sparse file of `bytes`, optionally with an old GPT on it (to show it gets removed). */
export function sparseTarget(path: string, bytes: number, withOldTable = false): string {
  const fd = openSync(path, "w");
  ftruncateSync(fd, bytes);
  closeSync(fd);
  if (withOldTable) sh("sgdisk", ["-o", "-n1:2048:+4M", "-c1:OLD-DATA", path]);
  return path;
}

/** Reads a byte range of a file. */
export function readRange(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const b = Buffer.alloc(length);
    const n = readSync(fd, b, 0, length, offset);
    return b.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}
