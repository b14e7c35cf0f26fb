import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { allMountPoints, createDiskInventory, flattenTree, parseLsblk, parseLsblkTree } from "./inventory.js";

const SAMPLE = JSON.stringify({
  blockdevices: [
    {
      name: "nvme0n1", path: "/dev/nvme0n1", "maj:min": "259:0", type: "disk", model: "Samsung SSD 980 ", serial: "S1", size: 500107862016,
      tran: "nvme", subsystems: "block:nvme:pci", rota: false, rm: false, ro: false, "log-sec": 512, pttype: "gpt", mountpoints: [null],
      children: [
        { name: "nvme0n1p1", path: "/dev/nvme0n1p1", type: "part", partlabel: "EFI-SYSTEM", label: "EFI-SYSTEM", fstype: "vfat", size: 134217728, mountpoints: ["/boot"] },
        { name: "nvme0n1p9", path: "/dev/nvme0n1p9", type: "part", partlabel: "ROOT", fstype: "crypto_LUKS", size: 1e9, mountpoints: [null],
          children: [{ name: "root", path: "/dev/mapper/root", type: "crypt", fstype: "ext4", size: 1e9, mountpoints: ["/"] }] },
      ],
    },
    { name: "vda", path: "/dev/vda", "maj:min": "254:0", type: "disk", size: 1073741824, tran: null, subsystems: "block:virtio:pci", rota: "1", rm: "0", ro: "0", "log-sec": 512, mountpoints: [null] },
    { name: "sdb", path: "/dev/sdb", type: "disk", size: 16e9, tran: "usb", rota: false, rm: true, ro: false, "log-sec": 4096, mountpoints: [null] },
    { name: "loop3", path: "/dev/loop3", type: "loop", size: 0 },
    { name: "zram0", path: "/dev/zram0", type: "disk", size: 1e9, mountpoints: ["[SWAP]"] },
  ],
});

test("parseLsblk: transport, flags, sectors, nested partitions and mounts; empty loop devices skipped", () => {
  const [nvme, vda, sdb, zram, ...rest] = parseLsblk(SAMPLE);
  expect(rest).toEqual([]);
  expect(nvme).toMatchObject({ path: "/dev/nvme0n1", model: "Samsung SSD 980", transport: "nvme", rotational: false, partitionTable: "gpt", mountPoints: [] });
  expect(nvme!.partitions.map((p) => p.partLabel)).toEqual(["EFI-SYSTEM", "ROOT"]);
  expect(allMountPoints(nvme!)).toEqual(["/boot", "/"]);
  expect(vda).toMatchObject({ transport: "virtio", rotational: true, removable: false, readOnly: false });
  expect(sdb).toMatchObject({ transport: "usb", removable: true, logicalSectorSize: 4096 });
  expect(allMountPoints(zram!)).toEqual(["[SWAP]"]);
});

test("parseLsblkTree keeps every device and lsblk's values as printed (TRAN, mount list, partition fields)", () => {
  const tree = parseLsblkTree(SAMPLE);
  expect(tree.map((d) => d.name)).toEqual(["nvme0n1", "vda", "sdb", "loop3", "zram0"]);
  const [nvme, vda] = tree;
  expect(nvme).toMatchObject({ path: "/dev/nvme0n1", model: "Samsung SSD 980", transport: "nvme", partitionTableType: "gpt", mountPoints: [], backingFile: "" });
  expect(vda).toMatchObject({ transport: "", rotational: true });
  expect(flattenTree(tree).map((d) => `${d.path} ${d.type} ${d.mountPoints.join(",")}`)).toEqual([
    "/dev/nvme0n1 disk ",
    "/dev/nvme0n1p1 part /boot",
    "/dev/nvme0n1p9 part ",
    "/dev/mapper/root crypt /",
    "/dev/vda disk ",
    "/dev/sdb disk ",
    "/dev/loop3 loop ",
    "/dev/zram0 disk [SWAP]",
  ]);
  expect(nvme!.children[0]).toMatchObject({ partitionLabel: "EFI-SYSTEM", label: "EFI-SYSTEM", fsType: "vfat", sizeBytes: 134217728 });
});

test("createDiskInventory reads a real loop device with lsblk, and get() of something else is undefined", async () => {
  const dir = mkdtempSync(join(tmpdir(), "piccolo-inv-"));
  const file = join(dir, "disk.img");
  writeFileSync(file, Buffer.alloc(0));
  spawnSync("truncate", ["-s", "48M", file]);
  const dev = spawnSync("losetup", ["-f", "--show", file], { encoding: "utf8" }).stdout.trim();
  try {
    const inv = createDiskInventory();
    const d = await inv.get(dev);
    expect(d).toMatchObject({ path: dev, type: "loop", transport: "loop", sizeBytes: 48 * 1024 * 1024, logicalSectorSize: 512 });
    expect((await inv.list()).some((x) => x.path === dev)).toBe(true);
    expect(await inv.get(file)).toBeUndefined();
  } finally {
    spawnSync("losetup", ["-d", dev]);
    rmSync(dir, { recursive: true, force: true });
  }
});

test("tree() lists a real loop device with its backing file (from sysfs when lsblk leaves it out, under sysfsRoot)", async () => {
  const dir = mkdtempSync(join(tmpdir(), "piccolo-inv-"));
  const file = join(dir, "disk.img");
  spawnSync("truncate", ["-s", "16M", file]);
  const dev = spawnSync("losetup", ["-f", "--show", file], { encoding: "utf8" }).stdout.trim();
  try {
    const loop = (await createDiskInventory().tree()).find((x) => x.path === dev);
    expect(loop).toMatchObject({ type: "loop", sizeBytes: 16 * 1024 * 1024, backingFile: file });
    // lsblk on this host may print BACK-FILE itself; a sysfs of our own only matters when it does not.
    const lsblkHasBackFile = spawnSync("lsblk", ["-J", "-o", "BACK-FILE", dev]).status === 0;
    const sys = join(dir, "sys");
    const name = dev.slice("/dev/".length);
    mkdirSync(join(sys, "block", name, "loop"), { recursive: true });
    writeFileSync(join(sys, "block", name, "loop", "backing_file"), "/elsewhere/other.img\n");
    const viaRoot = (await createDiskInventory({ sysfsRoot: sys }).tree()).find((x) => x.path === dev);
    expect(viaRoot?.backingFile).toBe(lsblkHasBackFile ? file : "/elsewhere/other.img");
  } finally {
    spawnSync("losetup", ["-d", dev]);
    rmSync(dir, { recursive: true, force: true });
  }
});
