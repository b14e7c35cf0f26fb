/**
 * The update_engine simulator on its own, without piccolod: `busctl` (an independent D-Bus client)
 * introspects and calls it on the private dbus-daemon; a minimal Omaha server written here answers
 * its update check; signals are collected by a plain dbus-next match. Checks the interface is
 * exactly Flatcar's, a full update lands in the passive partition and sets Flatcar's post-install
 * flags, and each failure mode reports update_engine's error code and leaves the flags alone.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { gzipSync } from "node:zlib";
import dbus from "dbus-next";
import { cgptFlags, readDisk } from "./update-engine-disk.js";
import { startUpdateRig, type UpdateRig } from "./update-engine-harness.js";

const run = promisify(execFile);

let rig: UpdateRig;
let work: string;
let omaha: Server;
let omahaUrl: string;
const events: string[] = [];
const image = Buffer.alloc(3 * 1024 * 1024 + 123, 0);
let gz: Buffer;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), "ue-sim-"));
  rig = await startUpdateRig({ usrMiB: 8 });
  for (let i = 0; i < image.length; i += 997) image[i] = (i / 997) & 0xff;
  Buffer.from("NEW USR IMAGE\n").copy(image);
  gz = gzipSync(image);
  await writeFile(join(work, "payload.gz"), gz);
  omaha = createServer((req, res) => {
    let body = "";
    req.on("data", (d: Buffer) => (body += d.toString()));
    req.on("end", () => {
      if (req.method === "GET" && req.url === "/files/payload.gz") {
        res.writeHead(200, { "content-length": gz.length });
        res.end(gz);
        return;
      }
      for (const m of body.matchAll(/<event [^>]*>/g)) events.push(m[0]);
      const sha1 = createHash("sha1").update(gz).digest("base64");
      const sha256 = createHash("sha256").update(gz).digest("base64");
      res.writeHead(200, { "content-type": "text/xml" });
      res.end(
        body.includes("<updatecheck")
          ? `<?xml version="1.0"?><response protocol="3.0"><app appid="x" status="ok"><updatecheck status="ok"><urls><url codebase="http://127.0.0.1:${(omaha.address() as AddressInfo).port}/files/"/></urls><manifest version="2.0.0"><packages><package name="payload.gz" hash="${sha1}" size="${gz.length}" required="true"/></packages><actions><action event="postinstall" sha256="${sha256}" DisablePayloadBackoff="true"/></actions></manifest></updatecheck></app></response>`
          : `<?xml version="1.0"?><response protocol="3.0"><app status="ok"><event status="ok"/></app></response>`,
      );
    });
  });
  await new Promise<void>((r) => omaha.listen(0, "127.0.0.1", r));
  omahaUrl = `http://127.0.0.1:${(omaha.address() as AddressInfo).port}/v1/update/`;
  await writeFile(rig.updateConf, `GROUP=stable\nSERVER=${omahaUrl}\n`);
}, 60_000);

afterAll(async () => {
  await rig?.cleanup();
  omaha?.close();
  if (work) await rm(work, { recursive: true, force: true });
});

const busctl = async (...args: string[]): Promise<string> => (await run("busctl", [`--address=${rig.bus.address}`, ...args])).stdout;
const status = async (): Promise<string> => busctl("call", "com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager", "GetStatus");

async function waitFor(re: RegExp, timeoutMs = 60_000): Promise<string> {
  const t0 = Date.now();
  for (;;) {
    const s = await status();
    if (re.test(s)) return s;
    if (Date.now() - t0 > timeoutMs) throw new Error(`status never matched ${re}: ${s}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Collects StatusUpdate signals with a plain dbus-next match rule. */
async function collectSignals(): Promise<{ ops: string[]; close(): void }> {
  const bus = dbus.sessionBus({ busAddress: rig.bus.address });
  const ops: string[] = [];
  await bus.call(
    new dbus.Message({
      destination: "org.freedesktop.DBus",
      path: "/org/freedesktop/DBus",
      interface: "org.freedesktop.DBus",
      member: "AddMatch",
      signature: "s",
      body: ["type='signal',interface='com.coreos.update1.Manager',member='StatusUpdate'"],
    }),
  );
  bus.on("message", (m: dbus.Message) => {
    if (m.member === "StatusUpdate") {
      const op = (m.body as unknown[])[2] as string;
      if (ops[ops.length - 1] !== op) ops.push(op);
    }
  });
  return { ops, close: () => bus.disconnect() };
}

