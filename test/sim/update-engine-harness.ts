/**
 * Starts what piccolod's update path talks to on a machine without Flatcar: a private
 * `dbus-daemon` (its own config, its own socket, system-bus policy for update_engine), the
 * update_engine simulator on it (a child process, so tests can kill it), a Flatcar-like boot disk
 * image, the kernel command line and release file saying USR-A booted, and an update.conf.
 *
 * Also runnable for the demo: `node dist/test/sim/update-engine-harness.js --dir D [--usr-mib N]`
 * prints one JSON line (bus address, disk, files, piccolod flags) and runs until SIGTERM.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir, userInfo } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { makeFlatcarDisk, writeCmdline, writeRelease, type FlatcarDisk } from "./update-engine-disk.js";

const HERE = dirname(fileURLToPath(import.meta.url));
/** The built simulator: dist/test/sim/update-engine.js, whether this runs from test/sim (ts-jest) or dist/test/sim. */
export const SIM_JS = HERE.includes(`${join("dist", "test", "sim")}`)
  ? join(HERE, "update-engine.js")
  : resolve(HERE, "../../dist/test/sim/update-engine.js");

/** A private dbus-daemon. */
export interface PrivateBus {
  /** "unix:path=…" */
  readonly address: string;
  readonly proc: ChildProcess;
  stop(): Promise<void>;
}

const exited = (p: ChildProcess): Promise<void> =>
  p.exitCode !== null || p.signalCode !== null ? Promise.resolve() : new Promise((r) => p.once("exit", () => r()));

