/** piccoloctl's `storage …` commands: disks, filesystems, volumes, encryption and alerts. */
import { readFile } from "node:fs/promises";
import {
  GetEncryptionStatusResponse,
  ListDisksResponse,
  ListFilesystemsResponse,
  ListVolumesResponse,
  StorageAlert,
  StorageAlertState,
  Volume,
  type Disk,
} from "../../../gen/piccolo/storage/v1/storage.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatTime, jsonDocument, protoJson, table } from "./format.js";
import { formatBytes } from "./progress.js";

const T = "piccolo.storage.v1.";

/** Reads a secret from a file, or from stdin with "-" (never from the command line). */
export async function readSecret(path: string, flag: string): Promise<string> {
  try {
    if (path === "-") {
      const chunks: Buffer[] = [];
      for await (const c of process.stdin) chunks.push(c as Buffer);
      return Buffer.concat(chunks).toString("utf8").replace(/\r?\n$/, "");
    }
    return (await readFile(path, "utf8")).replace(/\r?\n$/, "");
  } catch (e) {
    throw new UsageError(`${flag} ${JSON.stringify(path)}: ${(e as Error).message}`);
  }
}

const diskRows = (ds: readonly Disk[], depth: number): string[][] =>
  ds.flatMap((d) => [
    [`${"  ".repeat(depth)}${d.name}`, d.type, formatBytes(d.sizeBytes), d.fsType || "-", d.partitionLabel || d.label || "-", d.mountPoints.join(",") || "-"],
    ...diskRows(d.children, depth + 1),
  ]);

/** `storage disks`. */
export async function storageDisksCommand(c: CommandContext): Promise<number> {
  const r = await c.api.storage.listDisks({});
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}ListDisksResponse`, ListDisksResponse, r) : table([["NAME", "TYPE", "SIZE", "FSTYPE", "LABEL", "MOUNTED"], ...diskRows(r.disks, 0)]));
  return 0;
}

/** `storage filesystems`. */
export async function storageFilesystemsCommand(c: CommandContext): Promise<number> {
  const r = await c.api.storage.listFilesystems({});
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}ListFilesystemsResponse`, ListFilesystemsResponse, r));
  else {
    const rows = r.filesystems.map((f) => [
      f.mountPoint,
      f.type,
      formatBytes(f.sizeBytes),
      formatBytes(f.usedBytes),
      formatBytes(f.availableBytes),
      `${f.sizeBytes ? Math.round((f.usedBytes / Math.max(1, f.usedBytes + f.availableBytes)) * 100) : 0}%`,
      f.source,
    ]);
    c.stdout.write(table([["MOUNTED ON", "TYPE", "SIZE", "USED", "AVAIL", "USE%", "SOURCE"], ...rows]));
  }
  return 0;
}

/** `storage volumes ls`. */
export async function storageVolumesListCommand(c: CommandContext, opts: { readonly all?: boolean }): Promise<number> {
  const r = await c.api.storage.listVolumes({ includeUnmanaged: opts.all === true });
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}ListVolumesResponse`, ListVolumesResponse, r));
  else c.stdout.write(table([["NAME", "MANAGED", "CREATED", "CONTAINERS", "MOUNT POINT"], ...r.volumes.map((v) => [v.name, v.managed ? "yes" : "no", formatTime(v.createTime), v.containers.join(",") || "-", v.mountPoint])]));
  return 0;
}

/** `storage volumes create NAME`. */
export async function storageVolumesCreateCommand(c: CommandContext, name: string, labels: Record<string, string>): Promise<number> {
  const v = await c.api.storage.createVolume({ name, labels });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}Volume`, Volume, v) : `${v.name}\t${v.mountPoint}\n`);
  return 0;
}

/** `storage volumes rm NAME`. */
export async function storageVolumesRemoveCommand(c: CommandContext, name: string): Promise<number> {
  const r = await c.api.storage.deleteVolume({ name });
  c.stdout.write(c.global.output === "json" ? `${JSON.stringify({ name: r.name })}\n` : `${r.name}\n`);
  return 0;
}

/** `storage encryption status [DEVICE…]`. */
export async function storageEncryptionStatusCommand(c: CommandContext, devices: string[]): Promise<number> {
  const r = await c.api.storage.getEncryptionStatus({ devices });
  if (c.global.output === "json") {
    c.stdout.write(jsonDocument(`${T}GetEncryptionStatusResponse`, GetEncryptionStatusResponse, r));
    return 0;
  }
  if (r.devices.length === 0) c.stdout.write("no LUKS devices\n");
  for (const d of r.devices) {
    c.stdout.write(`${d.path}  LUKS${d.version}  ${d.cipher}  uuid ${d.uuid}\n`);
    c.stdout.write(`  tpm2: ${d.tpm2Enrolled ? "enrolled" : "no"}   recovery key: ${d.recoveryKeyPresent ? "yes" : "no"}\n`);
    const rows = d.tokens.map((t) => [`token ${t.id}`, t.type, `slots ${t.keyslots.join(",")}`, t.tpm2Pcrs.length ? `pcrs ${t.tpm2Pcrs.join("+")} (${t.tpm2PcrBank})` : ""]);
    rows.push(...d.keyslots.map((k) => [`slot ${k.id}`, k.type, k.kdf, k.priority]));
    c.stdout.write(table(rows).replace(/^/gm, "  "));
  }
  return 0;
}

/** `storage encryption reseal DEVICE`. */
export async function storageEncryptionResealCommand(
  c: CommandContext,
  device: string,
  opts: { readonly pcrs?: string; readonly keyFile?: string; readonly keyCredential?: string; readonly detach?: boolean },
): Promise<number> {
  if ((opts.keyFile === undefined) === (opts.keyCredential === undefined)) throw new UsageError("give one of --key-file (a file, or - for stdin) and --key-credential");
  const pcrs = (opts.pcrs ?? "7").split(/[+,]/).map((p) => {
    if (!/^\d{1,2}$/.test(p)) throw new UsageError(`--pcrs ${JSON.stringify(opts.pcrs)}: expected PCR numbers such as 7 or 0+7`);
    return Number(p);
  });
  const key = opts.keyFile !== undefined ? await readSecret(opts.keyFile, "--key-file") : "";
  return followOperation({
    ...followOptionsFrom(c),
    first: (s) => c.api.storage.resealEncryption({ device, key, keyCredential: opts.keyCredential ?? "", pcrs }, s),
    detach: opts.detach === true,
  });
}

/** `storage alerts`: streams low-space alerts until Ctrl-C. */
export async function storageAlertsCommand(c: CommandContext): Promise<number> {
  try {
    for await (const a of c.api.storage.watchAlerts({}, c.signal)) {
      if (c.global.output === "json") c.stdout.write(`${JSON.stringify(protoJson(`${T}StorageAlert`, StorageAlert, a))}\n`);
      else c.stdout.write(`${formatTime(a.time)}  ${(StorageAlertState[a.state] ?? "").replace("STORAGE_ALERT_STATE_", "").padEnd(7)}  ${a.message}\n`);
    }
  } catch (e) {
    if (!c.signal.aborted) throw e;
  }
  return 0;
}
