/**
 * A simulator of Flatcar's update_engine, for the machines where the real one cannot run. It is a
 * real D-Bus service (dbus-next) that owns `com.coreos.update1` and exports
 * `com.coreos.update1.Manager` at `/com/coreos/update1` with exactly Flatcar's members:
 * AttemptUpdate(), ResetStatus(), GetStatus() → (x d s s x) and the StatusUpdate signal with the
 * same arguments. AttemptUpdate does what update_engine does with a payload: it reads SERVER= and
 * GROUP= from the update.conf it is given, makes an Omaha 3.0 update check, downloads the package
 * from the response's codebase, checks its size and its SHA-1 (package hash) and SHA-256
 * (postinstall action) hashes, gunzips it into the passive USR partition of the disk, then marks
 * that partition as Flatcar's post-install step does (`cgpt add -S0 -T1`, highest priority) and
 * reports UPDATED_NEED_REBOOT, pinging the Omaha server with events as it goes (download started,
 * finished, complete, or the error code). Failure modes for tests: --fail bad-hash |
 * download-error | crash-mid-download; --rate slows the download; --status starts in a given state.
 *
 * Usage: node dist/test/sim/update-engine.js --bus ADDRESS --update-conf FILE --disk IMAGE
 *          --cmdline FILE [--release FILE] [--fail MODE] [--rate BYTES_PER_S] [--status STATUS]
 */
import { execFile } from "node:child_process";
import { createHash, randomUUID } from "node:crypto";
import { createWriteStream } from "node:fs";
import { readFile } from "node:fs/promises";
import { request as httpRequest, type IncomingMessage } from "node:http";
import { Transform, type TransformCallback } from "node:stream";
import { pipeline } from "node:stream/promises";
import { pathToFileURL } from "node:url";
import { promisify } from "node:util";
import { createGunzip } from "node:zlib";
import dbus from "dbus-next";

const run = promisify(execFile);

/** update_engine's well-known name, object path and interface (FLATCAR.md). */
export const ENGINE_NAME = "com.coreos.update1";
export const ENGINE_PATH = "/com/coreos/update1";
export const ENGINE_INTERFACE = "com.coreos.update1.Manager";

/** update_engine's status strings. */
export const STATUS = {
  IDLE: "UPDATE_STATUS_IDLE",
  CHECKING: "UPDATE_STATUS_CHECKING_FOR_UPDATE",
  AVAILABLE: "UPDATE_STATUS_UPDATE_AVAILABLE",
  DOWNLOADING: "UPDATE_STATUS_DOWNLOADING",
  VERIFYING: "UPDATE_STATUS_VERIFYING",
  FINALIZING: "UPDATE_STATUS_FINALIZING",
  NEED_REBOOT: "UPDATE_STATUS_UPDATED_NEED_REBOOT",
  ERROR_EVENT: "UPDATE_STATUS_REPORTING_ERROR_EVENT",
} as const;

/** update_engine's action exit codes that the simulator reports in Omaha error events. */
export const ERROR_CODES = {
  omahaRequest: 2,
  omahaResponseHandler: 3,
  installDeviceOpen: 7,
  downloadTransfer: 9,
  payloadHashMismatch: 10,
  payloadSizeMismatch: 11,
  downloadWrite: 14,
  postinstallRunner: 5,
} as const;

/** Flatcar's Omaha app id. */
export const FLATCAR_APP_ID = "{e96281a6-d1af-4bde-9a0a-97b76e56dc57}";

type FailMode = "" | "bad-hash" | "download-error" | "crash-mid-download";

/** What the simulator is given. */
export interface SimOptions {
  readonly bus: string;
  readonly updateConf: string;
  readonly disk: string;
  readonly cmdline: string;
  readonly release: string;
  readonly fail: FailMode;
  /** Download rate limit in bytes per second; 0 for none. */
  readonly rate: number;
  readonly status: string;
}

function parseArgs(argv: readonly string[]): SimOptions {
  const o: Record<string, string> = {};
  for (let i = 0; i < argv.length; i += 2) {
    const k = argv[i]!;
    if (!k.startsWith("--") || argv[i + 1] === undefined) throw new Error(`bad argument ${k}`);
    o[k.slice(2)] = argv[i + 1]!;
  }
  for (const k of ["bus", "update-conf", "disk", "cmdline"]) if (!o[k]) throw new Error(`--${k} is required`);
  const fail = (o["fail"] ?? "") as FailMode;
  if (!["", "bad-hash", "download-error", "crash-mid-download"].includes(fail)) throw new Error(`unknown --fail ${fail}`);
  const status = o["status"] ?? STATUS.IDLE;
  if (!Object.values(STATUS).includes(status as never)) throw new Error(`unknown --status ${status}`);
  return {
    bus: o["bus"]!,
    updateConf: o["update-conf"]!,
    disk: o["disk"]!,
    cmdline: o["cmdline"]!,
    release: o["release"] ?? "",
    fail,
    rate: Number(o["rate"] ?? 0),
    status,
  };
}

