/**
 * Operation journals: one append-only file per operation under <stateDir>/operations/. The first
 * line holds the Operation as created, each further line one OperationEvent, each as protobuf
 * binary in base64. Every append is fsync'd before the event is sent to anyone, so what a watcher
 * saw is always on disk. A torn last line (the daemon killed mid-write) is dropped when read.
 */
import { mkdir, open, readdir, readFile, rm, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { Operation, OperationEvent } from "../../../gen/piccolo/operations/v1/operations.js";

/** A journal read back from disk. */
export interface JournalContents {
  readonly operation: Operation;
  readonly events: OperationEvent[];
  /** Whether a torn trailing line was found and dropped. */
  readonly torn: boolean;
}

/** An open journal that events are appended to. */
export interface JournalWriter {
  /** Appends and fsyncs one event. */
  append(event: OperationEvent): Promise<void>;
  close(): Promise<void>;
}

const enc = (bytes: Uint8Array): string => Buffer.from(bytes).toString("base64");

/** The folder of journals and the operations on it. */
export interface JournalStore {
  readonly dir: string;
  /** Creates a journal holding the operation's first record. */
  create(op: Operation): Promise<JournalWriter>;
  /** Re-opens an existing journal for appending (used to mark interrupted operations). */
  reopen(id: string): Promise<JournalWriter>;
  /** Reads every journal in the folder. Unreadable files are reported, not thrown. */
  readAll(): Promise<{ journals: JournalContents[]; unreadable: { file: string; error: string }[] }>;
  /** Deletes an operation's journal. */
  remove(id: string): Promise<void>;
}

/** Opens the journal folder, creating it if needed. */
export async function openJournalStore(dir: string): Promise<JournalStore> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const fileOf = (id: string): string => join(dir, `${id}.journal`);
  const writer = (fh: FileHandle): JournalWriter => {
    let chain: Promise<void> = Promise.resolve();
    return {
      append(event) {
        const line = enc(OperationEvent.encode(event).finish()) + "\n";
        chain = chain.then(async () => {
          await fh.write(line);
          await fh.datasync();
        });
        return chain;
      },
      async close() {
        await chain.catch(() => undefined);
        await fh.close();
      },
    };
  };
  return {
    dir,
    async create(op) {
      const fh = await open(fileOf(op.id), "wx", 0o600);
      await fh.write(enc(Operation.encode(op).finish()) + "\n");
      await fh.datasync();
      return writer(fh);
    },
    async reopen(id) {
      return writer(await open(fileOf(id), "a", 0o600));
    },
    async readAll() {
      const journals: JournalContents[] = [];
      const unreadable: { file: string; error: string }[] = [];
      for (const name of (await readdir(dir)).filter((n) => n.endsWith(".journal")).sort()) {
        const file = join(dir, name);
        try {
          const text = await readFile(file, "utf8");
          const lines = text.split("\n");
          // A complete file ends with "\n", so the last element is "". Anything else is torn.
          const tail = lines.pop();
          const torn = tail !== "";
          const first = lines.shift();
          if (first === undefined) throw new Error("empty journal");
          const operation = Operation.decode(Buffer.from(first, "base64"));
          const events = lines.map((l) => OperationEvent.decode(Buffer.from(l, "base64")));
          journals.push({ operation, events, torn });
          if (torn) {
            // Drop the torn line so later appends start on a clean line.
            const good = text.slice(0, text.length - (tail ?? "").length);
            const fh = await open(file, "r+");
            await fh.truncate(Buffer.byteLength(good));
            await fh.close();
          }
        } catch (e) {
          unreadable.push({ file, error: (e as Error).message });
        }
      }
      return { journals, unreadable };
    },
    async remove(id) {
      await rm(fileOf(id), { force: true });
    },
  };
}
