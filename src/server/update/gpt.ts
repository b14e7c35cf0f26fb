/**
 * The A/B USR slots on the boot disk: read with `sgdisk` (labels, GUIDs, attribute bits 48–51
 * priority, 52–55 tries, 56 successful) and changed with `cgpt add -i N -P/-T/-S`, which is how
 * Debian's cgpt sets what Flatcar's `cgpt prioritize` would (FLATCAR.md). The booted slot is the
 * one whose PARTUUID the kernel command line names; the next boot is what GRUB's gptprio picks.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { promisify } from "node:util";
import { PiccoloError, unavailable } from "../errors.js";

const run = promisify(execFile);

/** One USR partition as read from the GPT. */
export interface UsrSlot {
  /** "A" or "B". */
  readonly name: "A" | "B";
  readonly label: "USR-A" | "USR-B";
  readonly number: number;
  readonly guid: string;
  readonly priority: number;
  readonly tries: number;
  readonly successful: boolean;
  /** First byte on the disk and size in bytes. */
  readonly offset: number;
  readonly bytes: number;
}

/** Both slots, which booted and which boots next. */
export interface SlotTable {
  readonly disk: string;
  readonly a: UsrSlot;
  readonly b: UsrSlot;
  /** The booted slot, or undefined when the command line names neither. */
  readonly booted: UsrSlot | undefined;
  /** What GRUB boots next, or undefined when neither slot is bootable. */
  readonly next: UsrSlot | undefined;
}

async function tool(cmd: string, args: string[], what: string): Promise<string> {
  try {
    return (await run(cmd, args, { maxBuffer: 4 << 20 })).stdout;
  } catch (e) {
    const err = e as NodeJS.ErrnoException & { stderr?: string };
    if (err.code === "ENOENT") throw unavailable(`${cmd} (needed to ${what})`);
    const detail = (err.stderr ?? err.message).trim().split("\n").slice(-2).join(" ");
    throw new PiccoloError("unavailable", `${cmd} ${args.join(" ")} failed: ${detail}`, { reason: "HOST_PART_UNAVAILABLE", cause: e });
  }
}

/** The attribute bits GRUB reads, from sgdisk's hex "Attribute flags". */
export function decodeAttributes(hex: string): { priority: number; tries: number; successful: boolean } {
  const v = BigInt(`0x${hex}`);
  return { priority: Number((v >> 48n) & 0xfn), tries: Number((v >> 52n) & 0xfn), successful: ((v >> 56n) & 1n) === 1n };
}

/** GRUB's choice: the highest priority among slots that are good or have tries left; A wins a tie. */
export function nextBoot(a: UsrSlot, b: UsrSlot): UsrSlot | undefined {
  const ok = [a, b].filter((s) => s.priority > 0 && (s.successful || s.tries > 0));
  return ok.sort((x, y) => y.priority - x.priority || x.number - y.number)[0];
}

/** The booted USR partition's GUID from a kernel command line (verity.usr=, mount.usr= or usr=PARTUUID=…). */
export function bootedGuid(cmdline: string): string | undefined {
  return /(?:^|\s)(?:verity\.usr|mount\.usr|usr)=PARTUUID=([0-9a-fA-F-]{36})(?:\s|$)/.exec(cmdline)?.[1]?.toUpperCase();
}

/** Reads the USR slots of `disk`. */
export async function readSlots(disk: string, cmdlineFile: string): Promise<SlotTable> {
  const table = await tool("sgdisk", ["-p", disk], `read the partition table of ${disk}`);
  const sector = Number(/Sector size \(logical\):\s*(\d+)/.exec(table)?.[1] ?? 512);
  const numbers = new Map<string, number>();
  for (const line of table.split("\n")) {
    const m = /^\s*(\d+)\s+\d+\s+\d+\s+\S+\s+\S+\s+[0-9A-F]{4}\s+(.*?)\s*$/.exec(line);
    if (m && (m[2] === "USR-A" || m[2] === "USR-B")) numbers.set(m[2], Number(m[1]));
  }
  const slot = async (label: "USR-A" | "USR-B"): Promise<UsrSlot> => {
    const n = numbers.get(label);
    if (n === undefined) throw new PiccoloError("unavailable", `the boot disk ${disk} has no partition labelled ${label}`, { reason: "HOST_PART_UNAVAILABLE" });
    const info = await tool("sgdisk", ["-i", String(n), disk], `read partition ${n} of ${disk}`);
    const guid = /Partition unique GUID:\s*([0-9A-F-]{36})/i.exec(info)?.[1]?.toUpperCase() ?? "";
    const first = Number(/First sector:\s*(\d+)/.exec(info)?.[1] ?? 0);
    const last = Number(/Last sector:\s*(\d+)/.exec(info)?.[1] ?? 0);
    const attrs = decodeAttributes(/Attribute flags:\s*([0-9A-Fa-f]{16})/.exec(info)?.[1] ?? "0");
    return { name: label === "USR-A" ? "A" : "B", label, number: n, guid, ...attrs, offset: first * sector, bytes: (last - first + 1) * sector };
  };
  const a = await slot("USR-A");
  const b = await slot("USR-B");
  let cmdline = "";
  try {
    cmdline = await readFile(cmdlineFile, "utf8");
  } catch (e) {
    throw unavailable(`the kernel command line ${cmdlineFile}`, e);
  }
  const g = bootedGuid(cmdline);
  const booted = g === a.guid ? a : g === b.guid ? b : undefined;
  return { disk, a, b, booted, next: nextBoot(a, b) };
}

/** Sets a USR slot's flags with `cgpt add`; fields left out stay as they are. */
export async function setSlotFlags(disk: string, n: number, f: { priority?: number; tries?: number; successful?: boolean }): Promise<void> {
  const args = ["add", "-i", String(n)];
  if (f.priority !== undefined) args.push("-P", String(f.priority));
  if (f.tries !== undefined) args.push("-T", String(f.tries));
  if (f.successful !== undefined) args.push("-S", f.successful ? "1" : "0");
  await tool("cgpt", [...args, disk], `set the boot flags of partition ${n} on ${disk}`);
}
