import { AddressingMode } from "../../../gen/piccolo/network/v1/network.js";
import { parseNetworkFile, renderNetworkFile } from "./manager.js";

test(".network files render as systemd-networkd reads them and parse back", () => {
  const stat = { name: "eth0", mode: AddressingMode.ADDRESSING_MODE_STATIC, addresses: ["192.168.1.10/24", "fd00::10/64"], gateway: "192.168.1.1", dns: ["192.168.1.1"] };
  const text = renderNetworkFile(stat);
  expect(text).toBe(
    "# Written by piccolod (ApplyNetworkConfig); it replaces this file on the next change.\n" +
      "[Match]\nName=eth0\n\n[Network]\nAddress=192.168.1.10/24\nAddress=fd00::10/64\nGateway=192.168.1.1\nDNS=192.168.1.1\n",
  );
  expect(parseNetworkFile(text)).toEqual(stat);
  const dhcp = { name: "wlan0", mode: AddressingMode.ADDRESSING_MODE_DHCP, addresses: [], gateway: "", dns: [] };
  expect(renderNetworkFile(dhcp)).toContain("DHCP=yes\n");
  expect(parseNetworkFile(renderNetworkFile(dhcp))).toEqual(dhcp);
});
