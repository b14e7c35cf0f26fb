/**
 * The host's block devices, read from `lsblk -J -b -O`. A small standalone module: the installer
 * uses it to pick targets and the storage area to list disks. It only reads; nothing here changes
 * a device.
 */
import { execFile } from "node:child_process";
import { unavailable } from "../errors.js";

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

/** Reads the block device inventory. */
export interface DiskInventory {
  /** Every disk-like device (disks, loop devices with a backing file, …), in lsblk's order. */
  list(signal?: AbortSignal): Promise<BlockDevice[]>;
  /** One device by path (after resolving symlinks such as /dev/disk/by-id/…); undefined when lsblk does not list it. */
  get(path: string, signal?: AbortSignal): Promise<BlockDevice | undefined>;
}

/** Options of createDiskInventory. */
export interface DiskInventoryOptions {
  /** The lsblk binary. */
  readonly lsblk?: string;
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
  partlabel?: string | null;
  mountpoint?: string | null;
  mountpoints?: (string | null)[] | null;
  children?: RawDevice[];
}

const str = (v: unknown): string => (typeof v === "string" ? v.trim() : "");
const num = (v: unknown): number => (typeof v === "number" ? v : typeof v === "string" && v !== "" ? Number(v) : 0);
const bool = (v: unknown): boolean => v === true || v === "1" || v === 1;

const mounts = (d: RawDevice): string[] => {
  const all = [...(d.mountpoints ?? []), d.mountpoint].filter((m): m is string => typeof m === "string" && m !== "");
  return [...new Set(all)];
};

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
  path: str(d.path) || `/dev/${str(d.name)}`,
  type: str(d.type),
  partLabel: str(d.partlabel),
  fsLabel: str(d.label),
  fsType: str(d.fstype),
  sizeBytes: num(d.size),
  mountPoints: mounts(d),
  children: (d.children ?? []).map(partitionOf),
});

/** Parses `lsblk -J -b -O` output into whole devices (partitions nested); skips empty loop devices. */
export function parseLsblk(json: string): BlockDevice[] {
  const doc = JSON.parse(json) as { blockdevices?: RawDevice[] };
  const out: BlockDevice[] = [];
  for (const d of doc.blockdevices ?? []) {
    const size = num(d.size);
    if (d.type === "loop" && size === 0) continue; // an unattached loop device
    if (d.type === "part") continue;
    out.push({
      path: str(d.path) || `/dev/${str(d.name)}`,
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

/** Creates the lsblk-backed inventory. */
export function createDiskInventory(options: DiskInventoryOptions = {}): DiskInventory {
  const bin = options.lsblk ?? "lsblk";
  const read = (args: string[], signal?: AbortSignal): Promise<BlockDevice[]> =>
    new Promise((resolve, reject) => {
      execFile(bin, ["-J", "-b", "-O", ...args], { signal, maxBuffer: 32 << 20 }, (err, stdout, stderr) => {
        if (err) {
          if ((err as NodeJS.ErrnoException).code === "ENOENT") return reject(unavailable(`lsblk (${bin})`, err));
          if (err.name === "AbortError") return reject(err);
          const e = new Error(`lsblk failed: ${stderr.trim() || err.message}`) as Error & { lsblkFailed: true };
          e.lsblkFailed = true;
          return reject(e);
        }
        try {
          resolve(parseLsblk(stdout));
        } catch (e) {
          reject(new Error(`lsblk printed JSON piccolod cannot read: ${(e as Error).message}`));
        }
      });
    });
  return {
    list: (signal) => read([], signal),
    async get(path, signal) {
      try {
        const [d] = await read([path], signal);
        return d;
      } catch (e) {
        if ((e as { lsblkFailed?: boolean }).lsblkFailed) return undefined; // not a block device lsblk knows
        throw e;
      }
    },
  };
}
