/** piccoloctl's `backup …` commands; backups, restores, checks and forgets follow their operation with progress. */
import { ListSnapshotsResponse, QuiesceMode, Repository, type BackupScope } from "../../../gen/piccolo/backup/v1/backup.js";
import type { CommandContext } from "./context.js";
import { UsageError } from "./errors.js";
import { followOperation, followOptionsFrom } from "./follow-operation.js";
import { formatTime, jsonDocument, table } from "./format.js";
import { readSecret } from "./storage.js";

const T = "piccolo.backup.v1.";

/** Scope flags shared by create and restore. */
export interface ScopeOptions {
  readonly state?: boolean;
  readonly credentials?: boolean;
  readonly volume?: string[];
  readonly allVolumes?: boolean;
}

const scopeFrom = (o: ScopeOptions): BackupScope => {
  const s = { state: o.state === true, credentials: o.credentials === true, volumes: o.volume ?? [], allVolumes: o.allVolumes === true };
  if (!s.state && !s.credentials && !s.allVolumes && s.volumes.length === 0) throw new UsageError("name what to cover: --state, --credentials, --volume NAME or --all-volumes");
  return s;
};

/** `backup repo`. */
export async function backupRepoCommand(c: CommandContext): Promise<number> {
  const r = await c.api.backup.getRepository({});
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}Repository`, Repository, r) : r.configured ? `${r.location}  id ${r.id}  password sealed with ${r.sealedWith} (${r.passwordCredential})\n` : "no repository set up (piccoloctl backup init LOCATION)\n");
  return 0;
}

/** `backup init LOCATION`. */
export async function backupInitCommand(c: CommandContext, location: string, opts: { readonly existing?: boolean; readonly passwordFile?: string }): Promise<number> {
  if (opts.existing && opts.passwordFile === undefined) throw new UsageError("--existing needs --password-file (a file, or - for stdin)");
  const password = opts.passwordFile !== undefined ? await readSecret(opts.passwordFile, "--password-file") : "";
  const r = await c.api.backup.initRepository({ location, existing: opts.existing === true, password });
  c.stdout.write(c.global.output === "json" ? jsonDocument(`${T}Repository`, Repository, r) : `repository ${r.id} at ${r.location}; password sealed with ${r.sealedWith}\n`);
  return 0;
}

const QUIESCE: Readonly<Record<string, QuiesceMode>> = { stop: QuiesceMode.QUIESCE_MODE_STOP, pause: QuiesceMode.QUIESCE_MODE_PAUSE, none: QuiesceMode.QUIESCE_MODE_NONE };

/** `backup create`. */
export function backupCreateCommand(c: CommandContext, opts: ScopeOptions & { readonly quiesce?: string; readonly tag?: string[]; readonly detach?: boolean }): Promise<number> {
  const quiesce = QUIESCE[opts.quiesce ?? "stop"];
  if (quiesce === undefined) throw new UsageError(`--quiesce ${JSON.stringify(opts.quiesce)}: expected stop, pause or none`);
  const scope = scopeFrom(opts);
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.backup.createBackup({ scope, quiesce, tags: opts.tag ?? [] }, s), detach: opts.detach === true });
}

/** `backup snapshots`. */
export async function backupSnapshotsCommand(c: CommandContext): Promise<number> {
  const r = await c.api.backup.listSnapshots({});
  if (c.global.output === "json") c.stdout.write(jsonDocument(`${T}ListSnapshotsResponse`, ListSnapshotsResponse, r));
  else {
    const scope = (s: BackupScope | undefined): string => (s ? [s.state ? "state" : "", s.credentials ? "credentials" : "", ...s.volumes.map((v) => `volume:${v}`)].filter(Boolean).join(" ") : "(not piccolod's)");
    c.stdout.write(table([["ID", "TIME", "HOST", "SCOPE"], ...r.snapshots.map((s) => [s.shortId, formatTime(s.time), s.hostname, scope(s.scope)])]));
  }
  return 0;
}

/** `backup restore SNAPSHOT`. */
export function backupRestoreCommand(c: CommandContext, snapshotId: string, opts: ScopeOptions & { readonly detach?: boolean }): Promise<number> {
  const scope = scopeFrom(opts);
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.backup.restoreBackup({ snapshotId, scope }, s), detach: opts.detach === true });
}

/** `backup verify`. */
export function backupVerifyCommand(c: CommandContext, opts: { readonly readData?: number; readonly detach?: boolean }): Promise<number> {
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.backup.verifyBackup({ readDataPercent: opts.readData ?? 0 }, s), detach: opts.detach === true });
}

/** `backup forget`. */
export function backupForgetCommand(
  c: CommandContext,
  opts: { readonly keepLast?: number; readonly keepDaily?: number; readonly keepWeekly?: number; readonly keepMonthly?: number; readonly prune?: boolean; readonly detach?: boolean },
): Promise<number> {
  const req = { keepLast: opts.keepLast ?? 0, keepDaily: opts.keepDaily ?? 0, keepWeekly: opts.keepWeekly ?? 0, keepMonthly: opts.keepMonthly ?? 0, prune: opts.prune === true };
  if (!req.keepLast && !req.keepDaily && !req.keepWeekly && !req.keepMonthly) throw new UsageError("give a keep policy: --keep-last, --keep-daily, --keep-weekly or --keep-monthly");
  return followOperation({ ...followOptionsFrom(c), first: (s) => c.api.backup.forgetSnapshots(req, s), detach: opts.detach === true });
}