/** KEY=value lines of update.conf (later lines win, as update_engine reads them). */
export function parseConf(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const m = /^\s*([A-Z_]+)\s*=\s*(.*?)\s*$/.exec(line);
    if (m) out[m[1]!] = m[2]!.replace(/^"(.*)"$/, "$1");
  }
  return out;
}

/** The attributes of the first `<tag …>` in an XML text (enough for Omaha's flat answers). */
export function xmlAttrs(xml: string, tag: string): Record<string, string> | undefined {
  const m = new RegExp(`<${tag}(\\s[^>]*)?/?>`).exec(xml);
  if (!m) return undefined;
  const out: Record<string, string> = {};
  for (const a of (m[1] ?? "").matchAll(/([A-Za-z_:][\w:.-]*)\s*=\s*"([^"]*)"/g)) out[a[1]!] = a[2]!;
  return out;
}

class EngineError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
  }
}

function post(url: string, body: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method: "POST", headers: { "content-type": "text/xml", "content-length": Buffer.byteLength(body) } }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (text += d));
      res.on("end", () => (res.statusCode === 200 ? resolve(text) : reject(new Error(`Omaha server answered HTTP ${res.statusCode}`))));
      res.on("error", reject);
    });
    req.on("error", reject);
    req.end(body);
  });
}

function get(url: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, (res) => resolve(res));
    req.on("error", reject);
    req.end();
  });
}

