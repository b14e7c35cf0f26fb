/**
 * The health checks behind GetHealth, the start-up gate (READY is sent only when every required
 * check passes) and the first phase of diagnostics. Each check probes the real host part.
 */
import { connect } from "node:net";
import { mkdir, open, readFile, realpath, stat, unlink } from "node:fs/promises";
import { basename, join } from "node:path";
import {
  CheckStatus,
  HealthState,
  type GetHealthResponse,
  type HealthCheck,
} from "../../../gen/piccolo/system/v1/system.js";

/** What the checks probe. */
export interface HealthDeps {
  readonly stateDir: string;
  readonly dockerSocket: string;
  readonly systemBusAddress: string;
  readonly tpmDevices: readonly string[];
  readonly mountInfoFile: string;
  readonly getuid?: () => number;
}

/** Runs the checks; `run()` reuses a result for up to `cacheMs`. */
export interface HealthChecker {
  run(): Promise<GetHealthResponse>;
  /** Runs every check now, bypassing the cache. */
  runNow(): Promise<GetHealthResponse>;
}

const pass = (name: string, detail: string, required = false): HealthCheck => ({
  name,
  status: CheckStatus.CHECK_STATUS_PASS,
  detail,
  required,
});
const warn = (name: string, detail: string): HealthCheck => ({ name, status: CheckStatus.CHECK_STATUS_WARN, detail, required: false });
const fail = (name: string, detail: string, required = false): HealthCheck => ({
  name,
  status: CheckStatus.CHECK_STATUS_FAIL,
  detail,
  required,
});

/** Sums checks up: any failure → UNHEALTHY, any warning → DEGRADED. */
export function overallState(checks: readonly HealthCheck[]): HealthState {
  if (checks.some((c) => c.status === CheckStatus.CHECK_STATUS_FAIL)) return HealthState.HEALTH_STATE_UNHEALTHY;
  if (checks.some((c) => c.status === CheckStatus.CHECK_STATUS_WARN)) return HealthState.HEALTH_STATE_DEGRADED;
  return HealthState.HEALTH_STATE_HEALTHY;
}

/** Connects to a unix socket (path, or abstract name starting with "\0") and closes again. */
export function probeUnixSocket(path: string, timeoutMs = 1000): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect({ path });
    const t = setTimeout(() => {
      s.destroy();
      reject(new Error(`no answer within ${timeoutMs} ms`));
    }, timeoutMs);
    s.once("connect", () => {
      clearTimeout(t);
      s.destroy();
      resolve();
    });
    s.once("error", (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}

const errText = (e: unknown): string => {
  const err = e as NodeJS.ErrnoException;
  return err.code ? `${err.code}: ${err.message}` : String((e as Error).message ?? e);
};

async function checkStateDir(dir: string): Promise<HealthCheck> {
  const name = "state_dir_writable";
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    const probe = join(dir, `.health-${process.pid}`);
    const fh = await open(probe, "w", 0o600);
    try {
      await fh.write("ok");
      await fh.sync();
    } finally {
      await fh.close();
    }
    await unlink(probe);
    return pass(name, `${dir} is writable`, true);
  } catch (e) {
    return fail(name, `${dir} is not writable (${errText(e)})`, true);
  }
}

async function checkSocket(name: string, what: string, path: string): Promise<HealthCheck> {
  try {
    await probeUnixSocket(path);
    return pass(name, `${what} reachable at ${path}`);
  } catch (e) {
    return warn(name, `${what} not reachable at ${path} (${errText(e)})`);
  }
}

/** The unix socket path of a D-Bus address, or undefined for transports other than unix. */
export function dbusSocketPath(address: string): string | undefined {
  const first = address.split(";")[0] ?? "";
  const m = /^unix:(.*)$/.exec(first);
  if (!m) return undefined;
  const kv = Object.fromEntries(m[1]!.split(",").map((p) => p.split("=", 2) as [string, string]));
  if (kv["path"]) return decodeURIComponent(kv["path"]);
  if (kv["abstract"]) return "\0" + decodeURIComponent(kv["abstract"]);
  return undefined;
}

