/**
 * Daemon configuration: defaults, then a JSON file, then PICCOLOD_* environment variables, then
 * command-line flags. Validated once at start; every error names the bad key and where it came from.
 */
import { readFileSync } from "node:fs";
import { isAbsolute, join } from "node:path";
import { z } from "zod";

const listenAddress = z
  .string()
  .refine((s) => s === "" || parseListen(s) !== undefined, { message: 'expected "host:port" (port 0-65535) or "" to disable' });

const absPath = z.string().refine((s) => isAbsolute(s), { message: "expected an absolute path" });

/** The configuration schema; keys are what the file uses, and map to PICCOLOD_<UPPER_SNAKE> and --kebab-case. */
export const ConfigSchema = z
  .object({
    /** Folder for state: operation journals, the audit log, sealed secrets. */
    stateDir: absPath.default("/var/lib/piccolod"),
    /** Folder for runtime files: the socket and endpoints.json. */
    runtimeDir: absPath.default("/run/piccolod"),
    /** gRPC unix socket path ("" disables it); defaults to <runtimeDir>/piccolod.sock. */
    socketPath: z.string().optional(),
    /** gRPC TCP listener, "host:port"; "" disables it. TLS, and every call needs a token (docs/auth.md). */
    grpcListen: listenAddress.default("127.0.0.1:50051"),
    /** REST gateway listener, "host:port"; "" disables it. */
    restListen: listenAddress.default("127.0.0.1:8080"),
    /** Log level. */
    logLevel: z.enum(["trace", "debug", "info", "warn", "error", "fatal", "silent"]).default("info"),
    /** Audit log path; defaults to <stateDir>/audit.log. */
    auditLog: z.string().optional(),
    /** Docker engine socket. */
    dockerSocket: absPath.default("/var/run/docker.sock"),
    /**
     * Host folders containers may bind-mount (each folder and what is below it), and where image
     * import tarballs and build contexts must be. "/" is refused: it would allow everything.
     */
    containerDataRoots: z
      .array(absPath.refine((s) => s.replace(/\/+$/, "") !== "", { message: '"/" cannot be a data root' }))
      .default(["/var/lib/piccolo/data"]),
    /** D-Bus system bus address (unix:path=…). */
    systemBusAddress: z
      .string()
      .regex(/^unix:(path|abstract)=/, { message: 'expected a D-Bus address such as "unix:path=/run/dbus/system_bus_socket"' })
      .default("unix:path=/run/dbus/system_bus_socket"),
    /** TPM device nodes to look for, in order. */
    tpmDevices: z.array(absPath).default(["/dev/tpmrm0", "/dev/tpm0"]),
    /** os-release files to read, in order (Flatcar keeps its release in /usr/share/flatcar/release too). */
    osReleaseFiles: z.array(absPath).default(["/etc/os-release", "/usr/lib/os-release", "/usr/share/flatcar/release"]),
    /** mountinfo file used to find the boot disk. */
    mountInfoFile: absPath.default("/proc/self/mountinfo"),
    /** How long running operations get to stop on SIGTERM before they are journaled as interrupted. */
    shutdownGraceMs: z.number().int().min(0).max(600_000).default(5000),
    /** Finished operations kept; older ones are deleted with their journals. */
    operationRetention: z.number().int().min(10).max(100_000).default(500),
    /** Smallest interval between two journaled progress events of one operation. */
    progressIntervalMs: z.number().int().min(0).max(10_000).default(200),
    /**
     * The TPM for sealing and attestation, as systemd's --tpm2-device= takes it: "auto" (the first
     * of tpmDevices), a device path, or a TCTI such as "swtpm:host=127.0.0.1,port=2321" (tests).
     */
    tpm2Device: z.string().min(1).default("auto"),
    /** A folder on a tmpfs where a task run's agent secrets are written for its containers (removed after the run). */
    tasksSecretsDir: absPath.default("/run/piccolod/task-secrets"),
    /** Where CreateAgentService writes agent service units. */
    agentUnitDir: absPath.default("/etc/systemd/system"),
    /** The docker CLI agent service units run. */
    agentDockerCli: absPath.default("/usr/bin/docker"),
    /** Piccolo central's base URL for device registration and token refresh ("" until configured). */
    centralUrl: z
      .string()
      .refine((s) => s === "" || /^https?:\/\/[^\s/]+/.test(s), { message: 'expected an http(s) URL such as "https://central.example" or ""' })
      .default(""),
    /** How long after the device token's expiry the device keeps its standing while the central is unreachable. */
    trustOfflineGraceMs: z.number().int().min(0).max(30 * 86_400_000).default(86_400_000),
    /** First retry delay of the background token refresh after a failure (doubling each time). */
    trustRetryMinMs: z.number().int().min(100).max(86_400_000).default(5000),
    /** Largest retry delay of the background token refresh. */
    trustRetryMaxMs: z.number().int().min(100).max(86_400_000).default(600_000),
    /** Base URL of the Piccolo update server (GET /api/v1/updates/check, /api/v1/images/download/…). */
    updateServer: z.string().url().default("https://updates.piccolo.space"),
    /** Update channel (group) asked for. */
    updateChannel: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/).default("stable"),
    /**
     * Files holding the public keys that sign Piccolo's update payloads and install images: armored
     * (gpg --armor --export) or binary keyrings (gpg --export). The updater and the installer both
     * check against them (SetUpdateConfig's signing_keys replace them at run time).
     */
    signingKeyFiles: z.array(absPath).default(["/usr/share/piccolod/signing-keys.asc"]),
    /** Deprecated: the old name of signingKeyFiles (updater only); still read, with a warning. */
    updateSigningKeyFiles: z.array(absPath).optional(),
    /** update_engine's configuration file, whose SERVER= piccolod points at itself during an update. */
    updateConfFile: absPath.default("/etc/flatcar/update.conf"),
    /** The boot disk with USR-A/USR-B; "" finds it from mountInfoFile. */
    updateDisk: z.string().refine((s) => s === "" || isAbsolute(s), { message: 'expected an absolute path or ""' }).default(""),
    /** The kernel command line, which names the booted USR partition. */
    kernelCmdlineFile: absPath.default("/proc/cmdline"),
    /** Download attempts after the first for an update payload. */
    updateDownloadRetries: z.number().int().min(0).max(20).default(4),
    /** How long update_engine may report no change before an update fails. */
    updateEngineStallMs: z.number().int().min(1000).max(3_600_000).default(120_000),
    /** Installer: folders install images may come from; the first is the live medium's image folder. */
    installerImageDirs: z.array(absPath).default(["/run/piccolo/live/images"]),
    /** Installer: folders whose image files may be install targets (VM images, tests); empty allows block devices only. */
    installerFileTargetDirs: z.array(absPath).default([]),
    /** Deprecated: the installer's keyrings before signingKeyFiles; still read, with a warning. */
    installerKeyrings: z.array(absPath).optional(),
    /** Installer: smallest disk offered as a target, in bytes (Flatcar needs about 8 GiB). */
    installerMinDiskBytes: z.number().int().min(0).default(8 * 1024 ** 3),
    /**
     * How the API's private keys (token signing, TLS) are kept: "sealed" with systemd-creds (the
     * TPM, or the host key without one), or "file" (mode 0600, for a daemon that cannot seal).
     */
    keyProtection: z.enum(["sealed", "file"]).default("sealed"),
    /** Extra DNS names and IP addresses for the self-signed TLS certificate. */
    tlsAltNames: z.array(z.string().regex(/^[A-Za-z0-9.:*-]+$/, { message: "expected a DNS name or an IP address" })).default([]),
    /** Development only: TCP listeners speak plaintext instead of TLS. Refused unless they are on loopback. */
    insecurePlaintext: z.boolean().default(false),
    /** Development only: TCP callers need no token (everyone is ADMIN). Refused unless the listeners are on loopback. */
    authDisabled: z.boolean().default(false),
    /** Longest lifetime of a token, in seconds. */
    tokenMaxTtlSeconds: z.number().int().min(1).max(10 * 366 * 86400).default(90 * 86400),
    /** Lifetime of a Login token when the request gives none, in seconds. */
    loginTokenTtlSeconds: z.number().int().min(1).max(10 * 366 * 86400).default(3600),
    /** Wrong passwords in a row that lock a user. */
    loginMaxFailures: z.number().int().min(1).max(1000).default(10),
    /** How long a locked user stays locked, in seconds. */
    loginLockSeconds: z.number().int().min(1).max(30 * 86400).default(900),
    /** Free space (in percent of a filesystem's size) under which a storage alert is raised. */
    storageAlertThresholdPercent: z.number().min(0).max(100).default(10),
    /** Time between two looks at the filesystems while someone watches storage alerts. */
    storageAlertIntervalMs: z.number().int().min(100).max(3_600_000).default(60_000),
    /** Network namespace the network area reads and checks ("" for the daemon's own); for tests and containers. */
    networkNamespace: z.string().regex(/^[A-Za-z0-9_.-]{0,64}$/, { message: "expected a network namespace name" }).default(""),
    /** Folder piccolod writes its systemd-networkd .network files into. */
    networkConfigDir: absPath.default("/etc/systemd/network"),
    /** Command that makes systemd-networkd pick up changed files; empty for none. */
    networkReloadCommand: z.array(z.string().min(1)).default(["networkctl", "reload"]),
    /** Command that makes systemd-networkd apply the files to the named interfaces now (names appended); empty for none. */
    networkReconfigureCommand: z.array(z.string().min(1)).default(["networkctl", "reconfigure"]),
    /** The static host name file SetHostname writes. */
    hostnameFile: absPath.default("/etc/hostname"),
    /**
     * Command that sets the host name (the name is appended); empty for none. hostnamectl asks
     * systemd-hostnamed, which works from piccolod's unit (ProtectHostname= gives the daemon a
     * UTS namespace of its own, where `hostname` would change nothing the host sees).
     */
    hostnameCommand: z.array(z.string().min(1)).default(["hostnamectl", "set-hostname"]),
    /**
     * Folders a local backup repository may be in (each folder and what is below it): the places
     * backup drives are mounted. A REST server location is not limited by this.
     */
    backupRepositoryRoots: z.array(absPath).default(["/var/lib/piccolo/backup", "/media", "/mnt", "/run/media"]),
    /** The restic binary backups run. */
    resticBin: z.string().min(1).default("restic"),
  })
  .strict();

