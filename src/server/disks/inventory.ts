/**
 * The host's block devices, read from `lsblk -J -b -O`. One module for both readers: the installer
 * picks targets from list()/get(), the storage area lists disks with tree(). It only reads;
 * nothing here changes a device.
 */
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { Disk } from "../../../gen/piccolo/storage/v1/storage.js";
import { PiccoloError } from "../errors.js";
import { runTool } from "../storage/run.js";

/** How a disk is attached, from lsblk's TRAN (and TYPE for loop devices). */
export type DiskTransport = "usb" | "nvme" | "sata" | "virtio" | "scsi" | "loop" | "other" | "";

/** A partition (or any child of a disk: a LUKS mapping, an LVM volume). */
export interface BlockPartition {
  readonly path: string;
  /** lsblk TYPE: "part", "crypt", "lvm", … */
  readonly type: string;
  /** GPT partition name (PARTLABEL). */
  readonly partLabel: string;
  /** Filesystem label. */
  readonly fsLabel: string;
  readonly fsType: string;
  readonly sizeBytes: number;
  /** Mount points, "[SWAP]" for active swap. */
  readonly mountPoints: readonly string[];
  /** Children (a mapping opened on this partition). */
  readonly children: readonly BlockPartition[];
}

/** A whole block device. */
export interface BlockDevice {
  readonly path: string;
  readonly name: string;
  /** "major:minor". */
  readonly majMin: string;
  /** lsblk TYPE: "disk", "loop", "rom", … */
  readonly type: string;
  readonly model: string;
  readonly serial: string;
  readonly sizeBytes: number;
  readonly transport: DiskTransport;
  readonly rotational: boolean;
  readonly removable: boolean;
  readonly readOnly: boolean;
  readonly logicalSectorSize: number;
  /** Partition table type ("gpt", "dos") when lsblk knows it. */
  readonly partitionTable: string;
  /** Filesystem on the whole device, if any. */
  readonly fsType: string;
  /** Where the whole device is mounted. */
  readonly mountPoints: readonly string[];
  readonly partitions: readonly BlockPartition[];
}

/**
 * Any device lsblk prints, as the storage area reports it (piccolo.storage.v1.Disk): lsblk's values
 * as they are (TRAN unmapped, MOUNTPOINTS in lsblk's order), children nested.
 */
export type DiskNode = Disk;

/** Reads the block device inventory. */
export interface DiskInventory {
  /** Every disk-like device (disks, loop devices with a backing file, …), in lsblk's order. */
  list(signal?: AbortSignal): Promise<BlockDevice[]>;
  /** One device by path (after resolving symlinks such as /dev/disk/by-id/…); undefined when lsblk does not list it. */
  get(path: string, signal?: AbortSignal): Promise<BlockDevice | undefined>;
  /** Every device lsblk prints (empty loop devices and all), as a tree; a loop device's backing file filled in from sysfs when lsblk leaves it out. */
  tree(signal?: AbortSignal): Promise<DiskNode[]>;
}

/** Options of createDiskInventory. */
export interface DiskInventoryOptions {
  /** The lsblk binary. */
  readonly lsblk?: string;
  /** Where sysfs is mounted (loop devices' backing files); default /sys. */
  readonly sysfsRoot?: string;
}

interface RawDevice {
  name?: string;
  path?: string;
  "maj:min"?: string;
  type?: string;
  model?: string | null;
  serial?: string | null;
  size?: number | string | null;
  tran?: string | null;
  subsystems?: string | null;
  rota?: boolean | string | null;
  rm?: boolean | string | null;
  ro?: boolean | string | null;
  "log-sec"?: number | string | null;
  pttype?: string | null;
  fstype?: string | null;
  label?: string | null;
  uuid?: string | null;
  partlabel?: string | null;
  parttype?: string | null;
  partuuid?: string | null;
  "back-file"?: string | null;
  mountpoint?: string | null;
  mountpoints?: (string | null)[] | null;
  children?: RawDevice[];
}

const str = (v: unknown): string => (typeof v === "string" ? v.trim() : "");
const num = (v: unknown): number => (typeof v === "number" ? v : typeof v === "string" && /^\d+$/.test(v) ? Number(v) : 0);
const bool = (v: unknown): boolean => v === true || v === "1" || v === 1;
const devPath = (d: RawDevice): string => str(d.path) || `/dev/${str(d.name)}`;

/** MOUNTPOINTS as lsblk lists them (older lsblk: the single MOUNTPOINT). */
const mountList = (d: RawDevice): string[] =>
  (d.mountpoints ?? (d.mountpoint ? [d.mountpoint] : [])).filter((m): m is string => typeof m === "string" && m !== "");

/** Every place the device is mounted (MOUNTPOINTS and MOUNTPOINT), once each. */
const mounts = (d: RawDevice): string[] => [...new Set([...(d.mountpoints ?? []), d.mountpoint].filter((m): m is string => typeof m === "string" && m !== ""))];

const transportOf = (d: RawDevice): DiskTransport => {
  if (d.type === "loop") return "loop";
  const t = str(d.tran).toLowerCase();
  if (t === "usb") return "usb";
  if (t === "nvme") return "nvme";
  if (t === "sata" || t === "ata") return "sata";
  if (t === "sas" || t === "fc" || t === "iscsi" || t === "spi") return "scsi";
  if (t) return "other";
  // lsblk leaves TRAN empty for virtio disks; the subsystem chain names it.
  const sub = str(d.subsystems);
  if (sub.includes("virtio")) return "virtio";
  if (sub.includes("nvme")) return "nvme";
  if (sub.includes("usb")) return "usb";
  if (sub.includes("mmc")) return "other";
  return "";
};

