/**
 * The system-bus adapters of the update area, on dbus-next: Flatcar's update_engine
 * (`com.coreos.update1.Manager` at /com/coreos/update1: AttemptUpdate, ResetStatus, GetStatus and
 * the StatusUpdate signal, FLATCAR.md) and systemd-logind's reboot scheduling. Calls go as plain
 * method calls, not through introspection, which Flatcar's bus policy does not grant. Every call
 * has a deadline, and a bus that cannot be reached is UNAVAILABLE naming it.
 */
import dbus from "dbus-next";
import { PiccoloError, unavailable } from "../errors.js";

/** update_engine's D-Bus name, object and interface. */
export const ENGINE = { name: "com.coreos.update1", path: "/com/coreos/update1", iface: "com.coreos.update1.Manager" } as const;
const LOGIN1 = { name: "org.freedesktop.login1", path: "/org/freedesktop/login1", iface: "org.freedesktop.login1.Manager" } as const;

/** update_engine's status strings. */
export const EngineOp = {
  IDLE: "UPDATE_STATUS_IDLE",
  CHECKING: "UPDATE_STATUS_CHECKING_FOR_UPDATE",
  AVAILABLE: "UPDATE_STATUS_UPDATE_AVAILABLE",
  DOWNLOADING: "UPDATE_STATUS_DOWNLOADING",
  VERIFYING: "UPDATE_STATUS_VERIFYING",
  FINALIZING: "UPDATE_STATUS_FINALIZING",
  NEED_REBOOT: "UPDATE_STATUS_UPDATED_NEED_REBOOT",
  ERROR_EVENT: "UPDATE_STATUS_REPORTING_ERROR_EVENT",
} as const;

/** One GetStatus answer or StatusUpdate signal. */
export interface EngineState {
  /** Unix seconds of the last check, 0 if never. */
  readonly lastCheckedTime: number;
  /** 0..1 during DOWNLOADING. */
  readonly progress: number;
  readonly currentOperation: string;
  readonly newVersion: string;
  readonly newSize: number;
}

/** A connection to update_engine. */
export interface UpdateEngineClient {
  getStatus(): Promise<EngineState>;
  attemptUpdate(): Promise<void>;
  resetStatus(): Promise<void>;
  /**
   * Calls `onStatus` for every StatusUpdate signal and `onGone` when update_engine leaves the bus
   * (or the bus connection drops). Resolves once the match rules are in place.
   */
  watch(onStatus: (s: EngineState) => void, onGone: (why: string) => void): Promise<void>;
  close(): void;
}

const CALL_TIMEOUT_MS = 10_000;

type Bus = dbus.MessageBus;

/** Opens a bus connection; errors of the connection reject pending calls. */
function openBus(address: string): { bus: Bus; failed: Promise<never>; errors: Set<(e: Error) => void> } {
  const bus = dbus.sessionBus({ busAddress: address });
  const errors = new Set<(e: Error) => void>();
  let failure: Error | undefined;
  const failed = new Promise<never>((_r, reject) => {
    bus.on("error", (e: Error) => {
      failure ??= e;
      reject(e);
      for (const f of errors) f(e);
    });
  });
  failed.catch(() => undefined);
  return { bus, failed, errors };
}

async function call(bus: Bus, failed: Promise<never>, part: string, address: string, m: { destination: string; path: string; iface: string; member: string; signature?: string; body?: unknown[] }): Promise<dbus.Message> {
  const msg = new dbus.Message({ destination: m.destination, path: m.path, interface: m.iface, member: m.member, signature: m.signature ?? "", body: m.body ?? [] });
  let timer: NodeJS.Timeout | undefined;
  try {
    const reply = await Promise.race([
      bus.call(msg),
      failed,
      new Promise<never>((_r, reject) => {
        timer = setTimeout(() => reject(new Error(`no answer within ${CALL_TIMEOUT_MS / 1000} s`)), CALL_TIMEOUT_MS);
      }),
    ]);
    if (!reply) throw new Error(`no reply to ${m.member}`);
    return reply;
  } catch (e) {
    if (e instanceof dbus.DBusError) {
      const name = e.type;
      if (name === "org.freedesktop.DBus.Error.ServiceUnknown" || name === "org.freedesktop.DBus.Error.NameHasNoOwner") {
        throw new PiccoloError("unavailable", `${part} is not on the system bus at ${address}`, { reason: "HOST_PART_UNAVAILABLE", cause: e });
      }
      throw new PiccoloError("failed_precondition", `${part} refused ${m.member}: ${e.text ?? name}`, { cause: e });
    }
    throw unavailable(`the system bus at ${address} (for ${part})`, e);
  } finally {
    clearTimeout(timer);
  }
}

