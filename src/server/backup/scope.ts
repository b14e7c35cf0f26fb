/**
 * What a backup scope means on disk: the folders restic backs up for each part (piccolod's state
 * folder, the sealed secrets, app volumes), the tags that record the parts in a snapshot, and the
 * check that a snapshot holds nothing outside those folders before anything of it is restored.
 */
import { isAbsolute, join, posix } from "node:path";
import type { BackupScope } from "../../../gen/piccolo/backup/v1/backup.js";

/** Tag on every snapshot piccolod makes. */
export const PICCOLOD_TAG = "piccolod";
/** Tag of the state part. */
export const STATE_TAG = "scope:state";
/** Tag of the sealed-secrets part. */
export const CREDENTIALS_TAG = "scope:credentials";
/** Tag prefix of a volume part. */
export const VOLUME_TAG_PREFIX = "volume:";

/** Where the parts live on this host. */
export interface ScopeRoots {
  readonly stateDir: string;
  /** The sealed-secret folder and the folder of its metadata. */
  readonly credentialDirs: readonly string[];
}

/** Names in the state folder that are never backed up or restored as state. */
export function stateExcludedNames(roots: ScopeRoots, withCredentials: boolean): string[] {
  // Operation journals are the daemon's own running history; the backup folder holds the restic
  // cache and the quiesce journals. The sealed secrets are their own part.
  // The audit log is append-only: a restore must never roll it back.
  const names = ["operations", "backup", "audit.log"];
  if (!withCredentials) {
    for (const d of roots.credentialDirs) if (posix.dirname(d) === roots.stateDir) names.push(posix.basename(d));
  }
  return names;
}

/** One folder in a backup or restore, and which part it belongs to. */
export interface ScopeItem {
  readonly part: "state" | "credentials" | "volume";
  /** Volume name for a volume part. */
  readonly volume?: string;
  /** Absolute folder on this host. */
  readonly path: string;
}

/** Scope parts recorded in a snapshot's tags. */
export function scopeFromTags(tags: readonly string[]): BackupScope {
  return {
    state: tags.includes(STATE_TAG),
    credentials: tags.includes(CREDENTIALS_TAG),
    volumes: tags.filter((t) => t.startsWith(VOLUME_TAG_PREFIX)).map((t) => t.slice(VOLUME_TAG_PREFIX.length)).sort(),
    allVolumes: false,
  };
}

/** The tags of a snapshot holding these items. */
export function tagsFor(items: readonly ScopeItem[], extra: readonly string[]): string[] {
  const tags = new Set<string>([PICCOLOD_TAG]);
  for (const i of items) {
    if (i.part === "state") tags.add(STATE_TAG);
    else if (i.part === "credentials") tags.add(CREDENTIALS_TAG);
    else tags.add(`${VOLUME_TAG_PREFIX}${i.volume}`);
  }
  for (const t of extra) tags.add(t);
  return [...tags];
}

/** Whether `path` is `root` or below it. */
export function within(path: string, root: string): boolean {
  const p = posix.normalize(path).replace(/\/+$/, "");
  const r = posix.normalize(root).replace(/\/+$/, "");
  return p === r || p.startsWith(r + "/");
}

/**
 * Maps each path of a snapshot to the part it belongs to, or says which path lies outside every
 * part's folder. `volumeDirs` maps volume names tagged in the snapshot to the folders they may
 * have been backed up from (the volume's mount point now, or any ".../<name>/_data").
 */
export function classifySnapshotPaths(
  paths: readonly string[],
  tags: readonly string[],
  roots: ScopeRoots,
  volumeMountPoints: ReadonlyMap<string, string>,
): { items: ScopeItem[]; outside: string[] } {
  const scope = scopeFromTags(tags);
  const items: ScopeItem[] = [];
  const outside: string[] = [];
  for (const raw of paths) {
    const p = posix.normalize(raw);
    if (!isAbsolute(p) || p.split("/").includes("..")) {
      outside.push(raw);
      continue;
    }
    if (scope.state && p === roots.stateDir) {
      items.push({ part: "state", path: p });
      continue;
    }
    const cred = roots.credentialDirs.find((d) => d === p);
    if (cred && scope.credentials) {
      items.push({ part: "credentials", path: p });
      continue;
    }
    const vol = scope.volumes.find((v) => volumeMountPoints.get(v) === p || p.endsWith(`/${v}/_data`));
    if (vol !== undefined) {
      items.push({ part: "volume", volume: vol, path: p });
      continue;
    }
    outside.push(raw);
  }
  return { items, outside };
}

/** The staging folder a restore of one part writes into: inside the part's own folder. */
export function stagingDir(dest: string, opId: string): string {
  return join(dest, `.piccolo-restore-${opId}`);
}
