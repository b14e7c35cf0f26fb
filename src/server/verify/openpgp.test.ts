import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { makeSigningKey, type SigningKey } from "../../../test/helpers/flatcar-image.js";
import { createOpenPgpVerifier, parseGpgStatus } from "./openpgp.js";

let trusted: SigningKey;
let other: SigningKey;
let dir: string;
beforeAll(() => {
  trusted = makeSigningKey("Trusted");
  other = makeSigningKey("Other");
  dir = mkdtempSync(join(tmpdir(), "piccolo-pgp-"));
});
afterAll(() => {
  trusted.cleanup();
  other.cleanup();
  rmSync(dir, { recursive: true, force: true });
});

test("a good signature from a trusted key; bad, unknown-key and garbage signatures name the field", async () => {
  const data = join(dir, "data.bin");
  writeFileSync(data, "piccolo image bytes\n");
  const v = createOpenPgpVerifier({ keyrings: [trusted.keyring] });
  const sig = trusted.signature(data);
  await expect(v.verifyDetached(data, sig, "spec.signature")).resolves.toMatchObject({ fingerprint: expect.stringMatching(/^[0-9A-F]{40}$/) });
  writeFileSync(data, "other bytes\n");
  await expect(v.verifyDetached(data, sig, "spec.signature")).rejects.toMatchObject({ kind: "invalid_argument", message: expect.stringMatching(/^spec.signature: bad signature/) });
  await expect(v.verifyDetached(data, other.signature(data), "spec.signature")).rejects.toMatchObject({ message: expect.stringMatching(/unknown key/) });
  await expect(v.verifyDetached(data, "not a signature", "sig")).rejects.toMatchObject({ message: expect.stringMatching(/^sig: /) });
  await expect(createOpenPgpVerifier({ keyrings: [] }).verifyDetached(data, sig, "sig")).rejects.toMatchObject({ kind: "failed_precondition" });
});

test("parseGpgStatus needs VALIDSIG and no problem line", () => {
  expect(parseGpgStatus("[GNUPG:] GOODSIG 1 x\n[GNUPG:] VALIDSIG AB 2026-01-01 1700000000 0 4 0 22 10 00 CD\n")).toMatchObject({ good: true, fingerprint: "CD", created: 1700000000 });
  expect(parseGpgStatus("[GNUPG:] VALIDSIG AB x 1 0 4 0 22 10 00 CD\n[GNUPG:] EXPKEYSIG AB x\n").good).toBe(false);
  expect(parseGpgStatus("").good).toBe(false);
});
