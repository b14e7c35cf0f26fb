/** GPT attribute bits, GRUB's choice of the next boot, and the booted USR partition from the command line. */
import { bootedGuid, decodeAttributes, nextBoot, type UsrSlot } from "./gpt.js";

const slot = (name: "A" | "B", priority: number, tries: number, successful: boolean): UsrSlot => ({
  name,
  label: name === "A" ? "USR-A" : "USR-B",
  number: name === "A" ? 3 : 4,
  guid: "",
  priority,
  tries,
  successful,
  offset: 0,
  bytes: 0,
});

test("decodeAttributes reads bits 48-51 priority, 52-55 tries, 56 successful", () => {
  expect(decodeAttributes("0012000000000000")).toEqual({ priority: 2, tries: 1, successful: false });
  expect(decodeAttributes("0101000000000000")).toEqual({ priority: 1, tries: 0, successful: true });
  expect(decodeAttributes("0000000000000000")).toEqual({ priority: 0, tries: 0, successful: false });
});

test("nextBoot: highest priority among good slots or slots with tries; A wins a tie; none when neither boots", () => {
  expect(nextBoot(slot("A", 1, 0, true), slot("B", 2, 1, false))?.name).toBe("B");
  expect(nextBoot(slot("A", 1, 0, true), slot("B", 2, 0, false))?.name).toBe("A");
  expect(nextBoot(slot("A", 2, 0, true), slot("B", 2, 0, true))?.name).toBe("A");
  expect(nextBoot(slot("A", 0, 0, true), slot("B", 0, 1, false))).toBeUndefined();
});

test("bootedGuid finds verity.usr=, mount.usr= and usr= PARTUUIDs, and nothing else", () => {
  const g = "7130c94a-213a-4e5a-8e26-6cce9662f132";
  expect(bootedGuid(`BOOT_IMAGE=/x verity.usr=PARTUUID=${g} root=LABEL=ROOT`)).toBe(g.toUpperCase());
  expect(bootedGuid(`mount.usr=PARTUUID=${g}`)).toBe(g.toUpperCase());
  expect(bootedGuid(`usr=PARTUUID=${g}\n`)).toBe(g.toUpperCase());
  expect(bootedGuid("root=/dev/sda9 mount.usr=/dev/mapper/usr")).toBeUndefined();
});