async function checkTpm(devices: readonly string[]): Promise<HealthCheck> {
  for (const d of devices) {
    try {
      const s = await stat(d);
      if (s.isCharacterDevice()) return pass("tpm_device", `TPM device ${d} present`);
    } catch {
      // next
    }
  }
  return warn("tpm_device", `no TPM device (looked for ${devices.join(", ")}); sealed secrets fall back to the host key`);
}

/** Finds the disk holding the root (or /usr) filesystem from mountinfo and sysfs. */
export async function findBootDisk(mountInfoFile: string): Promise<{ disk: string; source: string } | { error: string }> {
  let text: string;
  try {
    text = await readFile(mountInfoFile, "utf8");
  } catch (e) {
    return { error: `cannot read ${mountInfoFile} (${errText(e)})` };
  }
  const mounts = text
    .split("\n")
    .filter(Boolean)
    .map((l) => {
      const f = l.split(" ");
      const dash = f.indexOf("-");
      return { majmin: f[2] ?? "", mountPoint: f[4] ?? "", fstype: f[dash + 1] ?? "", source: f[dash + 2] ?? "" };
    });
  // Flatcar boots /usr from USR-A/USR-B; other systems from "/".
  for (const mp of ["/usr", "/"]) {
    const m = [...mounts].reverse().find((x) => x.mountPoint === mp);
    if (!m) continue;
    if (m.majmin.startsWith("0:")) {
      if (mp === "/") return { error: `the root filesystem is ${m.fstype} (${m.source}), not on a block device` };
      continue;
    }
    try {
      const dev = await realpath(`/sys/dev/block/${m.majmin}`);
      // A partition's sysfs folder sits inside its disk's and has a "partition" file.
      let diskDir = dev;
      try {
        await stat(join(dev, "partition"));
        diskDir = join(dev, "..");
      } catch {
        // a whole disk
      }
      return { disk: `/dev/${basename(await realpath(diskDir))}`, source: m.source };
    } catch (e) {
      return { error: `cannot resolve block device ${m.majmin} of ${mp} (${errText(e)})` };
    }
  }
  return { error: `no root mount in ${mountInfoFile}` };
}

async function checkBootDisk(mountInfoFile: string): Promise<HealthCheck> {
  const r = await findBootDisk(mountInfoFile);
  if ("error" in r) return warn("boot_disk", r.error);
  return pass("boot_disk", `booted from ${r.disk} (${r.source})`);
}

/** The quick checks, in their fixed order. */
export async function runHealthChecks(deps: HealthDeps): Promise<HealthCheck[]> {
  const uid = (deps.getuid ?? process.getuid)?.() ?? -1;
  const root =
    uid === 0
      ? pass("running_as_root", "running as root (uid 0)")
      : warn("running_as_root", `running as uid ${uid}: raw disks, the TPM and update_engine need root (fine for the demo)`);
  const busPath = dbusSocketPath(deps.systemBusAddress);
  return Promise.all([
    Promise.resolve(root),
    checkStateDir(deps.stateDir),
    checkSocket("docker_socket", "Docker engine", deps.dockerSocket),
    busPath
      ? checkSocket("system_bus", "D-Bus system bus", busPath)
      : Promise.resolve(warn("system_bus", `unsupported D-Bus address ${deps.systemBusAddress}`)),
    checkTpm(deps.tpmDevices),
    checkBootDisk(deps.mountInfoFile),
  ]);
}

/** Creates a checker that reuses results for `cacheMs` (concurrent callers share one run). */
export function createHealthChecker(deps: HealthDeps, cacheMs = 1000): HealthChecker {
  let last: { at: number; value: Promise<GetHealthResponse> } | undefined;
  const runNow = async (): Promise<GetHealthResponse> => {
    const checkTime = new Date();
    const checks = await runHealthChecks(deps);
    return { state: overallState(checks), checks, checkTime };
  };
  return {
    run() {
      const now = Date.now();
      if (!last || now - last.at > cacheMs) {
        const value = runNow();
        last = { at: now, value };
        value.catch(() => {
          last = undefined;
        });
      }
      return last.value;
    },
    runNow,
  };
}
