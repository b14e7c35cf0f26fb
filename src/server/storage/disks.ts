/**
 * The disk inventory: `lsblk -J -b -O` turned into Disk messages (disks and loop devices at the
 * top, partitions and stacked devices as children).
 *
 * NOTE for the merge: the installer area reads the same inventory (src/server/disks/); the two
 * should become one module there, with this file's listDisks() as the storage area's entry.
 */
import { readFile } from "node:fs/promises";
import type { Disk } from "../../../gen/piccolo/storage/v1/storage.js";
import { PiccoloError } from "../errors.js";
import { runTool } from "./run.js";

/** One device as lsblk -J -b -O prints it (only the columns used here). */
export interface LsblkDevice {
  name: string;
  path?: string | null;
  type?: string | null;
  size?: number | string | null;
  model?: string | null;
  serial?: string | null;
  tran?: string | null;
  rota?: boolean | string | null;
  rm?: boolean | string | null;
  ro?: boolean | string | null;
  fstype?: string | null;
  label?: string | null;
  uuid?: string | null;
  pttype?: string | null;
  partlabel?: string | null;
  parttype?: string | null;
  partuuid?: string | null;
  mountpoints?: (string | null)[] | null;
  mountpoint?: string | null;
  "back-file"?: string | null;
  children?: LsblkDevice[];
}

const str = (v: unknown): string => (typeof v === "string" ? v.trim() : "");
const bool = (v: unknown): boolean => v === true || v === "1" || v === 1;
const num = (v: unknown): number => (typeof v === "number" ? v : typeof v === "string" && /^\d+$/.test(v) ? Number(v) : 0);

/** Converts one lsblk device (and its children) to a Disk. */
export function diskFromLsblk(d: LsblkDevice): Disk {
  const mps = (d.mountpoints ?? (d.mountpoint ? [d.mountpoint] : [])).filter((m): m is string => typeof m === "string" && m !== "");
  return {
    name: d.name,
    path: str(d.path) || `/dev/${d.name}`,
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
    mountPoints: mps,
    backingFile: str(d["back-file"]),
    children: (d.children ?? []).map(diskFromLsblk),
  };
}

/** Runs lsblk and returns its raw device tree. */
export async function lsblkTree(signal?: AbortSignal, devices: readonly string[] = []): Promise<LsblkDevice[]> {
  const r = await runTool("lsblk", ["-J", "-b", "-O", ...devices], { signal }, "install util-linux (lsblk)");
  if (r.code !== 0) throw new PiccoloError("unavailable", `lsblk failed (exit ${r.code}): ${r.stderr.trim()}`, { reason: "HOST_PART_UNAVAILABLE" });
  const parsed = JSON.parse(r.stdout) as { blockdevices?: LsblkDevice[] };
  return parsed.blockdevices ?? [];
}

/** The disk inventory: every block device lsblk reports, as a tree. */
export async function listDisks(signal?: AbortSignal): Promise<Disk[]> {
  const disks = (await lsblkTree(signal)).map(diskFromLsblk);
  // Some lsblk versions leave the loop backing file out of -O: the kernel has it in sysfs.
  for (const d of disks) {
    if (d.type === "loop" && d.backingFile === "") {
      d.backingFile = (await readFile(`/sys/block/${d.name}/loop/backing_file`, "utf8").catch(() => "")).trim();
    }
  }
  return disks;
}

/** Every device in the tree, depth first. */
export function flattenDisks(disks: readonly Disk[]): Disk[] {
  return disks.flatMap((d) => [d, ...flattenDisks(d.children)]);
}
