/**
 * Pointing update_engine at piccolod's loopback Omaha server through SERVER= in update.conf, and
 * putting the file back byte for byte. Before the first change the original (its bytes, mode,
 * and whether it existed) is saved, fsync'd, in the state folder; every write is atomic (temp
 * file, fsync, rename); restore() puts the original back and removes the saved copy, and
 * restorePending() does the same at the next start when piccolod died in between.
 */
import { open, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";

/** The saved original. */
interface Backup {
  readonly path: string;
  readonly existed: boolean;
  readonly mode: number;
  /** base64 of the original bytes. */
  readonly content: string;
}

async function writeAtomic(path: string, data: Buffer | string, mode: number): Promise<void> {
  const tmp = join(dirname(path), `.${process.pid}.${Date.now()}.piccolod.tmp`);
  const fh = await open(tmp, "w", mode);
  try {
    await fh.writeFile(data);
    await fh.chmod(mode);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  const d = await open(dirname(path), "r");
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

/** Replaces (or appends) SERVER= in update.conf text, keeping every other line as it is. */
export function withServer(text: string, server: string): string {
  const lines = text === "" ? [] : text.replace(/\n$/, "").split("\n");
  let done = false;
  const out = lines.map((l) => {
    if (/^\s*SERVER\s*=/.test(l)) {
      if (done) return `# ${l} (piccolod: a later SERVER= would win)`;
      done = true;
      return `SERVER=${server}`;
    }
    return l;
  });
  if (!done) out.push(`SERVER=${server}`);
  return out.join("\n") + "\n";
}

/** update.conf with its saved original. */
export interface UpdateConf {
  /** Saves the original (once) and writes SERVER=`server` atomically. */
  pointAt(server: string): Promise<void>;
  /** Puts the original back (or removes a file that did not exist); false when nothing was saved. */
  restore(): Promise<boolean>;
  /** The keys in the file now. */
  read(): Promise<Record<string, string>>;
}

/** The update.conf at `path`, with its backup kept at `backupFile`. */
export function createUpdateConf(path: string, backupFile: string): UpdateConf {
  const loadBackup = async (): Promise<Backup | undefined> => {
    try {
      return JSON.parse(await readFile(backupFile, "utf8")) as Backup;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  };
  return {
    async pointAt(server) {
      let backup = await loadBackup();
      if (!backup) {
        let content = Buffer.alloc(0);
        let existed = true;
        let mode = 0o644;
        try {
          content = await readFile(path);
          mode = (await stat(path)).mode & 0o7777;
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
          existed = false;
        }
        backup = { path, existed, mode, content: content.toString("base64") };
        await writeAtomic(backupFile, JSON.stringify(backup) + "\n", 0o600);
      }
      await writeAtomic(path, withServer(Buffer.from(backup.content, "base64").toString("utf8"), server), backup.mode);
    },
    async restore() {
      const backup = await loadBackup();
      if (!backup) return false;
      if (backup.existed) await writeAtomic(backup.path, Buffer.from(backup.content, "base64"), backup.mode);
      else await rm(backup.path, { force: true });
      await rm(backupFile, { force: true });
      return true;
    },
    async read() {
      const out: Record<string, string> = {};
      const text = await readFile(path, "utf8").catch(() => "");
      for (const line of text.split("\n")) {
        const m = /^\s*([A-Z_]+)\s*=\s*(.*?)\s*$/.exec(line);
        if (m) out[m[1]!] = m[2]!;
      }
      return out;
    },
  };
}

/** Writes a file atomically (for the area's small state documents). */
export async function writeFileAtomic(path: string, text: string): Promise<void> {
  await writeAtomic(path, text, 0o600);
}

/** Reads a JSON document, or `fallback` when the file does not exist. */
export async function readJson<T>(path: string, fallback: T): Promise<T> {
  try {
    return JSON.parse(await readFile(path, "utf8")) as T;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return fallback;
    throw e;
  }
}

/** Creates an empty file (used to make sure a folder is writable). */
export async function touch(path: string): Promise<void> {
  await writeFile(path, "", { flag: "a" });
}
