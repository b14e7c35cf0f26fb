/**
 * Releases on the Piccolo update server (docs/update-server.md): the manifest of a version on a
 * channel, `GET /api/v1/updates/check?channel=C[&current_version=V][&version=W]`, with the update
 * payload and, when the server publishes one, the install image of the same version; and the
 * detached signatures beside them. The updater and the installer both ask here; the files
 * themselves come through download.ts.
 */
import { PiccoloError, unavailable } from "../errors.js";

/** Version names: what the update server and Flatcar's os-release use. */
export const VERSION_RE = /^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$/;

/** One file of a release: absolute URLs, size and SHA-256 (lower-case hex). */
export interface ReleaseFile {
  readonly url: string;
  readonly size: number;
  readonly sha256: string;
  readonly signatureUrl: string;
}

/** The manifest of one release. */
export interface Manifest {
  readonly version: string;
  readonly channel: string;
  readonly notes: string;
  /** What the server says, when it says (the check compares with the booted version otherwise). */
  readonly updateAvailable: boolean | undefined;
  /** The update payload (piccolo-os-update-<v>.raw.gz). */
  readonly payload: ReleaseFile;
  /** The install image (piccolo-os-<v>.img.gz), when the server has one for this version. */
  readonly installImage: ReleaseFile | undefined;
  /** The JSON as answered. */
  readonly raw: Readonly<Record<string, unknown>>;
}

/** Where to ask and how. */
export interface ReleaseSource {
  /** Base URL of the update server. */
  readonly server: string;
  /** Extra headers (the device's bearer token). */
  readonly headers: Readonly<Record<string, string>>;
}

const baseOf = (server: string): string => (server.endsWith("/") ? server : server + "/");

/** Fetches the manifest of `version` (undefined or "latest": the newest) on `channel`. */
export async function fetchManifest(
  src: ReleaseSource,
  q: { channel: string; version?: string; currentVersion?: string },
  signal?: AbortSignal,
): Promise<Manifest> {
  const { server } = src;
  const version = q.version && q.version !== "latest" ? q.version : undefined;
  const url = new URL("api/v1/updates/check", baseOf(server));
  url.searchParams.set("channel", q.channel);
  if (q.currentVersion) url.searchParams.set("current_version", q.currentVersion);
  if (version) url.searchParams.set("version", version);
  let res: Response;
  try {
    res = await fetch(url, { headers: { accept: "application/json", ...src.headers }, signal: signal ?? AbortSignal.timeout(30_000) });
  } catch (e) {
    if (signal?.aborted) throw signal.reason;
    const code = (e as { cause?: { code?: string } }).cause?.code;
    throw unavailable(`the Piccolo update server at ${server}`, new Error(code ?? (e as Error).message));
  }
  const text = await res.text();
  if (res.status === 404 && version) {
    throw new PiccoloError("not_found", `the update server ${server} has no version ${JSON.stringify(version)} on channel ${JSON.stringify(q.channel)} (HTTP 404)`, { reason: "NOT_FOUND" });
  }
  if (!res.ok) {
    let why = text.slice(0, 200);
    try {
      why = (JSON.parse(text) as { error?: { message?: string } }).error?.message ?? why;
    } catch {
      // not JSON
    }
    throw new PiccoloError("unavailable", `the Piccolo update server at ${server} answered HTTP ${res.status} to ${url.pathname}: ${why}`, { reason: "HOST_PART_UNAVAILABLE" });
  }
  let m: Record<string, unknown>;
  try {
    m = JSON.parse(text) as Record<string, unknown>;
    if (typeof m !== "object" || m === null || Array.isArray(m)) throw new Error("not an object");
  } catch {
    throw new PiccoloError("unavailable", `the Piccolo update server at ${server} answered something that is not a JSON object`, { reason: "HOST_PART_UNAVAILABLE" });
  }
  const bad = (what: string): PiccoloError =>
    new PiccoloError("unavailable", `the Piccolo update server at ${server} answered a manifest without ${what}`, { reason: "HOST_PART_UNAVAILABLE" });
  const file = (o: Record<string, unknown>, urlKey: string, what: string): ReleaseFile => {
    const size = o["size"];
    const sha = o["sha256"];
    if (typeof size !== "number" || !Number.isSafeInteger(size) || size <= 0 || typeof sha !== "string" || !/^[0-9a-f]{64}$/i.test(sha)) {
      throw bad(`a valid size and sha256 for the ${what}`);
    }
    const abs = (key: string): string => {
      const v = o[key];
      if (typeof v !== "string" || v === "") throw bad(`${key} for the ${what}`);
      try {
        return new URL(v, baseOf(server)).href;
      } catch {
        throw bad(`a valid ${key} for the ${what}`);
      }
    };
    return { url: abs(urlKey), size, sha256: sha.toLowerCase(), signatureUrl: abs("signature_url") };
  };
  if (typeof m["version"] !== "string" || !VERSION_RE.test(m["version"])) throw bad("a valid version");
  if (version && m["version"] !== version) throw bad(`version ${JSON.stringify(version)} (it answered ${JSON.stringify(m["version"])})`);
  const inst = m["install_image"];
  return {
    version: m["version"],
    channel: typeof m["channel"] === "string" ? m["channel"] : q.channel,
    notes: typeof m["notes"] === "string" ? m["notes"] : "",
    updateAvailable: typeof m["update_available"] === "boolean" ? m["update_available"] : undefined,
    payload: file(m, "download_url", "update payload"),
    installImage: inst && typeof inst === "object" && !Array.isArray(inst) ? file(inst as Record<string, unknown>, "url", "install image") : undefined,
    raw: m,
  };
}

/** Fetches a detached signature (small; no resume). */
export async function fetchSignature(src: ReleaseSource, url: string, signal?: AbortSignal): Promise<Buffer> {
  let res: Response;
  try {
    res = await fetch(url, { headers: src.headers, signal: signal ?? AbortSignal.timeout(30_000) });
  } catch (e) {
    if (signal?.aborted) throw signal.reason;
    throw unavailable(`the signature at ${url}`, e);
  }
  if (!res.ok) {
    await res.body?.cancel();
    throw new PiccoloError("unavailable", `the signature at ${url} answered HTTP ${res.status}`, { reason: "HOST_PART_UNAVAILABLE" });
  }
  const buf = Buffer.from(await res.arrayBuffer());
  if (buf.length > 64 * 1024) throw new PiccoloError("unavailable", `the signature at ${url} is larger than 64 KiB`, { reason: "HOST_PART_UNAVAILABLE" });
  return buf;
}
