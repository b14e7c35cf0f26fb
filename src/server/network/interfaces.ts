/**
 * The host's interfaces, addresses and routes from `ip -j` (iproute2's JSON output), run through
 * a runner that can put every command into a network namespace (`ip netns exec NS …`), so the
 * daemon can be pointed at a namespace in tests and the same code reads the host in production.
 */
import { isIP } from "node:net";
import { AddressFamily, type Interface, type Route } from "../../../gen/piccolo/network/v1/network.js";
import { PiccoloError } from "../errors.js";
import { runTool, type RunOptions, type ToolResult } from "../storage/run.js";

/** Runs a host command, in the configured network namespace when there is one. */
export interface NetRunner {
  readonly netns: string;
  run(cmd: string, args: readonly string[], options?: RunOptions): Promise<ToolResult>;
}

/** Creates the runner; `netns` "" runs commands as they are. */
export function createNetRunner(netns: string): NetRunner {
  return {
    netns,
    run(cmd, args, options = {}) {
      if (netns === "") return runTool(cmd, args, options, "install iproute2 / iputils-ping");
      return runTool("ip", ["netns", "exec", netns, cmd, ...args], options, "install iproute2");
    },
  };
}

async function ipJson<T>(runner: NetRunner, args: readonly string[], signal?: AbortSignal): Promise<T> {
  const r = await runner.run("ip", ["-j", ...args], { signal });
  if (r.code !== 0) {
    throw new PiccoloError("unavailable", `ip ${args.join(" ")}${runner.netns ? ` in network namespace ${runner.netns}` : ""} failed: ${r.stderr.trim()}`, {
      reason: "HOST_PART_UNAVAILABLE",
    });
  }
  return JSON.parse(r.stdout.trim() === "" ? "[]" : r.stdout) as T;
}

interface IpLink {
  ifindex: number;
  ifname: string;
  operstate?: string;
  mtu?: number;
  link_type?: string;
  address?: string;
  linkinfo?: { info_kind?: string };
}
interface IpAddr {
  ifindex: number;
  addr_info?: { family: string; local: string; prefixlen: number; scope?: string; dynamic?: boolean; valid_life_time?: number }[];
}
interface IpRoute {
  dst: string;
  gateway?: string;
  dev?: string;
  metric?: number;
  protocol?: string;
}

const family = (f: string): AddressFamily => (f === "inet6" ? AddressFamily.ADDRESS_FAMILY_IPV6 : AddressFamily.ADDRESS_FAMILY_IPV4);

/** The main-table routes, IPv4 and IPv6. */
export async function listRoutes(runner: NetRunner, signal?: AbortSignal): Promise<Route[]> {
  const [v4, v6] = await Promise.all([ipJson<IpRoute[]>(runner, ["-4", "route", "show"], signal), ipJson<IpRoute[]>(runner, ["-6", "route", "show"], signal)]);
  const conv = (r: IpRoute, fam: AddressFamily): Route => ({
    destination: r.dst,
    gateway: r.gateway ?? "",
    interface: r.dev ?? "",
    metric: r.metric ?? 0,
    protocol: r.protocol ?? "",
    family: fam,
  });
  return [...v4.map((r) => conv(r, AddressFamily.ADDRESS_FAMILY_IPV4)), ...v6.map((r) => conv(r, AddressFamily.ADDRESS_FAMILY_IPV6))];
}

/** Every interface with its addresses and routes. */
export async function listInterfaces(runner: NetRunner, signal?: AbortSignal): Promise<Interface[]> {
  const [links, addrs, routes, speeds] = await Promise.all([
    ipJson<IpLink[]>(runner, ["-d", "link", "show"], signal),
    ipJson<IpAddr[]>(runner, ["addr", "show"], signal),
    listRoutes(runner, signal),
    // sysfs is per namespace: `ip netns exec` mounts the namespace's own, so read it through the runner.
    runner.run("sh", ["-c", 'for i in /sys/class/net/*; do echo "${i##*/} $(cat "$i/speed" 2>/dev/null)"; done'], { signal }),
  ]);
  const speed = new Map<string, number>();
  for (const line of speeds.stdout.split("\n")) {
    const [name, s] = line.trim().split(" ");
    const n = Number(s);
    if (name && Number.isFinite(n) && n > 0) speed.set(name, n);
  }
  const byIndex = new Map(addrs.map((a) => [a.ifindex, a]));
  return links
    .map((l) => ({
      name: l.ifname,
      index: l.ifindex,
      mac: l.link_type === "ether" ? (l.address ?? "") : "",
      state: l.operstate ?? "",
      mtu: l.mtu ?? 0,
      speedMbps: speed.get(l.ifname) ?? 0,
      linkType: l.link_type ?? "",
      kind: l.linkinfo?.info_kind ?? "",
      addresses: (byIndex.get(l.ifindex)?.addr_info ?? [])
        .filter((a) => isIP(a.local) !== 0)
        .map((a) => ({
          address: a.local,
          prefixLength: a.prefixlen,
          family: family(a.family),
          scope: a.scope ?? "",
          dynamic: a.dynamic === true || (a.valid_life_time !== undefined && a.valid_life_time < 4294967295),
        })),
      routes: routes.filter((r) => r.interface === l.ifname),
    }))
    .sort((a, b) => a.index - b.index);
}
