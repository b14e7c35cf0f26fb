/**
 * ISO 8601 UTC timestamps ("2026-01-02T03:04:05.678Z", what Date.prototype.toISOString returns),
 * built from the UTC fields.
 *
 * In the Node 20 runtime (V8 11.3) toISOString, toJSON and toUTCString look up the display name of
 * the local time zone although their output never shows it: the first call loads ICU's time-zone
 * names, touching 4-12 MB of the ICU data inside the executable (resident as long as the process
 * runs). The logger stamps every line, so the daemon formats its own timestamps on the paths it
 * takes at start-up and on every call: logging, the audit record, operation ids, certificates.
 */
const pad = (n: number, width = 2): string => String(n).padStart(width, "0");

/** `d` (a Date or epoch milliseconds) as toISOString renders it; throws RangeError on an invalid time like toISOString. */
export function isoTime(d: Date | number = Date.now()): string {
  const t = typeof d === "number" ? new Date(d) : d;
  const year = t.getUTCFullYear();
  // Years outside 0000-9999 take toISOString's expanded ±YYYYYY form (and NaN its RangeError).
  if (!(year >= 0 && year <= 9999)) return t.toISOString();
  return `${pad(year, 4)}-${pad(t.getUTCMonth() + 1)}-${pad(t.getUTCDate())}T${pad(t.getUTCHours())}:${pad(t.getUTCMinutes())}:${pad(t.getUTCSeconds())}.${pad(t.getUTCMilliseconds(), 3)}Z`;
}