/** Starts the simulator on the bus; resolves once it owns the name. */
export async function startSimulator(o: SimOptions): Promise<{ close(): void }> {
  const bus = dbus.sessionBus({ busAddress: o.bus });
  const state = { lastChecked: 0n, progress: 0, op: o.status as string, newVersion: "", newSize: 0n, busy: false };
  const bootId = `{${randomUUID()}}`;

  class Manager extends dbus.interface.Interface {
    AttemptUpdate(): void {
      log("call AttemptUpdate");
      // As update_engine: a check while not idle is skipped.
      if (state.op !== STATUS.IDLE || state.busy) return;
      state.busy = true;
      void update().finally(() => (state.busy = false));
    }
    ResetStatus(): void {
      log("call ResetStatus");
      if (state.op !== STATUS.IDLE && state.op !== STATUS.NEED_REBOOT) {
        throw new dbus.DBusError("org.freedesktop.DBus.Error.Failed", `ResetStatus is only allowed from IDLE or UPDATED_NEED_REBOOT, not ${state.op}`);
      }
      set(STATUS.IDLE, { progress: 0, newVersion: "", newSize: 0n });
    }
    GetStatus(): [bigint, number, string, string, bigint] {
      log("call GetStatus");
      return [state.lastChecked, state.progress, state.op, state.newVersion, state.newSize];
    }
    StatusUpdate(): [bigint, number, string, string, bigint] {
      return [state.lastChecked, state.progress, state.op, state.newVersion, state.newSize];
    }
  }
  Manager.configureMembers({
    methods: {
      AttemptUpdate: { inSignature: "", outSignature: "" },
      ResetStatus: { inSignature: "", outSignature: "" },
      GetStatus: { inSignature: "", outSignature: "xdssx" },
    },
    signals: { StatusUpdate: { signature: "xdssx" } },
  });
  const iface = new Manager(ENGINE_INTERFACE);

  const set = (op: string, extra: Partial<Omit<typeof state, "op">> = {}): void => {
    Object.assign(state, extra, { op });
    iface.StatusUpdate();
  };

  const log = (msg: string): void => void process.stderr.write(`update-engine-sim: ${msg}\n`);

  const release = async (): Promise<string> => {
    try {
      return parseConf(await readFile(o.release, "utf8"))["FLATCAR_RELEASE_VERSION"] ?? "0.0.0";
    } catch {
      return "0.0.0";
    }
  };

  /** The passive USR partition: the USR slot whose GUID is not the booted one on the command line. */
  const passive = async (): Promise<{ n: number; other: number; offset: number; bytes: number }> => {
    const cmdline = await readFile(o.cmdline, "utf8");
    const booted = /(?:verity\.usr|mount\.usr|usr)=PARTUUID=([0-9a-fA-F-]{36})/.exec(cmdline)?.[1]?.toUpperCase();
    if (!booted) throw new EngineError(ERROR_CODES.installDeviceOpen, "no USR PARTUUID on the kernel command line");
    const show = async (f: string, n: number): Promise<string> => (await run("cgpt", ["show", "-i", String(n), f, o.disk])).stdout.trim();
    const slots: { n: number; guid: string }[] = [];
    for (const n of [3, 4]) {
      if ((await show("-l", n)) !== (n === 3 ? "USR-A" : "USR-B")) throw new EngineError(ERROR_CODES.installDeviceOpen, `partition ${n} is not labelled as a USR slot`);
      slots.push({ n, guid: (await show("-u", n)).toUpperCase() });
    }
    const target = slots.find((s) => s.guid !== booted);
    const other = slots.find((s) => s.guid === booted);
    if (!target || !other) throw new EngineError(ERROR_CODES.installDeviceOpen, `booted partition ${booted} is neither USR-A nor USR-B`);
    return { n: target.n, other: other.n, offset: Number(await show("-b", target.n)) * 512, bytes: Number(await show("-s", target.n)) * 512 };
  };

  const omahaRequest = (version: string, group: string, inner: string): string =>
    `<?xml version="1.0" encoding="UTF-8"?>\n` +
    `<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" installsource="ondemandupdate" ismachine="1">\n` +
    ` <os version="Indy" platform="CoreOS" sp="${version}_x86_64"></os>\n` +
    ` <app appid="${FLATCAR_APP_ID}" version="${version}" track="${group}" bootid="${bootId}" oem="" oemversion="" alephversion="${version}" machineid="" lang="en-US" board="amd64-usr" hardware_class="" delta_okay="false">\n` +
    `  ${inner}\n </app>\n</request>\n`;

  const event = async (server: string, version: string, group: string, type: number, result: number, errorcode?: number): Promise<void> => {
    const ec = errorcode === undefined ? "" : ` errorcode="${errorcode}"`;
    try {
      await post(server, omahaRequest(version, group, `<event eventtype="${type}" eventresult="${result}"${ec}></event>`));
    } catch (e) {
      log(`event ping failed: ${(e as Error).message}`);
    }
  };

  async function update(): Promise<void> {
    let server = "";
    let group = "";
    const version = await release();
    set(STATUS.CHECKING, { progress: 0 });
    try {
      const conf = parseConf(await readFile(o.updateConf, "utf8").catch(() => ""));
      server = conf["SERVER"] ?? "";
      group = conf["GROUP"] ?? "stable";
      if (!server || server === "disabled") {
        log("SERVER is disabled; no update check");
        set(STATUS.IDLE);
        return;
      }
      let response: string;
      try {
        response = await post(server, omahaRequest(version, group, `<ping active="1"></ping>\n  <updatecheck></updatecheck>`));
      } catch (e) {
        throw new EngineError(ERROR_CODES.omahaRequest, `Omaha request to ${server} failed: ${(e as Error).message}`);
      }
      state.lastChecked = BigInt(Math.floor(Date.now() / 1000));
      const check = xmlAttrs(response, "updatecheck");
      if (!check) throw new EngineError(ERROR_CODES.omahaResponseHandler, "no updatecheck in the Omaha response");
      if (check["status"] !== "ok") {
        log(`no update (${check["status"]})`);
        set(STATUS.IDLE);
        return;
      }
      const codebase = xmlAttrs(response, "url")?.["codebase"];
      const manifest = xmlAttrs(response, "manifest");
      const pkg = xmlAttrs(response, "package");
      const action = [...response.matchAll(/<action\s[^>]*>/g)].map((m) => xmlAttrs(m[0], "action")).find((a) => a?.["event"] === "postinstall");
      if (!codebase || !manifest?.["version"] || !pkg?.["name"] || !pkg["hash"] || !pkg["size"] || !action?.["sha256"]) {
        throw new EngineError(ERROR_CODES.omahaResponseHandler, "the Omaha response lacks codebase, version, package or postinstall sha256");
      }
      const size = Number(pkg["size"]);
      set(STATUS.AVAILABLE, { newVersion: manifest["version"], newSize: BigInt(size) });
      const slot = await passive();
      await event(server, version, group, 13, 1);
      set(STATUS.DOWNLOADING, { progress: 0 });

      const sha1 = createHash("sha1");
      const sha256 = createHash("sha256");
      let received = 0;
      let written = 0;
      let lastEmit = 0;
      const started = Date.now();
      let res: IncomingMessage;
      try {
        res = await get(codebase + pkg["name"]);
      } catch (e) {
        throw new EngineError(ERROR_CODES.downloadTransfer, `download failed: ${(e as Error).message}`);
      }
      if (res.statusCode !== 200) {
        res.resume();
        throw new EngineError(ERROR_CODES.downloadTransfer, `download answered HTTP ${res.statusCode}`);
      }
      const meter = new Transform({
        transform(chunk: Buffer, _enc, cb: TransformCallback) {
          received += chunk.length;
          sha1.update(chunk);
          sha256.update(chunk);
          if (received >= size / 2 && o.fail === "crash-mid-download") {
            log("crashing mid-download as told");
            process.kill(process.pid, "SIGKILL");
          }
          if (received >= size / 2 && o.fail === "download-error") {
            cb(new EngineError(ERROR_CODES.downloadTransfer, "transfer interrupted (simulated)"));
            return;
          }
          const now = Date.now();
          if (now - lastEmit >= 100 || received === size) {
            lastEmit = now;
            set(STATUS.DOWNLOADING, { progress: size > 0 ? Math.min(1, received / size) : 0 });
          }
          if (o.rate > 0) {
            const due = started + (received / o.rate) * 1000;
            setTimeout(() => cb(null, chunk), Math.max(0, due - now));
          } else cb(null, chunk);
        },
      });
      const limit = new Transform({
        transform(chunk: Buffer, _enc, cb: TransformCallback) {
          written += chunk.length;
          if (written > slot.bytes) cb(new EngineError(ERROR_CODES.downloadWrite, `payload is larger than the USR partition (${slot.bytes} bytes)`));
          else cb(null, chunk);
        },
      });
      try {
        // Large blocks, as update_engine writes (zlib's and the file stream's defaults are 16 KiB).
        await pipeline(res, meter, createGunzip({ chunkSize: 1 << 20 }), limit, createWriteStream(o.disk, { flags: "r+", start: slot.offset, highWaterMark: 4 << 20 }));
      } catch (e) {
        if (e instanceof EngineError) throw e;
        throw new EngineError(ERROR_CODES.downloadWrite, `writing the payload failed: ${(e as Error).message}`);
      }
      await event(server, version, group, 14, 1);
      set(STATUS.VERIFYING, { progress: 1 });
      if (received !== size) throw new EngineError(ERROR_CODES.payloadSizeMismatch, `payload size ${received} differs from the manifest's ${size}`);
      let gotSha1 = sha1.digest("base64");
      if (o.fail === "bad-hash") gotSha1 = "AAAA" + gotSha1.slice(4);
      if (gotSha1 !== pkg["hash"]) throw new EngineError(ERROR_CODES.payloadHashMismatch, `payload SHA-1 ${gotSha1} differs from ${pkg["hash"]}`);
      if (sha256.digest("base64") !== action["sha256"]) throw new EngineError(ERROR_CODES.payloadHashMismatch, "payload SHA-256 differs from the postinstall action's");
      set(STATUS.FINALIZING);
      // Flatcar's post-install: the new partition gets one try, is not yet good, and the highest priority.
      try {
        await run("cgpt", ["add", "-i", String(slot.n), "-S", "0", "-T", "1", "-P", "2", o.disk]);
        await run("cgpt", ["add", "-i", String(slot.other), "-P", "1", o.disk]);
      } catch (e) {
        throw new EngineError(ERROR_CODES.postinstallRunner, `cgpt failed: ${(e as Error).message}`);
      }
      set(STATUS.NEED_REBOOT);
      await event(server, version, group, 3, 2);
      log(`updated to ${manifest["version"]} in partition ${slot.n}; reboot needed`);
    } catch (e) {
      const code = e instanceof EngineError ? e.code : 1;
      log(`update failed (code ${code}): ${(e as Error).message}`);
      set(STATUS.ERROR_EVENT);
      if (server && server !== "disabled") await event(server, version, group, 3, 0, code);
      set(STATUS.IDLE, { progress: 0, newVersion: "", newSize: 0n });
    }
  }

  bus.export(ENGINE_PATH, iface);
  const reply = await bus.requestName(ENGINE_NAME, dbus.NameFlag.DO_NOT_QUEUE);
  if (reply !== dbus.RequestNameReply.PRIMARY_OWNER) throw new Error(`could not own ${ENGINE_NAME} (reply ${reply})`);
  if (o.status === STATUS.NEED_REBOOT) Object.assign(state, { newVersion: "9.9.9", progress: 1 });
  return { close: () => bus.disconnect() };
}

async function main(): Promise<void> {
  const o = parseArgs(process.argv.slice(2));
  const sim = await startSimulator(o);
  process.stdout.write(`ready ${ENGINE_NAME}\n`);
  const stop = (): void => {
    sim.close();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e: unknown) => {
    process.stderr.write(`update-engine-sim: ${(e as Error).message}\n`);
    process.exit(1);
  });
}
