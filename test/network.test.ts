/**
 * Network end to end in two network namespaces joined by a veth pair: the daemon looks at the
 * first (--network-namespace), the second is the gateway with a small DNS server of its own.
 * ListInterfaces against `ip -j`, CheckConnectivity with the gateway up and down, the .network
 * files ApplyNetworkConfig writes read back with `systemd-analyze cat-config`, an unconfirmed
 * change reverting on time (also across a piccolod killed before the deadline), a confirmed one
 * staying, and SetHostname.
 */
import * as grpc from "@grpc/grpc-js";
import { jest } from "@jest/globals";
import { spawn, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ErrorInfo } from "../gen/google/rpc/error_details.js";
import { Status } from "../gen/google/rpc/status.js";
import { AddressFamily, AddressingMode } from "../gen/piccolo/network/v1/network.js";
import { startTestDaemon, type TestDaemon } from "./helpers/daemon.js";
import { run } from "./helpers/dockerd.js";

jest.setTimeout(180_000);

const A = `pcA${process.pid}`;
const B = `pcB${process.pid}`;
const VA = `vA${process.pid % 100000}`;
const VB = `vB${process.pid % 100000}`;
let d: TestDaemon;
let work: string;
let root: string;
let netDir: string;
let dns: ChildProcess | undefined;

const ok = async (cmd: string, args: string[]): Promise<string> => {
  const r = await run(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
};

/** A DNS server that answers A queries for piccolo.test with 10.77.0.53 and nothing else. */
const DNS_SERVER = `
const dgram = require("node:dgram");
const s = dgram.createSocket("udp4");
s.on("message", (q, from) => {
  let o = 12, labels = [];
  while (q[o] !== 0) { labels.push(q.subarray(o + 1, o + 1 + q[o]).toString()); o += q[o] + 1; }
  const qtype = q.readUInt16BE(o + 1);
  const question = q.subarray(12, o + 5);
  const known = labels.join(".").toLowerCase() === "piccolo.test";
  const answer = known && qtype === 1 ? Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 77, 0, 53]) : Buffer.alloc(0);
  const h = Buffer.alloc(12);
  q.copy(h, 0, 0, 2);
  h.writeUInt16BE(0x8180 | (known ? 0 : 3), 2);
  h.writeUInt16BE(1, 4);
  h.writeUInt16BE(answer.length ? 1 : 0, 6);
  s.send(Buffer.concat([h, question, answer]), from.port, from.address);
});
s.bind(53, "10.77.0.1", () => console.log("ready"));
`;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "piccolod-net-"));
  root = join(work, "root");
  netDir = join(root, "etc/systemd/network");
  await ok("ip", ["netns", "add", A]);
  await ok("ip", ["netns", "add", B]);
  await ok("ip", ["link", "add", VA, "netns", A, "type", "veth", "peer", "name", VB, "netns", B]);
  for (const [ns, dev, addr] of [[A, VA, "10.77.0.2/24"], [B, VB, "10.77.0.1/24"]] as const) {
    await ok("ip", ["-n", ns, "addr", "add", addr, "dev", dev]);
    await ok("ip", ["-n", ns, "link", "set", dev, "up"]);
    await ok("ip", ["-n", ns, "link", "set", "lo", "up"]);
  }
  await ok("ip", ["-n", A, "route", "add", "default", "via", "10.77.0.1"]);
  // `ip netns exec` bind-mounts /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
  await mkdir(`/etc/netns/${A}`, { recursive: true });
  await writeFile(`/etc/netns/${A}/resolv.conf`, "nameserver 10.77.0.1\noptions timeout:1 attempts:1\n");
  dns = spawn("ip", ["netns", "exec", B, process.execPath, "-e", DNS_SERVER], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve, reject) => {
    dns!.stdout!.once("data", () => resolve());
    dns!.once("exit", (c) => reject(new Error(`DNS server exited ${c}`)));
  });
  // As in piccolod.service (UMask=0077): the daemon inherits this.
  const umask = process.umask(0o077);
  try {
    d = await startTestDaemon({
      extraArgs: ["--network-namespace", A, "--network-config-dir", netDir, "--hostname-command", "unshare,-u,hostname"],
    });
  } finally {
    process.umask(umask);
  }
});

afterAll(async () => {
  await d?.cleanup();
  dns?.kill();
  await run("ip", ["netns", "del", A]);
  await run("ip", ["netns", "del", B]);
  await rm(`/etc/netns/${A}`, { recursive: true, force: true });
  if (work) await rm(work, { recursive: true, force: true });
});

