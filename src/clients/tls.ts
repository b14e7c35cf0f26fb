/**
 * Trusting piccolod's self-signed TLS certificate from Node clients: by the certificate itself
 * (PEM, e.g. <stateDir>/tls/cert.pem) or by its SHA-256 fingerprint (`piccoloctl auth
 * fingerprint` on the host). Either way the client pins that exact certificate: a connection
 * whose certificate has another fingerprint is refused before anything (a token) is sent. Not for
 * browsers, which trust certificates their own way.
 */
import { X509Certificate } from "node:crypto";
import { Agent, request } from "node:https";
import { Readable } from "node:stream";
import { connect, type PeerCertificate } from "node:tls";

/** How a client trusts the daemon's certificate. */
export interface TlsTrust {
  /** The certificate to trust (PEM). */
  readonly ca?: string;
  /** Its SHA-256 fingerprint ("AB:CD:…", with or without colons, any case). */
  readonly fingerprint?: string;
}

/** A fingerprint in the form Node reports (upper-case hex pairs joined by ":"); throws when malformed. */
export function normalizeFingerprint(fp: string): string {
  const hex = fp.trim().replace(/^sha-?256[:=]?/i, "").replace(/[:\s]/g, "").toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex)) throw new Error(`TLS fingerprint ${JSON.stringify(fp)}: expected 32 bytes of SHA-256 in hex ("AB:CD:…")`);
  return hex.match(/../g)!.join(":");
}

/** The SHA-256 fingerprint of a PEM certificate. */
export function pemFingerprint(pem: string): string {
  return new X509Certificate(pem).fingerprint256;
}

/** A checkServerIdentity that accepts exactly the certificate with fingerprint `fp` (host names do not matter). */
export function pinnedIdentity(fp: string): (host: string, cert: PeerCertificate) => Error | undefined {
  const want = normalizeFingerprint(fp);
  return (_host, cert) =>
    cert.fingerprint256 === want
      ? undefined
      : Object.assign(new Error(`the daemon's TLS certificate has fingerprint ${cert.fingerprint256}, not the pinned ${want}`), { code: "ERR_TLS_CERT_PINNING" });
}

/** Splits "host:port", "[v6]:port" or a URL into host and port. */
export function hostPort(endpoint: string): { host: string; port: number } {
  if (/^https?:\/\//i.test(endpoint)) {
    const u = new URL(endpoint);
    return { host: u.hostname.replace(/^\[|\]$/g, ""), port: Number(u.port || (u.protocol === "https:" ? 443 : 80)) };
  }
  const m = /^(?:\[([^\]]+)\]|([^:]+)):(\d+)$/.exec(endpoint);
  if (!m) throw new Error(`endpoint ${JSON.stringify(endpoint)}: expected host:port`);
  return { host: m[1] ?? m[2]!, port: Number(m[3]) };
}

/**
 * Fetches the certificate the daemon at host:port presents and returns it (PEM) when its
 * fingerprint is `fingerprint`; rejects otherwise. Nothing but the TLS handshake is sent.
 */
export function fetchPinnedCertificate(endpoint: string, fingerprint: string, timeoutMs = 10_000): Promise<string> {
  const want = normalizeFingerprint(fingerprint);
  const { host, port } = hostPort(endpoint);
  return new Promise((resolve, reject) => {
    const socket = connect({ host, port, rejectUnauthorized: false, ALPNProtocols: ["h2", "http/1.1"], ...(/^[\d.:]+$/.test(host) ? {} : { servername: host }) });
    const timer = setTimeout(() => socket.destroy(new Error(`no TLS handshake with ${host}:${port} within ${timeoutMs} ms`)), timeoutMs);
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      const cert = socket.getPeerCertificate();
      socket.destroy();
      if (!cert.raw) return reject(new Error(`${host}:${port} presented no certificate`));
      if (cert.fingerprint256 !== want) {
        return reject(Object.assign(new Error(`the daemon at ${host}:${port} has TLS fingerprint ${cert.fingerprint256}, not the pinned ${want}`), { code: "ERR_TLS_CERT_PINNING" }));
      }
      resolve(`-----BEGIN CERTIFICATE-----\n${cert.raw.toString("base64").replace(/(.{64})/g, "$1\n").replace(/\n$/, "")}\n-----END CERTIFICATE-----\n`);
    });
    socket.once("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
  });
}

/** Turns a trust (certificate and/or fingerprint) into the certificate to pin, fetching it when only the fingerprint is known. */
export async function resolveTrust(endpoint: string, trust: TlsTrust): Promise<{ ca: string; fingerprint: string }> {
  if (trust.ca) {
    const fp = pemFingerprint(trust.ca);
    if (trust.fingerprint && normalizeFingerprint(trust.fingerprint) !== fp) {
      throw new Error(`the given certificate has fingerprint ${fp}, not the given ${normalizeFingerprint(trust.fingerprint)}`);
    }
    return { ca: trust.ca, fingerprint: fp };
  }
  if (!trust.fingerprint) throw new Error("neither a certificate nor a fingerprint to trust the daemon's TLS certificate by");
  return { ca: await fetchPinnedCertificate(endpoint, trust.fingerprint), fingerprint: normalizeFingerprint(trust.fingerprint) };
}

/**
 * A fetch for the REST clients that speaks HTTPS to a daemon with a pinned certificate (and
 * plain HTTP as globalThis.fetch does). Connections are kept alive.
 */
export function createPinnedFetch(trust: { readonly ca: string; readonly fingerprint?: string }): typeof fetch {
  const agent = new Agent({
    keepAlive: true,
    maxSockets: 256,
    ca: trust.ca,
    checkServerIdentity: pinnedIdentity(trust.fingerprint ?? pemFingerprint(trust.ca)),
  });
  const pinned = (input: string | URL | Request, init: RequestInit = {}): Promise<Response> => {
    const url = new URL(typeof input === "string" ? input : input instanceof URL ? input.href : input.url);
    if (url.protocol !== "https:") return globalThis.fetch(input, init);
    const headers: Record<string, string> = {};
    new Headers(init.headers).forEach((v, k) => (headers[k] = v));
    const method = (init.method ?? "GET").toUpperCase();
    return new Promise<Response>((resolve, reject) => {
      const req = request(url, { method, headers, agent, signal: init.signal ?? undefined }, (res) => {
        const h = new Headers();
        for (const [k, v] of Object.entries(res.headers)) if (v !== undefined) h.set(k, Array.isArray(v) ? v.join(", ") : v);
        const status = res.statusCode ?? 502;
        const nobody = method === "HEAD" || status === 204 || status === 304;
        if (nobody) res.resume();
        resolve(new Response(nobody ? null : (Readable.toWeb(res) as unknown as ReadableStream<Uint8Array>), { status, statusText: res.statusMessage, headers: h }));
      });
      // As globalThis.fetch does: a transport failure is a TypeError whose cause is the error.
      req.once("error", (e) => reject(e.name === "AbortError" ? e : new TypeError("fetch failed", { cause: e })));
      const body = init.body;
      if (body === undefined || body === null) req.end();
      else if (typeof body === "string" || body instanceof Uint8Array) req.end(body);
      else reject(new Error("createPinnedFetch: only string and Uint8Array bodies are supported"));
    });
  };
  return pinned as typeof fetch;
}
