/**
 * `piccoloctl install disks|plan|run`: the installer from the command line (an image on the host,
 * the live medium's, or `--version V` from the update server). `run` plans first,
 * shows what will be erased, asks for confirmation (skipped with --yes), then follows the install
 * with a live progress bar (MiB/s, ETA). The recovery key of an encrypted install is printed once
 * at the end: it exists nowhere else.
 */
import { readFile } from "node:fs/promises";
import { createInterface } from "node:readline";
import {
  Encryption,
  GetInstallEnvironmentResponse,
  InstallPlan,
  InstallRequest,
  InstallResult,
  ListTargetDisksResponse,
  Transport,
  type Disk,
  type InstallSpec,
  type PlanInstallRequest,
} from "../../../gen/piccolo/installer/v1/installer.js";
import type { OperationEvent } from "../../../gen/piccolo/operations/v1/operations.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { jsonDocument, table } from "./format.js";
import { formatBytes } from "./progress.js";

/** The InstallerService calls the CLI makes, over either transport. */
interface InstallerApi {
  environment(): Promise<GetInstallEnvironmentResponse>;
  disks(): Promise<ListTargetDisksResponse>;
  plan(r: PlanInstallRequest): Promise<InstallPlan>;
  install(r: InstallRequest, signal: AbortSignal): AsyncIterable<OperationEvent>;
  close(): void;
}

function installerApi(c: CommandContext): InstallerApi {
  // Through the command's connection, so the token and the pinned certificate apply.
  const i = c.api.installer;
  return {
    environment: () => i.getInstallEnvironment({}),
    disks: () => i.listTargetDisks({}),
    plan: (req) => i.planInstall(req),
    install: (req, signal) => i.install(req, signal),
    close: () => undefined,
  };
}

const TRANSPORTS: Record<number, string> = {
  [Transport.TRANSPORT_USB]: "usb",
  [Transport.TRANSPORT_NVME]: "nvme",
  [Transport.TRANSPORT_SATA]: "sata",
  [Transport.TRANSPORT_VIRTIO]: "virtio",
  [Transport.TRANSPORT_SCSI]: "scsi",
  [Transport.TRANSPORT_LOOP]: "loop",
  [Transport.TRANSPORT_OTHER]: "other",
};

/** Disks as a table: path, size, transport, model, and whether each may be installed to. */
export function formatDisks(disks: readonly Disk[]): string {
  if (disks.length === 0) return "no block devices\n";
  return table([
    ["DISK", "SIZE", "TRANSPORT", "MODEL", "PARTITIONS", "INSTALL"],
    ...disks.map((d) => [
      d.path,
      formatBytes(d.sizeBytes),
      TRANSPORTS[d.transport] ?? "-",
      d.model || "-",
      String(d.partitions.length),
      d.eligible ? "yes" : `no: ${d.ineligibleReasons.join("; ")}`,
    ]),
  ]);
}

/** A plan for people. */
export function formatPlan(p: InstallPlan): string {
  const lines = [
    `target:  ${p.target?.path ?? "?"} (${formatBytes(p.target?.sizeBytes ?? 0)}${p.target?.model ? `, ${p.target.model}` : ""})`,
    `image:   ${p.imagePath}${p.imageVersion ? ` (version ${p.imageVersion})` : ""}, ${p.compression}, ${formatBytes(p.imageBytes)} once decompressed`,
    ...(p.download
      ? [
          `download: ${p.download.url}, ${formatBytes(p.download.sizeBytes)}${p.download.cachedBytes > 0 ? ` (${formatBytes(p.download.cachedBytes)} already downloaded${p.download.cachedBytes === p.download.sizeBytes ? ", only checked" : ", resumed"})` : ""}`,
          `          SHA-256 ${p.download.sha256}`,
        ]
      : []),
    `ROOT:    grown to ${formatBytes(p.rootBytes)}`,
    "erased:",
    ...(p.erased.length === 0 ? ["  nothing (no partitions found)"] : p.erased.map((e) => `  ${e.path} ${e.label || e.fsLabel || "-"} ${e.fsType || ""} ${formatBytes(e.sizeBytes)}`.trimEnd())),
    "writes, in order:",
    ...p.writes.map((w) => `  ${w.what}: ${formatBytes(w.length)} at byte ${w.offset}`),
    ...p.warnings.map((w) => `warning: ${w}`),
  ];
  return lines.join("\n") + "\n";
}

/** Options of `install plan` and `install run`. */
export interface InstallOptions {
  readonly image?: string;
  readonly live?: boolean;
  readonly version?: string;
  readonly sha256?: string;
  readonly signatureFile?: string;
  readonly ignition?: string;
  readonly hostname?: string;
  readonly sshKey?: readonly string[];
  readonly encryption?: string;
  readonly yes?: boolean;
}