/** The validated configuration with every default and derived path filled in. */
export type Config = Omit<z.infer<typeof ConfigSchema>, "socketPath" | "auditLog" | DeprecatedKey> & {
  socketPath: string;
  auditLog: string;
  /** Deprecated keys the configuration used, each with what to use instead (the daemon logs them). */
  deprecatedKeys: string[];
};

/** Old keys still accepted, and the key that replaced each. */
const DEPRECATED = { updateSigningKeyFiles: "signingKeyFiles", installerKeyrings: "signingKeyFiles" } as const;
type DeprecatedKey = keyof typeof DEPRECATED;

/** A configuration that failed validation; the message lists every bad key. */
export class ConfigError extends Error {
  override readonly name = "ConfigError";
}

type Origin = string;

const KEYS = Object.keys(ConfigSchema.shape) as (keyof z.infer<typeof ConfigSchema>)[];
const envName = (k: string): string => "PICCOLOD_" + k.replace(/[A-Z]/g, (c) => "_" + c).toUpperCase();
const flagName = (k: string): string => k.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());

/** The base type name of a schema entry ("array", "number", …), below default/optional wrappers. */
function baseType(t: z.ZodType): string {
  let def = t.def as { type: string; innerType?: z.ZodType };
  while ((def.type === "default" || def.type === "optional" || def.type === "nullable") && def.innerType) {
    def = def.innerType.def as typeof def;
  }
  return def.type;
}
/** Keys whose environment/flag text is split on commas, parsed as a number, or as a boolean. */
const ARRAY_KEYS = new Set<string>(KEYS.filter((k) => baseType(ConfigSchema.shape[k]) === "array"));
const NUMBER_KEYS = new Set<string>(KEYS.filter((k) => baseType(ConfigSchema.shape[k]) === "number"));
const BOOLEAN_KEYS = new Set<string>(KEYS.filter((k) => baseType(ConfigSchema.shape[k]) === "boolean"));

