import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeSigningKey, type SigningKey } from "../../../test/helpers/flatcar-image.js";
import { createOpenPgpVerifier, parseGpgStatus, parseKeyring, parsePublicKey, readKeyFiles, type PublicKey } from "./openpgp.js";

let trusted: SigningKey;
let other: SigningKey;
let dir: string;
let keys: PublicKey[];
beforeAll(() => {
  trusted = makeSigningKey("Trusted");
  other = makeSigningKey("Other");
  dir = mkdtempSync(join(tmpdir(), "piccolo-pgp-"));
  keys = parseKeyring(readFileSync(trusted.keyring));
});
afterAll(() => {
  trusted.cleanup();
  other.cleanup();
  rmSync(dir, { recursive: true, force: true });
});

const gpgFingerprint = (k: SigningKey): string =>
  /^fpr:+([0-9A-F]{40,64}):/m.exec(
    execFileSync("gpg", ["--homedir", k.home, "--with-colons", "--list-keys"], { encoding: "utf8" }),
  )![1]!;

test("verifyFile: a good signature from a trusted key; bad, unknown-key and garbage signatures name the field", async () => {
  const data = join(dir, "data.bin");
  writeFileSync(data, "piccolo image bytes\n");
  const v = createOpenPgpVerifier({ keys: () => keys });
  const sig = trusted.signature(data);
  await expect(v.verifyFile(data, sig, "spec.signature")).resolves.toMatchObject({ fingerprint: keys[0]!.fingerprint });
  writeFileSync(data, "other bytes\n");
  await expect(v.verifyFile(data, sig, "spec.signature")).rejects.toMatchObject({ kind: "invalid_argument", field: "spec.signature", reason: "BAD_SIGNATURE", message: expect.stringMatching(/^spec.signature: bad signature/) });
  await expect(v.verifyFile(data, other.signature(data), "spec.signature")).rejects.toMatchObject({ message: expect.stringMatching(/not one of the configured Piccolo signing keys \(an unknown key\)/) });
  await expect(v.verifyFile(data, "not a signature", "sig")).rejects.toMatchObject({ message: expect.stringMatching(/^sig: /) });
  await expect(createOpenPgpVerifier({ keys: () => [] }).verifyFile(data, sig, "sig")).rejects.toMatchObject({ kind: "failed_precondition", reason: "NO_TRUSTED_KEYS" });
});

test("startCheck takes the data in pieces and agrees with verifyFile", async () => {
  const data = join(dir, "stream.bin");
  const bytes = Buffer.alloc(3 << 20, 7);
  writeFileSync(data, bytes);
  const sig = trusted.signature(data);
  const v = createOpenPgpVerifier({ keys: () => keys });
  const good = await v.startCheck(sig, "payload signature");
  for (let i = 0; i < bytes.length; i += 100_000) await good.write(bytes.subarray(i, i + 100_000));
  await expect(good.finish()).resolves.toMatchObject({ fingerprint: keys[0]!.fingerprint });
  const bad = await v.startCheck(sig, "payload signature");
  await bad.write(bytes.subarray(0, bytes.length - 1));
  await expect(bad.finish()).rejects.toMatchObject({ message: expect.stringMatching(/^payload signature: bad signature/) });
  const stopped = await v.startCheck(sig, "x");
  stopped.abort();
});

test("keys: binary keyrings and armored files give the same fingerprint as gpg; private keys and garbage are refused", async () => {
  expect(keys.map((k) => k.fingerprint)).toEqual([gpgFingerprint(trusted)]);
  const armored = execFileSync("gpg", ["--homedir", other.home, "--armor", "--export"], { encoding: "utf8" });
  expect(parsePublicKey(armored).fingerprint).toBe(gpgFingerprint(other));
  writeFileSync(join(dir, "both.gpg"), Buffer.concat([readFileSync(trusted.keyring), readFileSync(other.keyring)]));
  writeFileSync(join(dir, "other.asc"), `some text\n${armored}\n`);
  writeFileSync(join(dir, "garbage.asc"), "hello\n");
  const warnings: string[] = [];
  const all = await readKeyFiles([join(dir, "both.gpg"), join(dir, "other.asc"), join(dir, "garbage.asc"), join(dir, "missing.asc")], (m) => warnings.push(m));
  expect(all.map((k) => k.fingerprint)).toEqual([gpgFingerprint(trusted), gpgFingerprint(other)]);
  expect(warnings).toEqual([expect.stringMatching(/garbage.asc is ignored/), expect.stringMatching(/missing.asc is not readable/)]);
  expect(() => parsePublicKey("-----BEGIN PGP PRIVATE KEY BLOCK-----\nx\n-----END PGP PRIVATE KEY BLOCK-----")).toThrow(/private key/);
  expect(() => parseKeyring(Buffer.from("nope"))).toThrow(/not a valid OpenPGP public key/);
  // Both keys in one keyring: a signature of either is good.
  const v = createOpenPgpVerifier({ keys: () => all });
  const data = join(dir, "d2.bin");
  writeFileSync(data, "x");
  await expect(v.verifyFile(data, other.signature(data), "s")).resolves.toMatchObject({ fingerprint: gpgFingerprint(other) });
});

test("parseGpgStatus needs VALIDSIG and no problem line", () => {
  expect(parseGpgStatus("[GNUPG:] GOODSIG 1 x\n[GNUPG:] VALIDSIG AB 2026-01-01 1700000000 0 4 0 22 10 00 CD\n")).toMatchObject({ good: true, fingerprint: "CD", created: 1700000000 });
  expect(parseGpgStatus("[GNUPG:] VALIDSIG AB x 1 0 4 0 22 10 00 CD\n[GNUPG:] EXPKEYSIG AB x\n").good).toBe(false);
  expect(parseGpgStatus("").good).toBe(false);
});
