import { dfEntries, parseMountInfo } from "./filesystems.js";

const INFO = [
  "22 27 0:21 / /proc rw,relatime - proc proc rw",
  "27 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw",
  "30 27 8:1 /var/lib/docker /var/lib/docker rw,relatime - ext4 /dev/sda1 rw",
  "31 27 0:40 / /mnt/my\\040disk ro,relatime - vfat /dev/sdb1 ro",
  "32 27 0:41 / /tmp rw - tmpfs tmpfs rw",
  "33 32 0:42 / /tmp rw - tmpfs tmpfs rw,size=1k",
].join("\n");

test("mountinfo is parsed with its escapes, and df's view keeps one entry per filesystem and mount point", () => {
  const entries = parseMountInfo(INFO);
  expect(entries[3]).toMatchObject({ mountPoint: "/mnt/my disk", type: "vfat", source: "/dev/sdb1", options: ["ro", "relatime"] });
  const df = dfEntries(entries);
  // The bind mount of a folder of / is the same filesystem; the second /tmp hides the first.
  expect(df.map((e) => `${e.mountPoint} ${e.device}`)).toEqual(["/proc 0:21", "/ 8:1", "/mnt/my disk 0:40", "/tmp 0:42"]);
});
