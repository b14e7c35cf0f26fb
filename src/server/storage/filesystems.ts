/**
 * Mounted filesystems and their space, from the kernel: /proc/self/mountinfo for what is mounted
 * where, statfs(2) for the figures. The list is the one `df` shows: filesystems of size 0
 * (proc, sysfs, devpts …) are left out, and a filesystem mounted at several places is listed
 * once, at its shortest mount point (a bind mount of a folder of it is not a second filesystem).
 */
import { readFile, statfs } from "node:fs/promises";
import type { Filesystem } from "../../../gen/piccolo/storage/v1/storage.js";
import { unavailable } from "../errors.js";

/** One line of mountinfo. */
export interface MountEntry {
  readonly id: number;
  /** "major:minor" of the filesystem's device. */
  readonly device: string;
  readonly mountPoint: string;
  readonly options: readonly string[];
  readonly type: string;
  readonly source: string;
}

/** Undoes mountinfo's octal escapes ("\040" for a space). */
const unescape = (s: string): string => s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));

/** Parses /proc/self/mountinfo text. */
export function parseMountInfo(text: string): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    const [left, right] = line.split(" - ");
    if (!left || !right) continue;
    const f = left.split(" ");
    const r = right.split(" ");
    out.push({
      id: Number(f[0]),
      device: f[2] ?? "",
      mountPoint: unescape(f[4] ?? ""),
      options: (f[5] ?? "").split(","),
      type: r[0] ?? "",
      source: unescape(r[1] ?? ""),
    });
  }
  return out;
}

/** Keeps the entries `df` shows from a mount list: the last mount on each point, one per device. */
export function dfEntries(entries: readonly MountEntry[]): MountEntry[] {
  // A later mount on the same point hides the earlier one.
  const byPoint = new Map<string, MountEntry>();
  for (const e of entries) {
    byPoint.delete(e.mountPoint);
    byPoint.set(e.mountPoint, e);
  }
  const byDevice = new Map<string, MountEntry>();
  const order: MountEntry[] = [];
  for (const e of byPoint.values()) {
    const seen = byDevice.get(e.device);
    if (seen === undefined) {
      byDevice.set(e.device, e);
      order.push(e);
    } else if (e.mountPoint.length < seen.mountPoint.length) {
      byDevice.set(e.device, e);
      order[order.indexOf(seen)] = e;
    }
  }
  return order;
}

/** Lists the mounted filesystems with a size, as `df -B1` does. */
export async function listFilesystems(mountInfoFile = "/proc/self/mountinfo"): Promise<Filesystem[]> {
  let text: string;
  try {
    text = await readFile(mountInfoFile, "utf8");
  } catch (e) {
    throw unavailable(`mount table ${mountInfoFile}`, e);
  }
  const out: Filesystem[] = [];
  for (const e of dfEntries(parseMountInfo(text))) {
    let s;
    try {
      s = await statfs(e.mountPoint, { bigint: true });
    } catch {
      continue; // gone, or not ours to look at (e.g. a FUSE mount of another user)
    }
    if (s.blocks === 0n) continue;
    const size = s.blocks * s.bsize;
    out.push({
      mountPoint: e.mountPoint,
      source: e.source,
      type: e.type,
      sizeBytes: Number(size),
      usedBytes: Number((s.blocks - s.bfree) * s.bsize),
      availableBytes: Number(s.bavail * s.bsize),
      readOnly: e.options.includes("ro"),
      inodesTotal: Number(s.files),
      inodesFree: Number(s.ffree),
    });
  }
  return out;
}
