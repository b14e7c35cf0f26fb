/**
 * V8 tuning for the start-up phase only, applied before the rest of the daemon is loaded (import
 * this module first) and lifted by endStartupTuning() once the daemon is ready.
 *
 * Start-up runs a lot of code exactly once: the embedded descriptor set is decoded and indexed,
 * zod and the service definitions build their tables, every area is constructed. Those loops are
 * hot enough for V8 to optimize them with TurboFan, which pages in the optimizing compiler and
 * keeps its zones and the optimized code: about 6 MB of RSS (measured on the single executable)
 * for code that never runs again. The objects built at start-up are long-lived, so the scavenger
 * sees a high survival rate and doubles the young generation to 8 MB per semi-space, which the
 * idle daemon then keeps (5 MB of RSS) until V8's memory reducer shrinks it half a minute later.
 * So while starting, TurboFan is off and the young generation stays at its initial size; when
 * ready, both go back to V8's defaults, and request handling is optimized and grows the young
 * generation as its load asks for.
 *
 * A V8 option given on the command line or in NODE_OPTIONS is left as given.
 */
import { setFlagsFromString } from "node:v8";

const given = [...process.execArgv, ...(process.env["NODE_OPTIONS"] ?? "").split(/\s+/)].join(" ");
const tuned: string[] = [];
if (!/--(no-)?(opt|turbofan)\b/.test(given)) {
  setFlagsFromString("--no-turbofan");
  tuned.push("--turbofan");
}
if (!/--(semi-space-growth-factor|max-semi-space-size|min-semi-space-size)\b/.test(given)) {
  setFlagsFromString("--semi-space-growth-factor=1");
  tuned.push("--semi-space-growth-factor=2");
}

/** Restores V8's defaults changed for start-up. Idempotent. */
export function endStartupTuning(): void {
  for (const f of tuned.splice(0)) setFlagsFromString(f);
}