const toState = (body: unknown[]): EngineState => ({
  lastCheckedTime: Number(body[0] ?? 0),
  progress: Number(body[1] ?? 0),
  currentOperation: String(body[2] ?? ""),
  newVersion: String(body[3] ?? ""),
  newSize: Number(body[4] ?? 0),
});

/** Connects to update_engine on the bus at `address`. */
export function connectUpdateEngine(address: string): UpdateEngineClient {
  const { bus, failed, errors } = openBus(address);
  const part = "update_engine (com.coreos.update1)";
  const engineCall = (member: string): Promise<dbus.Message> => call(bus, failed, part, address, { destination: ENGINE.name, path: ENGINE.path, iface: ENGINE.iface, member });
  const addMatch = (rule: string): Promise<dbus.Message> =>
    call(bus, failed, "the D-Bus daemon", address, {
      destination: "org.freedesktop.DBus",
      path: "/org/freedesktop/DBus",
      iface: "org.freedesktop.DBus",
      member: "AddMatch",
      signature: "s",
      body: [rule],
    });
  let closed = false;
  return {
    async getStatus() {
      return toState((await engineCall("GetStatus")).body as unknown[]);
    },
    async attemptUpdate() {
      await engineCall("AttemptUpdate");
    },
    async resetStatus() {
      await engineCall("ResetStatus");
    },
    async watch(onStatus, onGone) {
      bus.on("message", (msg: dbus.Message) => {
        if (msg.type !== dbus.MessageType.SIGNAL) return;
        if (msg.interface === ENGINE.iface && msg.member === "StatusUpdate" && msg.path === ENGINE.path) onStatus(toState(msg.body as unknown[]));
        else if (msg.interface === "org.freedesktop.DBus" && msg.member === "NameOwnerChanged") {
          const [name, , newOwner] = msg.body as [string, string, string];
          if (name === ENGINE.name && newOwner === "") onGone(`${part} left the system bus`);
        }
      });
      errors.add((e) => {
        if (!closed) onGone(`the connection to the system bus at ${address} broke (${e.message})`);
      });
      await addMatch(`type='signal',interface='${ENGINE.iface}',member='StatusUpdate',path='${ENGINE.path}'`);
      await addMatch(`type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',member='NameOwnerChanged',arg0='${ENGINE.name}'`);
    },
    close() {
      closed = true;
      try {
        bus.disconnect();
      } catch {
        // already gone
      }
    },
  };
}

/**
 * Asks systemd-logind to reboot: with a delay through ScheduleShutdown("reboot", µs) after
 * SetWallMessage(reason), as `shutdown -r +N reason` does; at once through Reboot(false).
 * Resolves to when the reboot is scheduled.
 */
export async function scheduleReboot(address: string, reason: string, delayMs: number): Promise<Date> {
  const { bus, failed } = openBus(address);
  const part = "systemd-logind (org.freedesktop.login1)";
  const login = (member: string, signature: string, body: unknown[]): Promise<dbus.Message> =>
    call(bus, failed, part, address, { destination: LOGIN1.name, path: LOGIN1.path, iface: LOGIN1.iface, member, signature, body });
  try {
    await login("SetWallMessage", "sb", [reason, true]);
    const when = new Date(Date.now() + delayMs);
    if (delayMs > 0) await login("ScheduleShutdown", "st", ["reboot", BigInt(when.getTime()) * 1000n]);
    else await login("Reboot", "b", [false]);
    return when;
  } finally {
    try {
      bus.disconnect();
    } catch {
      // already gone
    }
  }
}
