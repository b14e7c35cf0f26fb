import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildFlatcarImage } from "../../../test/helpers/flatcar-image.js";
import { crc32, growLastPartition, HEAD_BYTES, parseGpt, partitionNamed } from "./gpt.js";

test("crc32 is the IEEE CRC GPT uses", () => {
  expect(crc32(Buffer.from("123456789"))).toBe(0xcbf43926);
});

test("parseGpt reads what sgdisk wrote; growLastPartition grows ROOT to the end of a larger disk keeping its identity", async () => {
  const dir = mkdtempSync(join(tmpdir(), "piccolo-gpt-"));
  try {
    const img = buildFlatcarImage(join(dir, "a.img"), 32, false);
    const head = readFileSync(img.raw).subarray(0, HEAD_BYTES);
    const g = parseGpt(head)!;
    expect(g.backupLba).toBe(img.bytes / 512 - 1);
    expect(g.partitions.map((p) => [p.number, p.name, p.firstLba, p.lastLba])).toEqual(img.partitions.map((p) => [p.number, p.name, p.firstLba, p.lastLba]));
    expect(partitionNamed(g, "USR-A")!.typeGuid).toBe("5DFBF5F4-2848-4BAC-AA5E-0D9A20B745A6");
    const broken = Buffer.from(head);
    broken.writeUInt8(broken.readUInt8(512 + 60) ^ 1, 512 + 60); // the disk GUID, inside the CRC-covered header
    expect(parseGpt(broken)).toBeUndefined();
    expect(parseGpt(Buffer.alloc(HEAD_BYTES))).toBeUndefined();

    spawnSync("truncate", ["-s", "64M", img.raw]);
    const root = partitionNamed(g, "ROOT")!;
    const last = await growLastPartition("sgdisk", img.raw, root);
    expect(last).toBe((64 * 1024 * 1024) / 512 - 34);
    const g2 = parseGpt(readFileSync(img.raw).subarray(0, HEAD_BYTES))!;
    expect(partitionNamed(g2, "ROOT")).toMatchObject({ number: 9, firstLba: root.firstLba, lastLba: last, uniqueGuid: root.uniqueGuid, typeGuid: root.typeGuid });
    expect(spawnSync("sgdisk", ["-v", img.raw], { encoding: "utf8" }).stdout).toMatch(/No problems found/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
