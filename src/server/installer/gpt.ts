/**
 * Reads a GUID partition table from the first MiB of an image (primary header at LBA 1), and
 * changes a table with sgdisk: move the backup GPT to the end of the disk and grow the last
 * partition (ROOT on Flatcar) to fill it.
 */
import { createHash } from "node:crypto";
import { run } from "./exec.js";

/** Bytes per logical sector this installer handles (Flatcar images are built with 512). */
export const SECTOR = 512;
/** The region written last: protective MBR, primary GPT header and entries. */
export const HEAD_BYTES = 1 << 20;

/** One GPT partition entry. */
export interface GptPartition {
  /** 1-based partition number. */
  readonly number: number;
  readonly typeGuid: string;
  readonly uniqueGuid: string;
  readonly firstLba: number;
  readonly lastLba: number;
  readonly attributes: bigint;
  readonly name: string;
}

/** A parsed primary GPT. */
export interface Gpt {
  readonly diskGuid: string;
  /** LBA of the backup header: the image's last sector, so the image is (backupLba + 1) sectors. */
  readonly backupLba: number;
  readonly firstUsableLba: number;
  readonly lastUsableLba: number;
  readonly partitions: readonly GptPartition[];
}

const guid = (b: Buffer, o: number): string => {
  const h = (s: number, e: number, rev: boolean): string => {
    const part = Buffer.from(b.subarray(o + s, o + e));
    if (rev) part.reverse();
    return part.toString("hex");
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
};

/** Parses the primary GPT in `head` (at least the first 34 sectors); undefined when there is none or its CRCs are wrong. */
export function parseGpt(head: Buffer): Gpt | undefined {
  if (head.length < 34 * SECTOR) return undefined;
  const h = head.subarray(SECTOR, 2 * SECTOR);
  if (h.toString("latin1", 0, 8) !== "EFI PART") return undefined;
  const headerSize = h.readUInt32LE(12);
  if (headerSize < 92 || headerSize > SECTOR) return undefined;
  const hdr = Buffer.from(h.subarray(0, headerSize));
  const crc = hdr.readUInt32LE(16);
  hdr.writeUInt32LE(0, 16);
  if (crc32(hdr) !== crc) return undefined;
  const entriesLba = Number(h.readBigUInt64LE(72));
  const count = h.readUInt32LE(80);
  const size = h.readUInt32LE(84);
  const start = entriesLba * SECTOR;
  if (size < 128 || start + count * size > head.length) return undefined;
  const entries = head.subarray(start, start + count * size);
  if (crc32(entries) !== h.readUInt32LE(88)) return undefined;
  const partitions: GptPartition[] = [];
  for (let i = 0; i < count; i++) {
    const e = entries.subarray(i * size, (i + 1) * size);
    if (e.subarray(0, 16).every((x) => x === 0)) continue;
    partitions.push({
      number: i + 1,
      typeGuid: guid(e, 0),
      uniqueGuid: guid(e, 16),
      firstLba: Number(e.readBigUInt64LE(32)),
      lastLba: Number(e.readBigUInt64LE(40)),
      attributes: e.readBigUInt64LE(48),
      name: e.toString("utf16le", 56, 128).replace(/\0.*$/s, ""),
    });
  }
  return {
    diskGuid: guid(h, 56),
    backupLba: Number(h.readBigUInt64LE(32)),
    firstUsableLba: Number(h.readBigUInt64LE(40)),
    lastUsableLba: Number(h.readBigUInt64LE(48)),
    partitions,
  };
}

let table: Uint32Array | undefined;
/** CRC-32 (IEEE), as GPT uses. */
export function crc32(b: Uint8Array): number {
  if (!table) {
    table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (const x of b) c = table[(c ^ x) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** The partition named `name` (GPT partition name, e.g. "ROOT"). */
export const partitionNamed = (g: Gpt, name: string): GptPartition | undefined => g.partitions.find((p) => p.name === name);

/**
 * On a scratch image file that holds the new first MiB and is as large as the target: moves the
 * backup GPT to its end and grows partition `p` to the last usable sector, keeping its type,
 * unique GUID, name and attributes. Returns the grown partition's last LBA.
 */
export async function growLastPartition(sgdisk: string, scratch: string, p: GptPartition, signal?: AbortSignal): Promise<number> {
  const n = p.number;
  const args = [
    "-e",
    `-d${n}`,
    `-n${n}:${p.firstLba}:0`,
    `-t${n}:${p.typeGuid}`,
    `-u${n}:${p.uniqueGuid}`,
    `-c${n}:${p.name}`,
  ];
  if (p.attributes !== 0n) args.push(`-A${n}:=:${p.attributes.toString(16)}`);
  await run(sgdisk, [...args, scratch], { signal });
  const r = await run(sgdisk, ["-i", String(n), scratch], { signal });
  const m = /Last sector:\s*(\d+)/.exec(r.stdout);
  if (!m) throw new Error(`sgdisk -i ${n} printed no last sector`);
  return Number(m[1]);
}

/** Short fingerprint of some bytes (for confirmation tokens). */
export const fingerprint = (...parts: (Buffer | string)[]): string => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("base64url").slice(0, 32);
};
