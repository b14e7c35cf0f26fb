/**
 * A self-signed X.509 certificate for the daemon's TLS listeners, built with node:crypto and a
 * small DER encoder (no native addon, no openssl binary: the daemon ships as one executable).
 * ECDSA P-256 with SHA-256; subjectAltName lists the names and addresses clients may use, though
 * clients are expected to pin the certificate by its fingerprint rather than by name.
 */
import { createHash, createPublicKey, randomBytes, sign, X509Certificate, type KeyObject } from "node:crypto";
import { isIP } from "node:net";
import { isoTime } from "../iso-time.js";

const tlv = (tag: number, content: Buffer): Buffer => {
  const n = content.length;
  let len: Buffer;
  if (n < 0x80) len = Buffer.from([n]);
  else {
    const bytes: number[] = [];
    for (let v = n; v > 0; v = Math.floor(v / 256)) bytes.unshift(v & 0xff);
    len = Buffer.from([0x80 | bytes.length, ...bytes]);
  }
  return Buffer.concat([Buffer.from([tag]), len, content]);
};
const seq = (...items: Buffer[]): Buffer => tlv(0x30, Buffer.concat(items));
const set = (...items: Buffer[]): Buffer => tlv(0x31, Buffer.concat(items));
const explicit = (n: number, inner: Buffer): Buffer => tlv(0xa0 | n, inner);
const octets = (b: Buffer): Buffer => tlv(0x04, b);
const bits = (b: Buffer): Buffer => tlv(0x03, Buffer.concat([Buffer.from([0]), b]));
const bool = (v: boolean): Buffer => tlv(0x01, Buffer.from([v ? 0xff : 0]));
const utf8 = (s: string): Buffer => tlv(0x0c, Buffer.from(s, "utf8"));

/** A non-negative INTEGER from big-endian bytes. */
const uint = (b: Buffer): Buffer => {
  let i = 0;
  while (i < b.length - 1 && b[i] === 0) i++;
  const v = b.subarray(i);
  return tlv(0x02, (v[0] ?? 0) & 0x80 ? Buffer.concat([Buffer.from([0]), v]) : v);
};

const oid = (dotted: string): Buffer => {
  const parts = dotted.split(".").map(Number);
  const out: number[] = [40 * parts[0]! + parts[1]!];
  for (const p of parts.slice(2)) {
    const chunk: number[] = [p & 0x7f];
    for (let v = Math.floor(p / 128); v > 0; v = Math.floor(v / 128)) chunk.unshift((v & 0x7f) | 0x80);
    out.push(...chunk);
  }
  return tlv(0x06, Buffer.from(out));
};

/** UTCTime up to 2049, GeneralizedTime after (RFC 5280 4.1.2.5). */
const time = (d: Date): Buffer => {
  const iso = isoTime(d).replace(/[-:T]/g, "").slice(0, 14) + "Z"; // YYYYMMDDHHMMSSZ
  return d.getUTCFullYear() < 2050 ? tlv(0x17, Buffer.from(iso.slice(2), "ascii")) : tlv(0x18, Buffer.from(iso, "ascii"));
};

const ECDSA_SHA256 = seq(oid("1.2.840.10045.4.3.2"));
const name = (cn: string): Buffer => seq(set(seq(oid("2.5.4.3"), utf8(cn))));
const extension = (id: string, critical: boolean, value: Buffer): Buffer =>
  seq(oid(id), ...(critical ? [bool(true)] : []), octets(value));

/** IPv4/IPv6 text to bytes. */
function ipBytes(ip: string): Buffer {
  if (isIP(ip) === 4) return Buffer.from(ip.split(".").map(Number));
  const [head = "", tail = ""] = ip.split("::");
  const h = head ? head.split(":") : [];
  const t = ip.includes("::") ? (tail ? tail.split(":") : []) : [];
  const groups = [...h, ...Array<string>(8 - h.length - t.length).fill("0"), ...t];
  return Buffer.from(groups.flatMap((g) => [(parseInt(g, 16) >> 8) & 0xff, parseInt(g, 16) & 0xff]));
}

/** Options of selfSignedCertificate. */
export interface CertificateOptions {
  /** The certificate's key pair (P-256). */
  readonly privateKey: KeyObject;
  /** Subject and issuer common name. */
  readonly commonName: string;
  /** DNS names and IP addresses for subjectAltName. */
  readonly altNames: readonly string[];
  /** Validity; defaults to now - 1 h … now + 10 years. */
  readonly notBefore?: Date;
  readonly notAfter?: Date;
}

/** Builds and signs a self-signed certificate; returns it as PEM. */
export function selfSignedCertificate(o: CertificateOptions): string {
  const spki = createPublicKey(o.privateKey).export({ type: "spki", format: "der" });
  const notBefore = o.notBefore ?? new Date(Date.now() - 3600_000);
  const notAfter = o.notAfter ?? new Date(Date.now() + 10 * 365 * 86400_000);
  const san = seq(
    ...o.altNames.map((n) => (isIP(n) ? tlv(0x87, ipBytes(n)) : tlv(0x82, Buffer.from(n, "ascii")))),
  );
  const keyId = createHash("sha1").update(spki).digest();
  const extensions = seq(
    extension("2.5.29.19", true, seq()), // basicConstraints: not a CA
    extension("2.5.29.15", true, bits(Buffer.from([0x80]))), // keyUsage: digitalSignature
    extension("2.5.29.37", false, seq(oid("1.3.6.1.5.5.7.3.1"))), // extKeyUsage: serverAuth
    extension("2.5.29.14", false, octets(keyId)), // subjectKeyIdentifier
    extension("2.5.29.17", false, san),
  );
  const serial = randomBytes(16);
  serial[0]! &= 0x7f;
  const tbs = seq(
    explicit(0, tlv(0x02, Buffer.from([2]))),
    uint(serial),
    ECDSA_SHA256,
    name(o.commonName),
    seq(time(notBefore), time(notAfter)),
    name(o.commonName),
    spki,
    explicit(3, extensions),
  );
  const signature = sign("sha256", tbs, { key: o.privateKey, dsaEncoding: "der" });
  const der = seq(tbs, ECDSA_SHA256, bits(signature));
  const b64 = der.toString("base64").replace(/(.{64})/g, "$1\n").replace(/\n$/, "");
  const pem = `-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`;
  // Parse it back: a malformed encoding fails here, at generation, not in a client's handshake.
  new X509Certificate(pem);
  return pem;
}

/** The SHA-256 fingerprint of a PEM certificate as upper-case hex pairs joined by ":". */
export function certificateFingerprint(pem: string): string {
  return new X509Certificate(pem).fingerprint256;
}
