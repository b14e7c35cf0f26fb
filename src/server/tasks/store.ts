/** Task run records: one TaskRun message (binary protobuf) per run in <stateDir>/tasks, written atomically. */
import { mkdir, readFile, readdir, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { TaskRun } from "../../../gen/piccolo/tasks/v1/tasks.js";

/** The run records. */
export interface TaskRunStore {
  save(run: TaskRun): Promise<void>;
  get(id: string): Promise<TaskRun | undefined>;
  /** Every run, newest first. */
  list(): Promise<TaskRun[]>;
}

/** Opens the store in `dir` (created when missing). */
export async function openTaskRunStore(dir: string): Promise<TaskRunStore> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const file = (id: string): string => join(dir, `${id}.pb`);
  // Writes of one run go one after another, so an older state never lands after a newer one.
  const chains = new Map<string, Promise<void>>();
  const read = async (path: string): Promise<TaskRun | undefined> => {
    try {
      return TaskRun.decode(await readFile(path));
    } catch {
      return undefined;
    }
  };
  return {
    save(run) {
      const bytes = TaskRun.encode(run).finish();
      const prev = chains.get(run.id) ?? Promise.resolve();
      const next = prev.then(async () => {
        const tmp = `${file(run.id)}.tmp`;
        await writeFile(tmp, bytes, { mode: 0o600 });
        await rename(tmp, file(run.id));
      });
      const tail = next.catch(() => undefined);
      chains.set(run.id, tail);
      void tail.then(() => {
        if (chains.get(run.id) === tail) chains.delete(run.id);
      });
      return next;
    },
    async get(id) {
      if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(id)) return undefined;
      await chains.get(id);
      return read(file(id));
    },
    async list() {
      const names = (await readdir(dir)).filter((n) => n.endsWith(".pb"));
      const runs = (await Promise.all(names.map((n) => read(join(dir, n))))).filter((r): r is TaskRun => r !== undefined);
      return runs.sort((a, b) => (b.createTime?.getTime() ?? 0) - (a.createTime?.getTime() ?? 0) || b.id.localeCompare(a.id));
    },
  };
}