async function failure(p: Promise<unknown>): Promise<{ code: number; message: string; field: string; reason: string }> {
  let err: grpc.ServiceError | undefined;
  try {
    await p;
  } catch (e) {
    err = e as grpc.ServiceError;
  }
  if (!err) throw new Error("expected the call to fail");
  const bin = err.metadata?.get("grpc-status-details-bin")[0] as Buffer | undefined;
  const status = bin ? Status.decode(bin) : { details: [] };
  let field = "";
  let reason = "";
  for (const any of status.details) {
    if (any.typeUrl.endsWith("google.rpc.ErrorInfo")) {
      const info = ErrorInfo.decode(any.value);
      field = info.metadata["field"] ?? "";
      reason = info.reason;
    }
  }
  return { code: err.code, message: err.details, field, reason };
}

test("ListInterfaces inside the namespace lists the veth end with its address, MAC and routes, as ip -j has them", async () => {
  const api = d.grpcUnix().network;
  const { interfaces } = await api.listInterfaces({});
  expect(interfaces.map((i) => i.name)).toEqual(["lo", VA]);
  const link = (JSON.parse(await ok("ip", ["-n", A, "-j", "link", "show", VA])) as { address: string; ifindex: number; mtu: number }[])[0]!;
  const v = interfaces.find((i) => i.name === VA)!;
  expect(v).toMatchObject({ index: link.ifindex, mac: link.address, mtu: link.mtu, state: "UP", kind: "veth", linkType: "ether", speedMbps: 10000 });
  expect(v.addresses.filter((a) => a.family === AddressFamily.ADDRESS_FAMILY_IPV4)).toEqual([
    { address: "10.77.0.2", prefixLength: 24, family: AddressFamily.ADDRESS_FAMILY_IPV4, scope: "global", dynamic: false },
  ]);
  expect(v.routes.filter((r) => r.family === AddressFamily.ADDRESS_FAMILY_IPV4).map((r) => [r.destination, r.gateway])).toEqual([
    ["default", "10.77.0.1"],
    ["10.77.0.0/24", ""],
  ]);
  const lo = interfaces.find((i) => i.name === "lo")!;
  expect(lo.addresses.map((a) => `${a.address}/${a.prefixLength}`)).toContain("127.0.0.1/8");
  expect(lo.mac).toBe("");
  // The daemon's own namespace has other interfaces: what we saw is the namespace's view.
  expect((await ok("ip", ["-j", "link", "show"])).includes(`"${VA}"`)).toBe(false);
});

test("CheckConnectivity resolves through the namespace's DNS server and pings the gateway, and says what fails", async () => {
  const api = d.grpcUnix().network;
  const good = await api.checkConnectivity({ hostname: "piccolo.test", timeoutSeconds: 2 });
  expect(good).toMatchObject({ hostname: "piccolo.test", dnsOk: true, resolvedAddresses: ["10.77.0.53"], gatewayOk: true });
  expect(good.gateways).toHaveLength(1);
  expect(good.gateways[0]).toMatchObject({ address: "10.77.0.1", interface: VA, reachable: true });
  expect(good.gateways[0]!.rttMs).toBeGreaterThan(0);

  const unknown = await api.checkConnectivity({ hostname: "nowhere.test", timeoutSeconds: 2 });
  expect(unknown.dnsOk).toBe(false);
  expect(unknown.dnsError).toContain("nowhere.test");

  await ok("ip", ["-n", B, "addr", "del", "10.77.0.1/24", "dev", VB]);
  try {
    const down = await api.checkConnectivity({ hostname: "piccolo.test", timeoutSeconds: 1 });
    expect(down.gatewayOk).toBe(false);
    expect(down.gateways[0]).toMatchObject({ address: "10.77.0.1", reachable: false });
    expect(down.dnsOk).toBe(false);
  } finally {
    await ok("ip", ["-n", B, "addr", "add", "10.77.0.1/24", "dev", VB]);
  }
  expect(await failure(api.checkConnectivity({ hostname: "bad name!", timeoutSeconds: 0 }))).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, field: "hostname" });
});

const file = () => join(netDir, `50-piccolod-${VA}.network`);
const exists = async (p: string) => (await readFile(p, "utf8").catch(() => undefined)) !== undefined;
const waitUntil = async (what: string, pred: () => Promise<boolean>, ms = 60_000) => {
  const end = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
};

