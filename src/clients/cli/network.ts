/** piccoloctl's `network …` commands. */
import {
  AddressFamily,
  AddressingMode,
  ApplyNetworkConfigResponse,
  CheckConnectivityResponse,
  ListInterfacesResponse,
  NetworkConfig,
} from "../../../gen/piccolo/network/v1/network.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { formatTime, jsonDocument, table } from "./format.js";

const T = "piccolo.network.v1.";

/** `network interfaces`. */
export async function networkInterfacesCommand(c: CommandContext): Promise<number> {
  const r = await c.api.network.listInterfaces({});
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument(`${T}ListInterfacesResponse`, ListInterfacesResponse, r));
    return 0;
  }
  const rows = r.interfaces.map((i) => [
    i.name,
    i.state,
    i.mac || "-",
    i.speedMbps ? `${i.speedMbps}Mb/s` : "-",
    i.addresses.map((a) => `${a.address}/${a.prefixLength}`).join(" ") || "-",
    i.routes.filter((x) => x.destination === "default").map((x) => `via ${x.gateway}${x.family === AddressFamily.ADDRESS_FAMILY_IPV6 ? " (v6)" : ""}`).join(" ") || "",
  ]);
  c.stdout.write(table([["NAME", "STATE", "MAC", "SPEED", "ADDRESSES", "DEFAULT ROUTE"], ...rows]));
  return 0;
}

const formatConfig = (cfg: NetworkConfig): string =>
  table([
    ["INTERFACE", "MODE", "ADDRESSES", "GATEWAY", "DNS"],
    ...cfg.interfaces.map((i) => [i.name, i.mode === AddressingMode.ADDRESSING_MODE_DHCP ? "dhcp" : "static", i.addresses.join(" ") || "-", i.gateway || "-", i.dns.join(" ") || "-"]),
  ]) + (cfg.pending ? `pending change ${cfg.pending.id}: reverts at ${formatTime(cfg.pending.revertTime)} unless confirmed\n` : "");

/** `network config`. */
export async function networkConfigCommand(c: CommandContext): Promise<number> {
  const r = await c.api.network.getNetworkConfig({});
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}NetworkConfig`, NetworkConfig, r) : formatConfig(r));
  return 0;
}

/** `network apply IFACE (--dhcp | --address CIDR…)`. */
export async function networkApplyCommand(
  c: CommandContext,
  name: string,
  opts: { readonly dhcp?: boolean; readonly address?: string[]; readonly gateway?: string; readonly dns?: string[]; readonly confirmTimeout?: number },
): Promise<number> {
  if ((opts.dhcp === true) === (opts.address !== undefined && opts.address.length > 0)) throw new UsageError("give either --dhcp or at least one --address");
  const r = await c.api.network.applyNetworkConfig({
    interfaces: [{ name, mode: opts.dhcp ? AddressingMode.ADDRESSING_MODE_DHCP : AddressingMode.ADDRESSING_MODE_STATIC, addresses: opts.address ?? [], gateway: opts.gateway ?? "", dns: opts.dns ?? [] }],
    confirmTimeoutSeconds: opts.confirmTimeout ?? 0,
  });
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}ApplyNetworkConfigResponse`, ApplyNetworkConfigResponse, r));
  else c.stdout.write(`applied ${r.files.join(", ")}\nconfirm within the timeout or it reverts at ${formatTime(r.change?.revertTime)}:\n  piccoloctl network confirm ${r.change?.id}\n`);
  return 0;
}

/** `network confirm ID`. */
export async function networkConfirmCommand(c: CommandContext, id: string): Promise<number> {
  const r = await c.api.network.confirmNetworkChange({ id });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}NetworkConfig`, NetworkConfig, r.config!) : `confirmed ${id}\n${formatConfig(r.config!)}`);
  return 0;
}

/** `network hostname NAME`. */
export async function networkHostnameCommand(c: CommandContext, hostname: string): Promise<number> {
  const r = await c.api.network.setHostname({ hostname });
  c.stdout.write(`${r.hostname}\n`);
  return 0;
}

/** `network check [HOST]`: 0 when DNS and every gateway work, 1 otherwise. */
export async function networkCheckCommand(c: CommandContext, hostname: string | undefined, opts: { readonly timeout?: number }): Promise<number> {
  const r = await c.api.network.checkConnectivity({ hostname: hostname ?? "", timeoutSeconds: opts.timeout ?? 0 });
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}CheckConnectivityResponse`, CheckConnectivityResponse, r));
  else {
    c.stdout.write(`dns      ${r.dnsOk ? "ok" : "FAIL"}  ${r.hostname} ${r.dnsOk ? `→ ${r.resolvedAddresses.join(" ")}` : `(${r.dnsError})`}\n`);
    if (r.gateways.length === 0) c.stdout.write("gateway  FAIL  no default route\n");
    for (const g of r.gateways) c.stdout.write(`gateway  ${g.reachable ? "ok" : "FAIL"}  ${g.address} on ${g.interface} ${g.reachable ? `(${g.rttMs} ms)` : `(${g.error})`}\n`);
  }
  return r.dnsOk && r.gatewayOk ? 0 : 1;
}
