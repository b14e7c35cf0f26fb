/**
 * Boot disk images laid out as on Flatcar (EFI-SYSTEM, BIOS-BOOT, USR-A, USR-B, OEM, OEM-CONFIG,
 * ROOT, with USR partitions of Flatcar's type GUID), made with sgdisk and flagged with cgpt, for
 * the update_engine simulator, the update tests and the benchmark. Also the kernel command line
 * and release file that tell which USR slot "booted".
 */
import { execFile } from "node:child_process";
import { open, writeFile } from "node:fs/promises";
import { promisify } from "node:util";

const run = promisify(execFile);

/** Flatcar's USR partition type GUID. */
export const USR_TYPE_GUID = "5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6";

/** A disk image and where its USR slots are. */
export interface FlatcarDisk {
  readonly path: string;
  /** Partition numbers (3 and 4 on Flatcar). */
  readonly usrA: number;
  readonly usrB: number;
  /** Unique GUIDs of USR-A and USR-B. */
  readonly guidA: string;
  readonly guidB: string;
  /** First byte of each USR partition in the image. */
  readonly offsetA: number;
  readonly offsetB: number;
  /** Size of each USR partition in bytes. */
  readonly usrBytes: number;
}

const MiB = 1024 * 1024;

/**
 * Makes a sparse GPT disk image with Flatcar's partition labels. USR-A is the booted, good slot
 * (priority 1, tries 0, successful 1) and holds `contentA` (a marker by default); USR-B is empty
 * and has never booted (all flags 0).
 */
export async function makeFlatcarDisk(path: string, usrMiB: number, contentA = "USR-A: Flatcar 1.0.0\n"): Promise<FlatcarDisk> {
  const total = (usrMiB * 2 + 16) * MiB;
  const fh = await open(path, "w");
  await fh.truncate(total);
  await fh.close();
  await run("sgdisk", ["-o", path]);
  await run("sgdisk", [
    "-n", "1:0:+2M", "-t", "1:EF00", "-c", "1:EFI-SYSTEM",
    "-n", "2:0:+1M", "-t", "2:EF02", "-c", "2:BIOS-BOOT",
    "-n", `3:0:+${usrMiB}M`, "-t", `3:${USR_TYPE_GUID}`, "-c", "3:USR-A",
    "-n", `4:0:+${usrMiB}M`, "-t", `4:${USR_TYPE_GUID}`, "-c", "4:USR-B",
    "-n", "6:0:+2M", "-t", "6:8300", "-c", "6:OEM",
    "-n", "7:0:+1M", "-t", "7:8300", "-c", "7:OEM-CONFIG",
    "-n", "9:0:0", "-t", "9:8300", "-c", "9:ROOT",
    path,
  ]);
  await run("cgpt", ["add", "-i", "3", "-P", "1", "-T", "0", "-S", "1", path]);
  await run("cgpt", ["add", "-i", "4", "-P", "0", "-T", "0", "-S", "0", path]);
  const show = async (flag: string, n: number): Promise<string> => (await run("cgpt", ["show", "-i", String(n), flag, path])).stdout.trim();
  const disk: FlatcarDisk = {
    path,
    usrA: 3,
    usrB: 4,
    guidA: await show("-u", 3),
    guidB: await show("-u", 4),
    offsetA: Number(await show("-b", 3)) * 512,
    offsetB: Number(await show("-b", 4)) * 512,
    usrBytes: Number(await show("-s", 3)) * 512,
  };
  const w = await open(path, "r+");
  await w.write(Buffer.from(contentA), 0, Buffer.byteLength(contentA), disk.offsetA);
  await w.close();
  return disk;
}

/** Writes a kernel command line that says `guid` is the booted USR partition, as Flatcar's GRUB does. */
export async function writeCmdline(path: string, guid: string): Promise<void> {
  await writeFile(path, `BOOT_IMAGE=/flatcar/vmlinuz-a mount.usr=/dev/mapper/usr verity.usr=PARTUUID=${guid.toLowerCase()} rootflags=rw mount.usrflags=ro consoleblank=0 root=LABEL=ROOT flatcar.first_boot=detected\n`);
}

/** Writes a Flatcar release file (/usr/share/flatcar/release) with the booted version. */
export async function writeRelease(path: string, version: string): Promise<void> {
  await writeFile(path, `FLATCAR_RELEASE_VERSION=${version}\nFLATCAR_RELEASE_BOARD=amd64-usr\nFLATCAR_RELEASE_APPID={e96281a6-d1af-4bde-9a0a-97b76e56dc57}\n`);
}

/** `cgpt show -i N -P/-T/-S DISK` for one partition: what GRUB will read. */
export async function cgptFlags(disk: string, n: number): Promise<{ priority: number; tries: number; successful: number }> {
  const q = async (f: string): Promise<number> => Number((await run("cgpt", ["show", "-i", String(n), f, disk])).stdout.trim());
  return { priority: await q("-P"), tries: await q("-T"), successful: await q("-S") };
}

/** Reads `length` bytes of the image from `offset`. */
export async function readDisk(disk: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(disk, "r");
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}