const partitionOf = (d: RawDevice): BlockPartition => ({
  path: devPath(d),
  type: str(d.type),
  partLabel: str(d.partlabel),
  fsLabel: str(d.label),
  fsType: str(d.fstype),
  sizeBytes: num(d.size),
  mountPoints: mounts(d),
  children: (d.children ?? []).map(partitionOf),
});

const nodeOf = (d: RawDevice): DiskNode => ({
  name: str(d.name),
  path: devPath(d),
  type: str(d.type),
  sizeBytes: num(d.size),
  model: str(d.model),
  serial: str(d.serial),
  transport: str(d.tran),
  rotational: bool(d.rota),
  removable: bool(d.rm),
  readOnly: bool(d.ro),
  fsType: str(d.fstype),
  label: str(d.label),
  uuid: str(d.uuid),
  partitionTableType: str(d.pttype),
  partitionLabel: str(d.partlabel),
  partitionType: str(d.parttype),
  partitionUuid: str(d.partuuid),
  mountPoints: mountList(d),
  backingFile: str(d["back-file"]),
  children: (d.children ?? []).map(nodeOf),
});

/** The top-level devices of `lsblk -J` output. */
function rawDevices(json: string): RawDevice[] {
  try {
    return (JSON.parse(json) as { blockdevices?: RawDevice[] }).blockdevices ?? [];
  } catch (e) {
    throw new Error(`lsblk printed JSON piccolod cannot read: ${(e as Error).message}`);
  }
}

/** Parses `lsblk -J -b -O` output into every device it lists, as a tree (for the storage area). */
export function parseLsblkTree(json: string): DiskNode[] {
  return rawDevices(json).map(nodeOf);
}

/** Parses `lsblk -J -b -O` output into whole devices (partitions nested); skips empty loop devices. */
export function parseLsblk(json: string): BlockDevice[] {
  return wholeDevices(rawDevices(json));
}

/** The whole devices among lsblk's top-level ones (partitions nested), without empty loop devices. */
function wholeDevices(devices: readonly RawDevice[]): BlockDevice[] {
  const out: BlockDevice[] = [];
  for (const d of devices) {
    const size = num(d.size);
    if (d.type === "loop" && size === 0) continue; // an unattached loop device
    if (d.type === "part") continue;
    out.push({
      path: devPath(d),
      name: str(d.name),
      majMin: str(d["maj:min"]),
      type: str(d.type),
      model: str(d.model),
      serial: str(d.serial),
      sizeBytes: size,
      transport: transportOf(d),
      rotational: bool(d.rota),
      removable: bool(d.rm),
      readOnly: bool(d.ro),
      logicalSectorSize: num(d["log-sec"]) || 512,
      partitionTable: str(d.pttype),
      fsType: str(d.fstype),
      mountPoints: mounts(d),
      partitions: (d.children ?? []).map(partitionOf),
    });
  }
  return out;
}

/** Every mount point on a device or any of its partitions and their children. */
export function allMountPoints(d: BlockDevice): string[] {
  const acc = [...d.mountPoints];
  const walk = (ps: readonly BlockPartition[]): void => {
    for (const p of ps) {
      acc.push(...p.mountPoints);
      walk(p.children);
    }
  };
  walk(d.partitions);
  return acc;
}

/** lsblk exited non-zero (for get(): the path is not a block device lsblk knows). */
class LsblkFailed extends PiccoloError {}

/** Creates the lsblk-backed inventory. */
export function createDiskInventory(options: DiskInventoryOptions = {}): DiskInventory {
  const bin = options.lsblk ?? "lsblk";
  const sysfs = options.sysfsRoot ?? "/sys";
  const read = async (args: readonly string[], signal?: AbortSignal): Promise<RawDevice[]> => {
    const r = await runTool(bin, ["-J", "-b", "-O", ...args], { signal }, "install util-linux (lsblk)");
    if (r.code !== 0) throw new LsblkFailed("unavailable", `lsblk failed (exit ${r.code}): ${r.stderr.trim()}`, { reason: "HOST_PART_UNAVAILABLE" });
    return rawDevices(r.stdout);
  };
  return {
    list: async (signal) => wholeDevices(await read([], signal)),
    async get(path, signal) {
      try {
        const [d] = wholeDevices(await read([path], signal));
        return d;
      } catch (e) {
        if (e instanceof LsblkFailed) return undefined; // not a block device lsblk knows
        throw e;
      }
    },
    async tree(signal) {
      const disks = (await read([], signal)).map(nodeOf);
      // Some lsblk versions leave the loop backing file out of -O: the kernel has it in sysfs.
      for (const d of disks) {
        if (d.type === "loop" && d.backingFile === "") {
          d.backingFile = (await readFile(join(sysfs, "block", d.name, "loop", "backing_file"), "utf8").catch(() => "")).trim();
        }
      }
      return disks;
    },
  };
}

/** Every device in a tree, depth first. */
export function flattenTree(disks: readonly DiskNode[]): DiskNode[] {
  return disks.flatMap((d) => [d, ...flattenTree(d.children)]);
}