test("ApplyNetworkConfig writes a .network file systemd reads; unconfirmed it reverts on time, confirmed it stays", async () => {
  const api = d.grpcUnix().network;
  const staticCfg = { name: VA, mode: AddressingMode.ADDRESSING_MODE_STATIC, addresses: ["10.77.0.9/24"], gateway: "10.77.0.1", dns: ["10.77.0.1"] };
  expect(await failure(api.applyNetworkConfig({ interfaces: [{ ...staticCfg, name: "eth99" }], confirmTimeoutSeconds: 5 }))).toMatchObject({ field: "interfaces[0].name" });
  expect(await failure(api.applyNetworkConfig({ interfaces: [{ ...staticCfg, addresses: ["10.77.0.9"] }], confirmTimeoutSeconds: 5 }))).toMatchObject({
    field: "interfaces[0].addresses[0]",
  });
  expect(await failure(api.applyNetworkConfig({ interfaces: [staticCfg], confirmTimeoutSeconds: 1 }))).toMatchObject({ field: "confirm_timeout_seconds" });
  expect(await exists(file())).toBe(false);

  const applied = await api.applyNetworkConfig({ interfaces: [staticCfg], confirmTimeoutSeconds: 5 });
  const appliedAt = Date.now();
  expect(applied.files).toEqual([file()]);
  // systemd-networkd reads it as its own user, whatever piccolod's umask.
  expect((await stat(file())).mode & 0o777).toBe(0o644);
  const seen = await ok("systemd-analyze", ["cat-config", `--root=${root}`, `systemd/network/50-piccolod-${VA}.network`]);
  expect(seen).toContain(`Name=${VA}`);
  expect(seen).toContain("Address=10.77.0.9/24");
  expect(seen).toContain("Gateway=10.77.0.1");
  const cfg = await api.getNetworkConfig({});
  expect(cfg.pending?.id).toBe(applied.change!.id);
  expect(cfg.interfaces).toEqual([staticCfg]);
  // A second change while one waits is refused.
  expect((await failure(api.applyNetworkConfig({ interfaces: [staticCfg], confirmTimeoutSeconds: 5 }))).reason).toBe("CHANGE_PENDING");

  await waitUntil("the revert", async () => !(await exists(file())));
  expect(Date.now() - appliedAt).toBeGreaterThanOrEqual(4500);
  expect((await api.getNetworkConfig({})).pending).toBeUndefined();
  expect((await failure(api.confirmNetworkChange({ id: applied.change!.id }))).code).toBe(grpc.status.NOT_FOUND);

  const dhcp = { name: VA, mode: AddressingMode.ADDRESSING_MODE_DHCP, addresses: [], gateway: "", dns: [] };
  const kept = await api.applyNetworkConfig({ interfaces: [dhcp], confirmTimeoutSeconds: 5 });
  const confirmed = await api.confirmNetworkChange({ id: kept.change!.id });
  expect(confirmed.config).toMatchObject({ interfaces: [dhcp], pending: undefined });
  await new Promise((r) => setTimeout(r, 6000));
  expect(await readFile(file(), "utf8")).toContain("DHCP=yes");
});

test("an unconfirmed change reverts to the confirmed one even when piccolod is killed before the deadline", async () => {
  const api = d.grpcUnix().network;
  const before = await readFile(file(), "utf8");
  const staticCfg = { name: VA, mode: AddressingMode.ADDRESSING_MODE_STATIC, addresses: ["192.0.2.99/24"], gateway: "", dns: [] };
  const applied = await api.applyNetworkConfig({ interfaces: [staticCfg], confirmTimeoutSeconds: 8 });
  expect(await readFile(file(), "utf8")).toContain("Address=192.0.2.99/24");
  await d.kill9();
  await d.restart();
  // Restarted before the deadline: still pending, and still reverted on time.
  expect((await d.grpcUnix().network.getNetworkConfig({})).pending?.id).toBe(applied.change!.id);
  await waitUntil("the revert after the restart", async () => (await readFile(file(), "utf8")) === before);
  expect((await d.grpcUnix().network.getNetworkConfig({})).pending).toBeUndefined();

  // Down past the deadline: reverted at the next start.
  const again = await d.grpcUnix().network.applyNetworkConfig({ interfaces: [staticCfg], confirmTimeoutSeconds: 5 });
  await d.kill9();
  await new Promise((r) => setTimeout(r, 6000));
  expect(await readFile(file(), "utf8")).toContain("192.0.2.99");
  await d.restart();
  expect(await readFile(file(), "utf8")).toBe(before);
  expect((await failure(d.grpcUnix().network.confirmNetworkChange({ id: again.change!.id }))).code).toBe(grpc.status.NOT_FOUND);
});

test("SetHostname writes the host name file after the kernel took the name", async () => {
  const api = d.grpcUnix().network;
  expect(await api.setHostname({ hostname: "piccolo-home.lan" })).toEqual({ hostname: "piccolo-home.lan" });
  expect(await readFile(join(d.dir, "hostname"), "utf8")).toBe("piccolo-home.lan\n");
  for (const bad of ["", "-lead", "a..b", "x".repeat(65), "sp ace"]) {
    expect(await failure(api.setHostname({ hostname: bad }))).toMatchObject({ code: grpc.status.INVALID_ARGUMENT, field: "hostname" });
  }
  expect(await readFile(join(d.dir, "hostname"), "utf8")).toBe("piccolo-home.lan\n");
});