test("busctl introspects exactly Flatcar's interface and calls GetStatus", async () => {
  const out = await busctl("introspect", "--xml-interface", "com.coreos.update1", "/com/coreos/update1");
  const iface = /<interface name="com.coreos.update1.Manager">([\s\S]*?)<\/interface>/.exec(out)?.[1] ?? "";
  const members = [...iface.matchAll(/<(method|signal) name="(\w+)"/g)].map((m) => `${m[1]} ${m[2]}`).sort();
  expect(members).toEqual(["method AttemptUpdate", "method GetStatus", "method ResetStatus", "signal StatusUpdate"]);
  const args = (kind: string, name: string): string[] =>
    [...(new RegExp(`<${kind} name="${name}">([\\s\\S]*?)</${kind}>`).exec(iface)?.[1] ?? "").matchAll(/<arg [^>]*type="(\w)"[^>]*\/>/g)].map((m) => m[1]!);
  expect(args("method", "GetStatus")).toEqual(["x", "d", "s", "s", "x"]);
  expect(args("signal", "StatusUpdate")).toEqual(["x", "d", "s", "s", "x"]);
  expect(iface).not.toMatch(/direction="in"/);
  expect(await status()).toBe('xdssx 0 0 "UPDATE_STATUS_IDLE" "" 0\n');
});

test("AttemptUpdate (from busctl) checks with the Omaha server, writes the passive slot, flags it as Flatcar does", async () => {
  const sig = await collectSignals();
  const before = await cgptFlags(rig.disk.path, rig.disk.usrA);
  await busctl("call", "com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager", "AttemptUpdate");
  const s = await waitFor(/UPDATED_NEED_REBOOT/);
  expect(s).toMatch(new RegExp(`^xdssx \\d+ 1 "UPDATE_STATUS_UPDATED_NEED_REBOOT" "2.0.0" ${gz.length}`));
  sig.close();
  expect(sig.ops).toEqual([
    "UPDATE_STATUS_CHECKING_FOR_UPDATE",
    "UPDATE_STATUS_UPDATE_AVAILABLE",
    "UPDATE_STATUS_DOWNLOADING",
    "UPDATE_STATUS_VERIFYING",
    "UPDATE_STATUS_FINALIZING",
    "UPDATE_STATUS_UPDATED_NEED_REBOOT",
  ]);
  expect((await readDisk(rig.disk.path, rig.disk.offsetB, image.length)).equals(image)).toBe(true);
  const b = await cgptFlags(rig.disk.path, rig.disk.usrB);
  const a = await cgptFlags(rig.disk.path, rig.disk.usrA);
  expect(b).toMatchObject({ tries: 1, successful: 0 });
  expect(b.priority).toBeGreaterThan(a.priority);
  expect(a.successful).toBe(before.successful);
  expect(events.some((e) => /eventtype="3" eventresult="2"/.test(e))).toBe(true);
  // A second AttemptUpdate is skipped, as update_engine does when not idle.
  await busctl("call", "com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager", "AttemptUpdate");
  expect(await status()).toMatch(/UPDATED_NEED_REBOOT/);
  await busctl("call", "com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager", "ResetStatus");
  expect(await status()).toMatch(/UPDATE_STATUS_IDLE/);
});

test.each([
  ["bad-hash", 10],
  ["download-error", 9],
] as const)("--fail %s: reports error code %d in an Omaha event, back to IDLE, flags untouched", async (mode, code) => {
  await run("cgpt", ["add", "-i", "4", "-P", "0", "-T", "0", "-S", "0", rig.disk.path]);
  await rig.restartSim({ fail: mode });
  events.length = 0;
  const sig = await collectSignals();
  await busctl("call", "com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager", "AttemptUpdate");
  await new Promise((r) => setTimeout(r, 300));
  await waitFor(/UPDATE_STATUS_IDLE/);
  sig.close();
  expect(sig.ops).toContain("UPDATE_STATUS_REPORTING_ERROR_EVENT");
  expect(events.some((e) => e.includes(`errorcode="${code}"`) && e.includes('eventresult="0"'))).toBe(true);
  expect(await cgptFlags(rig.disk.path, rig.disk.usrB)).toEqual({ priority: 0, tries: 0, successful: 0 });
});

test("--fail crash-mid-download: the process dies and the name leaves the bus", async () => {
  await rig.restartSim({ fail: "crash-mid-download" });
  await busctl("call", "com.coreos.update1", "/com/coreos/update1", "com.coreos.update1.Manager", "AttemptUpdate");
  await rig.sim.exited();
  await expect(status()).rejects.toMatchObject({ stderr: expect.stringMatching(/com.coreos.update1|not activatable|was not provided/) });
  expect(await readFile(rig.updateConf, "utf8")).toContain(omahaUrl);
  await rig.restartSim();
});
