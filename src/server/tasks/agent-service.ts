/**
 * Agent services: a systemd unit per long-running agent container (the seed's build_service.sh).
 * The unit runs the agent with the docker CLI as a transient DynamicUser= that may only reach
 * the engine's socket, loads each API key with LoadCredentialEncrypted= (systemd decrypts it
 * into the unit's credentials folder, a memory filesystem only the unit sees) and mounts each
 * one read-only into the container as a file. Reload, enable and start go through systemd's
 * D-Bus API (org.freedesktop.systemd1.Manager).
 */
import { chmod, mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import dbus from "dbus-next";
import type { AgentService, CreateAgentServiceRequest } from "../../../gen/piccolo/tasks/v1/tasks.js";
import type { ContainerManager } from "../containers/manager.js";
import { checkHostPath } from "../containers/spec.js";
import { invalidArgument, PiccoloError } from "../errors.js";
import { CredentialStore } from "../trust/credentials.js";
import { agentCommand } from "./planner.js";
import { checkProfile } from "./runner.js";

/** What CreateAgentService needs. */
export interface AgentServiceDeps {
  readonly containers: ContainerManager;
  readonly credentials: Pick<CredentialStore, "has" | "dir">;
  /** Folder the unit files are written to (/etc/systemd/system on a host). */
  readonly unitDir: string;
  /** The docker CLI the unit runs. */
  readonly dockerCli: string;
  /** The engine socket the CLI talks to. */
  readonly dockerSocket: string;
  /** The system bus address systemd listens on. */
  readonly systemBusAddress: string;
}

const SERVICE_NAME = /^[a-z0-9][a-z0-9-]{1,47}$/;

/** The unit name of an agent service. */
export const unitName = (name: string): string => `piccolo-agent-${name}.service`;

/** Quotes one word for a unit's Exec line (systemd's C-style quoting; "%" and "$" escaped). */
export function quoteExecWord(word: string, keepSpecifiers = false): string {
  const escaped = word
    .replace(/\\/g, "\\\\")
    .replace(/"/g, '\\"')
    .replace(/\n/g, "\\n")
    .replace(/\t/g, "\\t")
    .replace(/%/g, keepSpecifiers ? "%" : "%%")
    .replace(/\$/g, "$$$$");
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? escaped : `"${escaped}"`;
}

/** Everything a unit is made from, checked. */
export interface AgentUnitSpec {
  readonly name: string;
  readonly image: string;
  readonly command: readonly string[];
  readonly secrets: readonly string[];
  readonly credstore: string;
  readonly repository: string;
  readonly mountPath: string;
  readonly secretMountPath: string;
  readonly network: string;
  readonly cpus: number;
  readonly memoryBytes: number;
  readonly graceSeconds: number;
  readonly dockerCli: string;
  readonly dockerSocket: string;
}

/** Renders the unit file. */
export function renderAgentUnit(s: AgentUnitSpec): string {
  const container = `piccolo-agent-${s.name}`;
  const runArgs = [
    "run",
    "--rm",
    "--name", container,
    "--label", "space.piccolo.managed=true",
    "--label", `piccolo.agent-service=${s.name}`,
    "--network", s.network,
    "--security-opt", "no-new-privileges",
    ...(s.cpus > 0 ? ["--cpus", String(s.cpus)] : []),
    ...(s.memoryBytes > 0 ? ["--memory", String(s.memoryBytes)] : []),
    ...(s.repository ? ["--mount", `type=bind,source=${s.repository},target=${s.mountPath}`] : []),
    // %d is the unit's credentials folder: systemd decrypted the keys there, in memory.
    ...s.secrets.flatMap((n) => ["--mount", `type=bind,source=%d/${CredentialStore.credentialName(n)},target=${s.secretMountPath}/${n},readonly`]),
    "--env", `PICCOLO_SECRETS_DIR=${s.secretMountPath}`,
    "--env", `PICCOLO_WORKSPACE=${s.mountPath}`,
    s.image,
    ...s.command,
  ];
  // Only the secret mounts use a specifier (%d); everything else is taken literally.
  const secretMounts = new Set(s.secrets.map((n) => `type=bind,source=%d/${CredentialStore.credentialName(n)},target=${s.secretMountPath}/${n},readonly`));
  const exec = (args: readonly string[]): string =>
    [s.dockerCli, ...args].map((w, i) => (i === 0 ? w : quoteExecWord(w, secretMounts.has(w)))).join(" ");
  const execStart = exec(runArgs);
  return [
    "# Written by piccolod (CreateAgentService); replaced by the next call for this name. Do not edit.",
    "[Unit]",
    `Description=Piccolo agent service ${s.name}`,
    "Wants=docker.service",
    "After=docker.service network-online.target",
    "",
    "[Service]",
    "Type=exec",
    // A user made for the service alone, who may only reach the engine's socket.
    "DynamicUser=yes",
    "SupplementaryGroups=docker",
    // Only the service's own user and root are mapped; files of others appear as nobody.
    "PrivateUsers=yes",
    // The docker CLI reaches the engine over its unix socket, so no network is needed here; the
    // container's network is its own (--network).
    "PrivateNetwork=yes",
    "DevicePolicy=closed",
    "DeviceAllow=",
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "ProtectKernelTunables=yes",
    "ProtectKernelModules=yes",
    "ProtectKernelLogs=yes",
    "ProtectControlGroups=yes",
    "ProtectClock=yes",
    "ProtectHostname=yes",
    "RestrictNamespaces=yes",
    "RestrictRealtime=yes",
    "RestrictSUIDSGID=yes",
    "LockPersonality=yes",
    "MemoryDenyWriteExecute=yes",
    "SystemCallArchitectures=native",
    "CapabilityBoundingSet=",
    "RestrictAddressFamilies=AF_UNIX",
    "UMask=0077",
    `RuntimeDirectory=${container}`,
    `Environment=DOCKER_HOST=unix://${s.dockerSocket} DOCKER_CONFIG=%t/${container}`,
    ...s.secrets.map((n) => `LoadCredentialEncrypted=${CredentialStore.credentialName(n)}:${join(s.credstore, n)}`),
    `ExecStartPre=-${exec(["rm", "--force", container])}`,
    `ExecStart=${execStart}`,
    `ExecStop=${exec(["stop", "--time", String(s.graceSeconds), container])}`,
    `TimeoutStopSec=${s.graceSeconds + 30}`,
    "Restart=on-failure",
    "RestartSec=10s",
    "",
    "[Install]",
    "WantedBy=multi-user.target",
    "",
  ].join("\n");
}

/** The systemd manager calls CreateAgentService makes. */
export interface SystemdManager {
  reload(): Promise<void>;
  enableAndRestart(unit: string): Promise<void>;
}

/** systemd's manager over D-Bus at `address`; UNAVAILABLE naming systemd when it is not there. */
export function dbusSystemd(address: string): SystemdManager {
  const call = async <T>(f: (m: dbus.ClientInterface) => Promise<T>): Promise<T> => {
    const bus = dbus.sessionBus({ busAddress: address });
    const failed = new Promise<never>((_, reject) => bus.on("error", (e: Error) => reject(e)));
    failed.catch(() => undefined);
    try {
      const obj = await Promise.race([bus.getProxyObject("org.freedesktop.systemd1", "/org/freedesktop/systemd1"), failed]);
      return await Promise.race([f(obj.getInterface("org.freedesktop.systemd1.Manager")), failed]);
    } catch (e) {
      const name = (e as { type?: string; text?: string }).type ?? "";
      const what = name ? `${name}: ${(e as { text?: string }).text ?? ""}` : (e as Error).message;
      throw new PiccoloError("unavailable", `systemd (org.freedesktop.systemd1 on the system bus ${address}) is unavailable: ${what}`, { reason: "HOST_PART_UNAVAILABLE", cause: e });
    } finally {
      bus.disconnect();
    }
  };
  return {
    async reload() {
      await call((m) => m["Reload"]!() as Promise<void>);
    },
    async enableAndRestart(unit) {
      await call(async (m) => {
        await m["EnableUnitFiles"]!([unit], false, true);
        await m["Reload"]!();
        await m["RestartUnit"]!(unit, "replace");
      });
    },
  };
}

/** Checks a CreateAgentServiceRequest; returns the unit spec. Changes nothing. */
export async function checkAgentService(req: CreateAgentServiceRequest, deps: AgentServiceDeps, signal: AbortSignal): Promise<AgentUnitSpec> {
  if (req.name === "") throw invalidArgument("name", "is required");
  if (!SERVICE_NAME.test(req.name)) throw invalidArgument("name", `${JSON.stringify(req.name.slice(0, 64))} is not a service name (lowercase letters, digits and "-", 2 to 48 characters)`);
  const p = await checkProfile(req.profile, deps.containers, deps.credentials, signal);
  if (req.prompt.includes("\0")) throw invalidArgument("prompt", "must not contain NUL characters");
  const repository = req.repository === "" ? "" : await checkHostPath(req.repository, "repository", deps.containers.policy, "agent repositories");
  const profile = req.profile!;
  return {
    name: req.name,
    image: profile.image,
    command: agentCommand(p.command, req.prompt),
    secrets: profile.secrets,
    credstore: deps.credentials.dir,
    repository,
    mountPath: p.mountPath,
    secretMountPath: p.secretMountPath,
    network: p.network,
    cpus: profile.cpus,
    memoryBytes: profile.memoryBytes,
    graceSeconds: p.graceSeconds,
    dockerCli: deps.dockerCli,
    dockerSocket: deps.dockerSocket,
  };
}

/** Writes (or replaces) the unit and, unless write_only, reloads systemd and enables and starts it. */
export async function createAgentService(
  req: CreateAgentServiceRequest,
  deps: AgentServiceDeps,
  systemd: SystemdManager,
  signal: AbortSignal,
): Promise<AgentService> {
  const spec = await checkAgentService(req, deps, signal);
  const unit = unitName(spec.name);
  const text = renderAgentUnit(spec);
  const path = join(deps.unitDir, unit);
  const old = await readFile(path, "utf8").catch(() => undefined);
  await mkdir(deps.unitDir, { recursive: true, mode: 0o755 });
  const tmp = join(deps.unitDir, `.${unit}.${process.pid}.tmp`);
  await writeFile(tmp, text, { mode: 0o644 });
  // The mode must not depend on piccolod's umask (UMask=0077 in piccolod.service): a unit file
  // only root can read makes systemd warn that it is "marked world-inaccessible" on every
  // reload, and `systemctl cat` fails for everyone else.
  await chmod(tmp, 0o644);
  await rename(tmp, path);
  if (!req.writeOnly) {
    try {
      await systemd.enableAndRestart(unit);
    } catch (e) {
      // Leave the unit folder as it was.
      if (old === undefined) await rm(path, { force: true });
      else await writeFile(path, old, { mode: 0o644 });
      throw e instanceof PiccoloError ? new PiccoloError(e.kind, `${e.message}; ${path} was left as it was`, { cause: e, reason: e.reason }) : e;
    }
  }
  return { name: spec.name, unit, unitPath: path, unitText: text, replaced: old !== undefined, started: !req.writeOnly };
}