/** Starts dbus-daemon with its own config in `dir`; resolves with its address once it listens. */
export async function startPrivateBus(dir: string): Promise<PrivateBus> {
  await mkdir(dir, { recursive: true });
  const socket = join(dir, "system_bus_socket");
  const config = join(dir, "bus.conf");
  // Flatcar's policy for update_engine: root owns the name and may call it; here the user running
  // the harness stands for root (tests run as root; the demo may not). Everyone may talk to the bus.
  await writeFile(
    config,
    `<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=${socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="org.freedesktop.DBus"/>
    <allow receive_sender="*"/>
  </policy>
  <policy user="${userInfo().username}">
    <allow own="*"/>
    <allow send_destination="*"/>
  </policy>
</busconfig>
`,
  );
  const proc = spawn("dbus-daemon", [`--config-file=${config}`, "--nofork", "--print-address=1", "--nopidfile"], { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  const address = await new Promise<string>((res, rej) => {
    let text = "";
    const t = setTimeout(() => rej(new Error(`dbus-daemon did not start: ${out}`)), 15_000);
    proc.stdout!.on("data", (d: Buffer) => {
      text += d.toString();
      const line = text.split("\n")[0];
      if (text.includes("\n") && line) {
        clearTimeout(t);
        res(line.trim());
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(t);
      rej(new Error(`dbus-daemon exited (${code}): ${out}`));
    });
  });
  return {
    address: address.split(",guid=")[0]!,
    proc,
    async stop() {
      proc.kill("SIGTERM");
      await exited(proc);
    },
  };
}

/** The simulator process. */
export interface SimProcess {
  readonly proc: ChildProcess;
  output(): string;
  /** SIGKILL and wait. */
  kill9(): Promise<void>;
  /** SIGTERM and wait. */
  stop(): Promise<void>;
  /** Resolves when the process has exited. */
  exited(): Promise<void>;
}

/** Options of the simulator process (see update-engine.ts). */
export interface SimProcessOptions {
  readonly bus: string;
  readonly updateConf: string;
  readonly disk: string;
  readonly cmdline: string;
  readonly release?: string;
  readonly fail?: "bad-hash" | "download-error" | "crash-mid-download";
  readonly rate?: number;
  readonly status?: string;
}

/** Starts the simulator; resolves once it owns com.coreos.update1. */
export async function startSimProcess(o: SimProcessOptions): Promise<SimProcess> {
  const args = [SIM_JS, "--bus", o.bus, "--update-conf", o.updateConf, "--disk", o.disk, "--cmdline", o.cmdline];
  if (o.release) args.push("--release", o.release);
  if (o.fail) args.push("--fail", o.fail);
  if (o.rate) args.push("--rate", String(o.rate));
  if (o.status) args.push("--status", o.status);
  const proc = spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stderr!.on("data", (d: Buffer) => (out += d.toString()));
  await new Promise<void>((res, rej) => {
    const t = setTimeout(() => rej(new Error(`the update_engine simulator did not start:\n${out}`)), 20_000);
    proc.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      if (out.includes("ready com.coreos.update1")) {
        clearTimeout(t);
        res();
      }
    });
    proc.once("exit", (code) => {
      clearTimeout(t);
      rej(new Error(`the update_engine simulator exited (${code}):\n${out}`));
    });
  });
  return {
    proc,
    output: () => out,
    async kill9() {
      proc.kill("SIGKILL");
      await exited(proc);
    },
    async stop() {
      proc.kill("SIGTERM");
      await exited(proc);
    },
    exited: () => exited(proc),
  };
}

/** The original update.conf of a rig, as build.sh writes it. */
export const ORIGINAL_UPDATE_CONF = "# Written by flatcar/build.sh.\nGROUP=disabled\nSERVER=disabled\n# kept as it is\nREBOOT_STRATEGY=off\n";

/** Everything an update test needs besides piccolod. */
export interface UpdateRig {
  readonly dir: string;
  readonly disk: FlatcarDisk;
  readonly cmdline: string;
  readonly release: string;
  readonly updateConf: string;
  readonly bus: PrivateBus;
  sim: SimProcess;
  /** piccolod flags that point it at this rig. */
  daemonArgs(): string[];
  /** (Re)starts the simulator with other options. */
  restartSim(o?: Partial<SimProcessOptions>): Promise<SimProcess>;
  cleanup(): Promise<void>;
}

/** Options of startUpdateRig. */
export interface UpdateRigOptions {
  readonly dir?: string;
  /** Size of each USR partition in MiB (default 16). */
  readonly usrMiB?: number;
  /** The booted version (default 1.0.0). */
  readonly bootedVersion?: string;
  readonly sim?: Partial<SimProcessOptions>;
}

/** Makes the disk and files, starts the private bus and the simulator. */
export async function startUpdateRig(options: UpdateRigOptions = {}): Promise<UpdateRig> {
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), "piccolo-update-rig-")));
  await mkdir(dir, { recursive: true });
  const disk = await makeFlatcarDisk(join(dir, "disk.img"), options.usrMiB ?? 16);
  const cmdline = join(dir, "cmdline");
  const release = join(dir, "release");
  const updateConf = join(dir, "update.conf");
  await writeCmdline(cmdline, disk.guidA);
  await writeRelease(release, options.bootedVersion ?? "1.0.0");
  await writeFile(updateConf, ORIGINAL_UPDATE_CONF, { mode: 0o644 });
  const bus = await startPrivateBus(join(dir, "bus"));
  const base: SimProcessOptions = { bus: bus.address, updateConf, disk: disk.path, cmdline, release };
  const rig: UpdateRig = {
    dir,
    disk,
    cmdline,
    release,
    updateConf,
    bus,
    sim: await startSimProcess({ ...base, ...options.sim }),
    daemonArgs: () => [
      "--system-bus-address", bus.address,
      "--update-disk", disk.path,
      "--update-conf-file", updateConf,
      "--kernel-cmdline-file", cmdline,
      "--os-release-files", release,
    ],
    async restartSim(o = {}) {
      await rig.sim.stop();
      rig.sim = await startSimProcess({ ...base, ...o });
      return rig.sim;
    },
    async cleanup() {
      await rig.sim.stop();
      await bus.stop();
      if (!options.dir) await rm(dir, { recursive: true, force: true });
    },
  };
  return rig;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  const flag = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : undefined;
  };
  const dir = flag("--dir");
  if (!dir) throw new Error("usage: update-engine-harness.js --dir DIR [--usr-mib N]");
  await rm(dir, { recursive: true, force: true });
  const rig = await startUpdateRig({ dir, usrMiB: Number(flag("--usr-mib") ?? 16) });
  process.stdout.write(
    JSON.stringify({ bus: rig.bus.address, disk: rig.disk.path, updateConf: rig.updateConf, cmdline: rig.cmdline, release: rig.release, daemonArgs: rig.daemonArgs() }) + "\n",
  );
  const stop = (): void => {
    void rig.cleanup().then(() => process.exit(0));
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main().catch((e: unknown) => {
    process.stderr.write(`update-engine-harness: ${(e as Error).message}\n`);
    process.exit(1);
  });
}
