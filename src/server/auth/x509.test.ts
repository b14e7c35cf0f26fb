import { generateKeyPairSync, X509Certificate } from "node:crypto";
import { connect, createServer } from "node:tls";
import { pinnedIdentity } from "../../clients/tls.js";
import { certificateFingerprint, selfSignedCertificate } from "./x509.js";

describe("selfSignedCertificate", () => {
  const { privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const pem = selfSignedCertificate({ privateKey, commonName: "piccolod test", altNames: ["localhost", "127.0.0.1", "::1", "fe80::1", "box.lan"] });
  const cert = new X509Certificate(pem);

  it("is a valid self-signed certificate with the names and addresses asked for", () => {
    expect(cert.verify(cert.publicKey)).toBe(true);
    expect(cert.subject).toBe("CN=piccolod test");
    expect(cert.issuer).toBe(cert.subject);
    expect(cert.subjectAltName).toBe("DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, IP Address:FE80:0:0:0:0:0:0:1, DNS:box.lan");
    expect(cert.ca).toBe(false);
    expect(new Date(cert.validTo).getTime()).toBeGreaterThan(Date.now() + 9 * 365 * 86400_000);
    expect(certificateFingerprint(pem)).toMatch(/^([0-9A-F]{2}:){31}[0-9A-F]{2}$/);
  });

  it("serves TLS to a client that pins it, and a client pinning another refuses the handshake", async () => {
    const server = createServer({ key: privateKey.export({ type: "pkcs8", format: "pem" }), cert: pem }, (s) => s.end("hello"));
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
    const port = (server.address() as { port: number }).port;
    const talk = (fp: string): Promise<string> =>
      new Promise((resolve) => {
        const s = connect({ host: "127.0.0.1", port, ca: pem, checkServerIdentity: pinnedIdentity(fp) }, () => s.once("data", (d) => resolve(String(d))));
        s.once("error", (e) => resolve(`error: ${e.message}`));
      });
    try {
      expect(await talk(cert.fingerprint256)).toBe("hello");
      expect(await talk("AB".repeat(32))).toMatch(/^error: the daemon's TLS certificate has fingerprint .* not the pinned AB:AB/);
    } finally {
      server.close();
    }
  });
});