async function specFrom(target: string, o: InstallOptions): Promise<InstallSpec> {
  if (!target.startsWith("/")) throw new UsageError(`TARGET ${JSON.stringify(target)}: must be an absolute device path such as /dev/sdb`);
  if ([o.image, o.live, o.version].filter((x) => x !== undefined && x !== false).length !== 1) {
    throw new UsageError("give exactly one of --image PATH, --live and --version V");
  }
  const enc = o.encryption ?? "none";
  if (enc !== "none" && enc !== "tpm2") throw new UsageError(`--encryption: "none" or "tpm2", not ${JSON.stringify(enc)}`);
  const readLocal = async (path: string, flag: string): Promise<string> => {
    try {
      return await readFile(path, "utf8");
    } catch (e) {
      throw new UsageError(`${flag} ${path}: ${(e as Error).message}`);
    }
  };
  return {
    target,
    imagePath: o.image,
    liveImage: o.live ? true : undefined,
    version: o.version,
    sha256: o.sha256 ?? "",
    signature: o.signatureFile ? await readLocal(o.signatureFile, "--signature-file") : "",
    ignitionConfig: o.ignition ? await readLocal(o.ignition, "--ignition") : "",
    ignitionSettings: { hostname: o.hostname ?? "", sshAuthorizedKeys: [...(o.sshKey ?? [])] },
    encryption: enc === "tpm2" ? Encryption.ENCRYPTION_TPM2 : Encryption.ENCRYPTION_NONE,
  };
}

async function withApi<T>(c: CommandContext, f: (a: InstallerApi) => Promise<T>): Promise<T> {
  const a = installerApi(c);
  try {
    return await f(a);
  } finally {
    a.close();
  }
}

/** `install env`. */
export function installEnvCommand(c: CommandContext): Promise<number> {
  return withApi(c, async (a) => {
    const e = await a.environment();
    if (c.global.output === "json") c.stdout.write(jsonDocument("piccolo.installer.v1.GetInstallEnvironmentResponse", GetInstallEnvironmentResponse, e));
    else {
      c.stdout.write(`live environment: ${e.live ? "yes" : "no"}\nboot disk: ${e.bootDisk || "unknown"}\n`);
      c.stdout.write(e.images.length === 0 ? "no install image on the live medium\n" : table([["IMAGE", "VERSION", "SIZE", "SIGNED"], ...e.images.map((i) => [i.path, i.version, formatBytes(i.sizeBytes), i.signed ? "yes" : "no"])]));
    }
    return 0;
  });
}

/** `install disks`. */
export function installDisksCommand(c: CommandContext): Promise<number> {
  return withApi(c, async (a) => {
    const r = await a.disks();
    c.stdout.write(c.global.output === "json" ? jsonDocument("piccolo.installer.v1.ListTargetDisksResponse", ListTargetDisksResponse, r) : formatDisks(r.disks));
    return 0;
  });
}

/** `install plan TARGET`. */
export async function installPlanCommand(c: CommandContext, target: string, o: InstallOptions): Promise<number> {
  const spec = await specFrom(target, o);
  return withApi(c, async (a) => {
    const p = await a.plan({ spec });
    c.stdout.write(c.global.output === "json" ? jsonDocument("piccolo.installer.v1.InstallPlan", InstallPlan, p) : `${formatPlan(p)}confirmation token: ${p.confirmationToken}\n`);
    return 0;
  });
}

/** Reads one line from stdin (the confirmation); "" when stdin ends first. */
function askLine(c: CommandContext, question: string): Promise<string> {
  c.stderr.write(question);
  return new Promise((resolve) => {
    const rl = createInterface({ input: process.stdin, terminal: false });
    let answered = false;
    rl.once("line", (l) => {
      answered = true;
      rl.close();
      resolve(l.trim());
    });
    rl.once("close", () => {
      if (!answered) resolve("");
    });
    c.signal.addEventListener("abort", () => rl.close(), { once: true });
  });
}

/** `install run TARGET`: plan, confirm, install with a live progress bar. */
export async function installRunCommand(c: CommandContext, target: string, o: InstallOptions): Promise<number> {
  const spec = await specFrom(target, o);
  const a = installerApi(c);
  try {
    const plan = await a.plan({ spec });
    if (c.global.output !== "json") c.stderr.write(formatPlan(plan));
    if (!o.yes) {
      const answer = await askLine(c, `Erase ${target} and install? Type "yes" or the disk's path to go on: `);
      if (answer !== "yes" && answer !== target) {
        c.stderr.write("piccoloctl: not confirmed; nothing was written\n");
        return 1;
      }
    }
    let key = "";
    const code = await followOperation({
      ...followOptionsFrom(c),
      first: (s) =>
        (async function* () {
          for await (const ev of a.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }), s)) {
            if (ev.outcome?.result?.typeUrl.endsWith("/piccolo.installer.v1.InstallResult")) {
              key = InstallResult.decode(ev.outcome.result.value).recoveryKey;
            }
            yield ev;
          }
        })(),
    });
    if (key && c.global.output !== "json") {
      c.stdout.write(`\nRECOVERY KEY (shown once, stored nowhere; write it down):\n  ${key}\n`);
    }
    return code;
  } finally {
    a.close();
  }
}