/** Parses "host:port" / "[v6]:port"; undefined when malformed. */
export function parseListen(s: string): { host: string; port: number } | undefined {
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\s[\]]*)):(\d{1,5})$/.exec(s);
  if (!m) return undefined;
  const port = Number(m[3]);
  if (port > 65535) return undefined;
  return { host: m[1] ?? (m[2] || "0.0.0.0"), port };
}

function coerce(key: string, raw: string): unknown {
  if (ARRAY_KEYS.has(key)) return raw.split(",").filter((s) => s !== "");
  if (NUMBER_KEYS.has(key)) return raw.trim() === "" || Number.isNaN(Number(raw)) ? raw : Number(raw);
  if (BOOLEAN_KEYS.has(key)) return raw === "true" || raw === "1" ? true : raw === "false" || raw === "0" ? false : raw;
  return raw;
}

/** Sources for loadConfig; each defaults to the process's own. */
export interface ConfigSources {
  readonly argv?: readonly string[];
  readonly env?: Readonly<Record<string, string | undefined>>;
  /** Config file to read when neither --config nor PICCOLOD_CONFIG names one (read only if it exists). */
  readonly defaultFile?: string;
}

/** Builds the configuration from file, environment and flags; throws ConfigError naming each bad key. */
export function loadConfig(sources: ConfigSources = {}): Config {
  const argv = sources.argv ?? process.argv.slice(2);
  const env = sources.env ?? process.env;
  const raw: Record<string, unknown> = {};
  const origin: Record<string, Origin> = {};
  const problems: string[] = [];

  // Flags first, so --config is known before reading the file.
  const flags: Record<string, string> = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (!a.startsWith("--")) {
      problems.push(`unexpected argument ${JSON.stringify(a)}`);
      continue;
    }
    const eq = a.indexOf("=");
    const name = eq >= 0 ? a.slice(2, eq) : a.slice(2);
    const value = eq >= 0 ? a.slice(eq + 1) : argv[i + 1];
    if (eq < 0) i++;
    if (value === undefined) {
      problems.push(`flag --${name} needs a value`);
      continue;
    }
    flags[name] = value;
  }

  const file = flags["config"] ?? env["PICCOLOD_CONFIG"] ?? sources.defaultFile;
  const explicitFile = flags["config"] !== undefined || env["PICCOLOD_CONFIG"] !== undefined;
  if (file) {
    let text: string | undefined;
    try {
      text = readFileSync(file, "utf8");
    } catch (e) {
      if (explicitFile || (e as NodeJS.ErrnoException).code !== "ENOENT") {
        problems.push(`config file ${file}: ${(e as Error).message}`);
      }
    }
    if (text !== undefined) {
      try {
        const parsed: unknown = JSON.parse(text);
        if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
          problems.push(`config file ${file}: expected a JSON object`);
        } else {
          for (const [k, v] of Object.entries(parsed)) {
            raw[k] = v;
            origin[k] = `file ${file}`;
          }
        }
      } catch (e) {
        problems.push(`config file ${file}: not valid JSON (${(e as Error).message})`);
      }
    }
  }
  for (const k of KEYS) {
    const v = env[envName(k)];
    if (v !== undefined) {
      raw[k] = coerce(k, v);
      origin[k] = `env ${envName(k)}`;
    }
  }
  const byFlag = new Map(KEYS.map((k) => [flagName(k), k] as const));
  for (const [name, value] of Object.entries(flags)) {
    if (name === "config") continue;
    const k = byFlag.get(name);
    if (!k) {
      problems.push(`unknown flag --${name}`);
      continue;
    }
    raw[k] = coerce(k, value);
    origin[k] = `flag --${name}`;
  }

  const result = ConfigSchema.safeParse(raw);
  if (!result.success) {
    for (const issue of result.error.issues) {
      const key = issue.path.length > 0 ? String(issue.path[0]) : "";
      const where = origin[key] ? ` (from ${origin[key]})` : "";
      if (issue.code === "unrecognized_keys") {
        for (const k of issue.keys) problems.push(`unknown key ${k}${origin[k] ? ` (from ${origin[k]})` : ""}`);
      } else {
        problems.push(`${issue.path.join(".") || "(root)"}${where}: ${issue.message}`);
      }
    }
  }
  if (result.success) {
    // The development switches are refused beyond loopback: there they would hand the host to anyone.
    for (const k of ["insecurePlaintext", "authDisabled"] as const) {
      if (!result.data[k]) continue;
      for (const l of [result.data.grpcListen, result.data.restListen]) {
        const host = l ? parseListen(l)?.host : undefined;
        if (host !== undefined && !["127.0.0.1", "::1", "localhost"].includes(host)) {
          problems.push(`${k}${origin[k] ? ` (from ${origin[k]})` : ""}: only allowed while grpcListen and restListen are on loopback; ${l} is not`);
        }
      }
    }
  }
  if (problems.length > 0 || !result.success) {
    throw new ConfigError(`invalid configuration:\n  - ${problems.join("\n  - ")}`);
  }
  const { updateSigningKeyFiles, installerKeyrings, ...c } = result.data;
  // The two old key lists became one: their files are read as signingKeyFiles unless that is set too.
  const deprecatedKeys: string[] = [];
  const old: string[] = [];
  for (const [k, v] of [["updateSigningKeyFiles", updateSigningKeyFiles], ["installerKeyrings", installerKeyrings]] as const) {
    if (v === undefined) continue;
    const replaced = origin["signingKeyFiles"] !== undefined;
    deprecatedKeys.push(`${k} (from ${origin[k]}) is deprecated: use ${DEPRECATED[k]}${replaced ? ", which is also set and wins" : "; its files are read as signingKeyFiles"}`);
    if (!replaced) old.push(...v);
  }
  return {
    ...c,
    signingKeyFiles: old.length > 0 ? [...new Set(old)] : c.signingKeyFiles,
    socketPath: c.socketPath ?? join(c.runtimeDir, "piccolod.sock"),
    auditLog: c.auditLog ?? join(c.stateDir, "audit.log"),
    deprecatedKeys,
  };
}
