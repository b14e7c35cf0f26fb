/**
 * The network manager: piccolod's systemd-networkd configuration (one `.network` file per
 * interface, named 50-piccolod-<name>.network, in the configured folder) changed in try mode, the
 * host name, and the connectivity check.
 *
 * Try mode: before any file changes, the change is journaled (<stateDir>/network/pending.json,
 * fsync'd) with the files it replaces and its deadline. A timer reverts it at the deadline unless
 * it is confirmed; a piccolod that restarts finds the journal and reverts at once if the deadline
 * has passed, or sets the timer again — so a wrong static address never locks the owner out.
 */
import { randomBytes } from "node:crypto";
import { mkdir, open, readdir, readFile, rename, rm } from "node:fs/promises";
import { isIP } from "node:net";
import { join } from "node:path";
import type { Logger } from "pino";
import {
  AddressingMode,
  type CheckConnectivityResponse,
  type GatewayCheck,
  type InterfaceConfig,
  type NetworkConfig,
  type PendingChange,
} from "../../../gen/piccolo/network/v1/network.js";
import { invalidArgument, notFound, PiccoloError } from "../errors.js";
import { runTool } from "../storage/run.js";
import { listInterfaces, listRoutes, type NetRunner } from "./interfaces.js";

/** What the network manager needs. */
export interface NetworkManagerDeps {
  readonly runner: NetRunner;
  readonly stateDir: string;
  /** Folder of the .network files (/etc/systemd/network on the host). */
  readonly configDir: string;
  /** Command that makes systemd-networkd pick the files up; empty for none. */
  readonly reloadCommand: readonly string[];
  /** Command that applies the files to the interfaces named after it now; empty for none. */
  readonly reconfigureCommand: readonly string[];
  /** The static host name file. */
  readonly hostnameFile: string;
  /** Command that sets the kernel's host name (the name is appended); empty for none. */
  readonly hostnameCommand: readonly string[];
  readonly log: Logger;
}

interface Journal {
  id: string;
  /** Unix ms. */
  deadline: number;
  /** piccolod's files before the change: name → content. */
  previous: Record<string, string>;
}

const PREFIX = "50-piccolod-";
const SUFFIX = ".network";
const IFNAME = /^[A-Za-z0-9_.:-]{1,15}$/;
const HOSTNAME = /^(?=.{1,64}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const HEADER = "# Written by piccolod (ApplyNetworkConfig); it replaces this file on the next change.\n";

/** Renders one interface's .network file. */
export function renderNetworkFile(c: InterfaceConfig): string {
  const lines = [HEADER.trimEnd(), "[Match]", `Name=${c.name}`, "", "[Network]"];
  if (c.mode === AddressingMode.ADDRESSING_MODE_DHCP) lines.push("DHCP=yes");
  else {
    for (const a of c.addresses) lines.push(`Address=${a}`);
    if (c.gateway) lines.push(`Gateway=${c.gateway}`);
  }
  for (const d of c.dns) lines.push(`DNS=${d}`);
  return lines.join("\n") + "\n";
}

/** Reads back a file renderNetworkFile wrote. */
export function parseNetworkFile(text: string): InterfaceConfig {
  const c: InterfaceConfig = { name: "", mode: AddressingMode.ADDRESSING_MODE_STATIC, addresses: [], gateway: "", dns: [] };
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    const eq = line.indexOf("=");
    if (line.startsWith("#") || eq < 0) continue;
    const k = line.slice(0, eq);
    const v = line.slice(eq + 1);
    if (k === "Name") c.name = v;
    else if (k === "DHCP" && v !== "no") c.mode = AddressingMode.ADDRESSING_MODE_DHCP;
    else if (k === "Address") c.addresses.push(v);
    else if (k === "Gateway") c.gateway = v;
    else if (k === "DNS") c.dns.push(v);
  }
  return c;
}

const checkCidr = (value: string, field: string): string => {
  const m = /^([^/]+)\/(\d{1,3})$/.exec(value);
  const fam = m ? isIP(m[1]!) : 0;
  if (!m || fam === 0 || Number(m[2]) > (fam === 4 ? 32 : 128) || (fam === 4 && Number(m[2]) === 0)) {
    throw invalidArgument(field, `${JSON.stringify(value.slice(0, 80))} is not an address in CIDR form such as "192.168.1.10/24"`);
  }
  return value;
};
const checkIp = (value: string, field: string): string => {
  if (isIP(value) === 0) throw invalidArgument(field, `${JSON.stringify(value.slice(0, 80))} is not an IPv4 or IPv6 address`);
  return value;
};

