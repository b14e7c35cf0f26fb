/**
 * Low-space alerts: each watch polls the filesystems while its client listens, starts with the
 * state of each (RAISED or OK), and turns each crossing of the free-space threshold into a RAISED
 * or CLEARED StorageAlert.
 */
import { StorageAlertState, type Filesystem, type StorageAlert } from "../../../gen/piccolo/storage/v1/storage.js";

/** Options of watchAlerts. */
export interface AlertOptions {
  /** Lists the filesystems (listFilesystems bound to the mount table). */
  readonly list: () => Promise<Filesystem[]>;
  /** Free space (available, in percent of the size) under which an alert is raised. */
  readonly thresholdPercent: number;
  /** Time between two looks. */
  readonly intervalMs: number;
}

const freePercent = (f: Filesystem): number => (f.sizeBytes > 0 ? (f.availableBytes / f.sizeBytes) * 100 : 100);

const alert = (state: StorageAlertState, f: Filesystem, threshold: number): StorageAlert => {
  const free = freePercent(f);
  return {
    time: new Date(),
    state,
    filesystem: f,
    freePercent: free,
    thresholdPercent: threshold,
    message:
      state === StorageAlertState.STORAGE_ALERT_STATE_RAISED
        ? `${f.mountPoint} has ${free.toFixed(1)}% free, below the ${threshold}% threshold`
        : state === StorageAlertState.STORAGE_ALERT_STATE_OK
          ? `${f.mountPoint} has ${free.toFixed(1)}% free (threshold ${threshold}%)`
          : `${f.mountPoint} has ${free.toFixed(1)}% free again (threshold ${threshold}%)`,
  };
};

/** Yields the state of every filesystem now (RAISED or OK), then every change, until `signal` aborts. */
export async function* watchAlerts(o: AlertOptions, signal: AbortSignal): AsyncGenerator<StorageAlert> {
  const low = new Set<string>();
  let first = true;
  while (!signal.aborted) {
    const now = await o.list();
    const seen = new Set<string>();
    for (const f of now) {
      seen.add(f.mountPoint);
      const isLow = freePercent(f) < o.thresholdPercent;
      if (first && !isLow) {
        yield alert(StorageAlertState.STORAGE_ALERT_STATE_OK, f, o.thresholdPercent);
      } else if (isLow && !low.has(f.mountPoint)) {
        low.add(f.mountPoint);
        yield alert(StorageAlertState.STORAGE_ALERT_STATE_RAISED, f, o.thresholdPercent);
      } else if (!isLow && low.has(f.mountPoint)) {
        low.delete(f.mountPoint);
        yield alert(StorageAlertState.STORAGE_ALERT_STATE_CLEARED, f, o.thresholdPercent);
      }
    }
    first = false;
    // A filesystem that went away no longer runs out of space.
    for (const m of [...low]) if (!seen.has(m)) low.delete(m);
    await new Promise<void>((resolve) => {
      const t = setTimeout(resolve, o.intervalMs);
      signal.addEventListener("abort", () => (clearTimeout(t), resolve()), { once: true });
    });
  }
}