/** The network manager. */
export interface NetworkManager {
  /** Reverts or re-arms a change journaled before a restart. */
  init(): Promise<void>;
  getConfig(): Promise<NetworkConfig>;
  apply(interfaces: readonly InterfaceConfig[], timeoutSeconds: number, signal: AbortSignal): Promise<{ change: PendingChange; files: string[] }>;
  confirm(id: string): Promise<NetworkConfig>;
  setHostname(name: string, signal: AbortSignal): Promise<string>;
  checkConnectivity(hostname: string, timeoutSeconds: number, signal: AbortSignal): Promise<CheckConnectivityResponse>;
  /** Stops the revert timer (the journal stays for the next start). */
  close(): void;
}

/** Creates the network manager. */
export function createNetworkManager(deps: NetworkManagerDeps): NetworkManager {
  const { runner, log } = deps;
  const journalDir = join(deps.stateDir, "network");
  const journalFile = join(journalDir, "pending.json");
  let timer: NodeJS.Timeout | undefined;
  // One change at a time, and a revert never races an apply or a confirm.
  let chain: Promise<unknown> = Promise.resolve();
  const serial = <T>(f: () => Promise<T>): Promise<T> => {
    const p = chain.then(f, f);
    chain = p.catch(() => undefined);
    return p;
  };

  const writeDurable = async (path: string, text: string, mode: number): Promise<void> => {
    const tmp = `${path}.${process.pid}.tmp`;
    const fh = await open(tmp, "w", mode);
    try {
      // The mode must not depend on piccolod's umask: systemd-networkd reads the files as its own user.
      await fh.chmod(mode);
      await fh.writeFile(text);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
  };

  const readJournal = async (): Promise<Journal | undefined> => {
    try {
      return JSON.parse(await readFile(journalFile, "utf8")) as Journal;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  };

  const ourFiles = async (): Promise<Record<string, string>> => {
    const out: Record<string, string> = {};
    let names: string[] = [];
    try {
      names = await readdir(deps.configDir);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    }
    for (const n of names.filter((x) => x.startsWith(PREFIX) && x.endsWith(SUFFIX)).sort()) out[n] = await readFile(join(deps.configDir, n), "utf8");
    return out;
  };

  const replaceFiles = async (files: Record<string, string>): Promise<void> => {
    await mkdir(deps.configDir, { recursive: true, mode: 0o755 });
    for (const n of Object.keys(await ourFiles())) if (!(n in files)) await rm(join(deps.configDir, n), { force: true });
    for (const [n, text] of Object.entries(files)) await writeDurable(join(deps.configDir, n), text, 0o644);
  };

  const runCommand = async (command: readonly string[], extra: readonly string[]): Promise<void> => {
    if (command.length === 0) return;
    const [cmd, ...args] = command;
    const r = await runTool(cmd!, [...args, ...extra], { signal: AbortSignal.timeout(60_000) }, "systemd-networkd (networkctl) is needed to apply network changes");
    if (r.code !== 0) {
      throw new PiccoloError("unavailable", `${[...command, ...extra].join(" ")} failed (exit ${r.code}): ${r.stderr.trim()}`, { reason: "HOST_PART_UNAVAILABLE" });
    }
  };
  /** Reloads networkd's files, then reconfigures the interfaces the change touches (a reload alone may leave an unmanaged link as it is). */
  const reload = async (interfaces: readonly string[] = []): Promise<void> => {
    await runCommand(deps.reloadCommand, []);
    if (interfaces.length > 0) await runCommand(deps.reconfigureCommand, interfaces);
  };
  const namesOf = (...sets: Record<string, string>[]): string[] =>
    [...new Set(sets.flatMap((f) => Object.keys(f).map((n) => n.slice(PREFIX.length, -SUFFIX.length))))].sort();

  const revert = (id: string): Promise<void> =>
    serial(async () => {
      const j = await readJournal();
      if (!j || j.id !== id) return;
      log.warn({ change: id }, "network change not confirmed in time: reverting it");
      const touched = namesOf(j.previous, await ourFiles());
      await replaceFiles(j.previous);
      try {
        await reload(touched);
      } catch (e) {
        log.error({ change: id, err: (e as Error).message }, "reloading the network after the revert failed; the previous files are back in place");
      }
      await rm(journalFile, { force: true });
      log.info({ change: id }, "network change reverted");
    });

  const arm = (j: Journal): void => {
    if (timer) clearTimeout(timer);
    const wait = Math.max(0, j.deadline - Date.now());
    timer = setTimeout(() => {
      timer = undefined;
      revert(j.id).catch((e: unknown) => log.error({ change: j.id, err: (e as Error).message }, "network revert failed; it is retried at the next start"));
    }, wait);
    timer.unref?.();
  };

  const config = async (): Promise<NetworkConfig> => {
    const j = await readJournal();
    return {
      interfaces: Object.values(await ourFiles()).map(parseNetworkFile),
      pending: j ? { id: j.id, revertTime: new Date(j.deadline) } : undefined,
      configDir: deps.configDir,
    };
  };

  return {
    async init() {
      const j = await readJournal();
      if (!j) return;
      if (j.deadline <= Date.now()) await revert(j.id);
      else {
        log.warn({ change: j.id, revertTime: new Date(j.deadline).toISOString() }, "network change still waits for confirmation");
        arm(j);
      }
    },
    getConfig: config,
    apply(interfaces, timeoutSeconds, signal) {
      return serial(async () => {
        const existing = await readJournal();
        if (existing) {
          throw new PiccoloError("failed_precondition", `network change ${existing.id} waits for confirmation until ${new Date(existing.deadline).toISOString()}; confirm it or let it revert first`, {
            reason: "CHANGE_PENDING",
            metadata: { change_id: existing.id },
          });
        }
        if (interfaces.length === 0) throw invalidArgument("interfaces", "at least one interface is required");
        if (interfaces.length > 64) throw invalidArgument("interfaces", "at most 64");
        const present = new Set((await listInterfaces(runner, signal)).map((i) => i.name));
        const seen = new Set<string>();
        const files: Record<string, string> = {};
        interfaces.forEach((c, i) => {
          const f = `interfaces[${i}]`;
          if (!IFNAME.test(c.name)) throw invalidArgument(`${f}.name`, `${JSON.stringify(c.name.slice(0, 40))} is not an interface name`);
          if (seen.has(c.name)) throw invalidArgument(`${f}.name`, `${c.name} is listed twice`);
          seen.add(c.name);
          if (!present.has(c.name)) throw invalidArgument(`${f}.name`, `there is no interface ${c.name} on this host`);
          if (c.mode === AddressingMode.ADDRESSING_MODE_STATIC) {
            if (c.addresses.length === 0) throw invalidArgument(`${f}.addresses`, "a static interface needs at least one address");
            c.addresses.forEach((a, k) => checkCidr(a, `${f}.addresses[${k}]`));
            if (c.gateway) checkIp(c.gateway, `${f}.gateway`);
          } else if (c.mode === AddressingMode.ADDRESSING_MODE_DHCP) {
            if (c.addresses.length > 0) throw invalidArgument(`${f}.addresses`, "only for STATIC");
            if (c.gateway) throw invalidArgument(`${f}.gateway`, "only for STATIC");
          } else throw invalidArgument(`${f}.mode`, "DHCP or STATIC is required");
          c.dns.forEach((d, k) => checkIp(d, `${f}.dns[${k}]`));
          files[`${PREFIX}${c.name}${SUFFIX}`] = renderNetworkFile(c);
        });
        const timeout = timeoutSeconds === 0 ? 120 : timeoutSeconds;
        if (timeout < 5 || timeout > 3600) throw invalidArgument("confirm_timeout_seconds", `must be from 5 to 3600 (got ${timeoutSeconds})`);
        const j: Journal = { id: `net-${randomBytes(6).toString("hex")}`, deadline: Date.now() + timeout * 1000, previous: await ourFiles() };
        // Journal first: whatever happens from here on, the revert knows what to put back.
        await mkdir(journalDir, { recursive: true, mode: 0o700 });
        await writeDurable(journalFile, JSON.stringify(j), 0o600);
        const touched = namesOf(j.previous, files);
        try {
          await replaceFiles(files);
          await reload(touched);
        } catch (e) {
          await replaceFiles(j.previous).catch(() => undefined);
          await reload(touched).catch(() => undefined);
          await rm(journalFile, { force: true });
          throw e;
        }
        arm(j);
        log.info({ change: j.id, files: Object.keys(files), revertTime: new Date(j.deadline).toISOString() }, "network change applied; waiting for confirmation");
        return { change: { id: j.id, revertTime: new Date(j.deadline) }, files: Object.keys(files).map((n) => join(deps.configDir, n)) };
      });
    },
    confirm(id) {
      return serial(async () => {
        if (id === "") throw invalidArgument("id", "is required");
        const j = await readJournal();
        if (!j || j.id !== id) throw notFound("pending network change", id);
        if (timer) clearTimeout(timer);
        timer = undefined;
        await rm(journalFile, { force: true });
        log.info({ change: id }, "network change confirmed");
        return config();
      });
    },
    async setHostname(name, signal) {
      if (name === "") throw invalidArgument("hostname", "is required");
      if (!HOSTNAME.test(name)) throw invalidArgument("hostname", `${JSON.stringify(name.slice(0, 80))} is not a host name (labels of letters, digits and "-", separated by ".", up to 64 characters)`);
      const dir = join(deps.hostnameFile, "..");
      await mkdir(dir, { recursive: true });
      if (deps.hostnameCommand.length > 0) {
        const [cmd, ...args] = deps.hostnameCommand;
        const r = await runTool(cmd!, [...args, name], { signal });
        if (r.code !== 0) throw new PiccoloError("unavailable", `${deps.hostnameCommand.join(" ")} ${name} failed: ${r.stderr.trim()}`, { reason: "HOST_PART_UNAVAILABLE" });
      }
      await writeDurable(deps.hostnameFile, name + "\n", 0o644);
      return name;
    },
    async checkConnectivity(hostname, timeoutSeconds, signal) {
      const name = hostname || "piccolo.space";
      if (!HOSTNAME.test(name)) throw invalidArgument("hostname", `${JSON.stringify(name.slice(0, 80))} is not a host name`);
      const t = timeoutSeconds === 0 ? 3 : timeoutSeconds;
      if (t < 1 || t > 30) throw invalidArgument("timeout_seconds", `must be from 1 to 30 (got ${timeoutSeconds})`);
      const res: CheckConnectivityResponse = { hostname: name, dnsOk: false, resolvedAddresses: [], dnsError: "", gateways: [], gatewayOk: false };
      const dnsSignal = AbortSignal.any([signal, AbortSignal.timeout(t * 1000)]);
      const [dns, routes] = await Promise.all([
        runner.run("getent", ["ahosts", name], { signal: dnsSignal }).catch((e: unknown) => ({ code: -1, stdout: "", stderr: (e as Error).message })),
        listRoutes(runner, signal),
      ]);
      if (dns.code === 0) {
        res.resolvedAddresses = [...new Set(dns.stdout.split("\n").map((l) => l.split(/\s+/)[0]!).filter((a) => isIP(a) !== 0))];
        res.dnsOk = res.resolvedAddresses.length > 0;
      }
      if (!res.dnsOk) res.dnsError = dns.code === 2 ? `${name} did not resolve` : dnsSignal.aborted ? `no answer within ${t} s` : dns.stderr.trim() || `getent exit ${dns.code}`;
      const defaults = routes.filter((r) => r.destination === "default" && r.gateway !== "");
      res.gateways = await Promise.all(
        defaults.map(async (r): Promise<GatewayCheck> => {
          const p = await runner.run("ping", ["-c", "1", "-W", String(t), "-I", r.interface, r.gateway], { signal }).catch((e: unknown) => ({ code: -1, stdout: "", stderr: (e as Error).message }));
          const rtt = /time=([\d.]+) ms/.exec(p.stdout)?.[1];
          return {
            address: r.gateway,
            interface: r.interface,
            reachable: p.code === 0,
            rttMs: rtt ? Number(rtt) : 0,
            error: p.code === 0 ? "" : p.code === 1 ? `no answer within ${t} s` : (p.stderr.trim() || `ping exit ${p.code}`),
          };
        }),
      );
      res.gatewayOk = res.gateways.length > 0 && res.gateways.every((g) => g.reachable);
      return res;
    },
    close() {
      if (timer) clearTimeout(timer);
      timer = undefined;
    },
  };
}

/** Exported for tests: the file name piccolod uses for an interface. */
export const networkFileName = (name: string): string => `${PREFIX}${name}${SUFFIX}`;
