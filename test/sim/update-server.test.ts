/**
 * The reference Piccolo update server on its own: the manifest it answers, Range downloads, and
 * signatures that GnuPG itself (`gpg --verify`, an independent checker) accepts with the test
 * key's public key and rejects for a changed payload; and its injected faults.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { gunzipSync } from "node:zlib";
import { installImageFile, makeRelease, makeSigningKey, startUpdateServer, type Release, type SigningKey, type UpdateServer } from "./update-server.js";

const run = promisify(execFile);
let dir: string;
let key: SigningKey;
let r1: Release;
let r2: Release;
let server: UpdateServer;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "upd-srv-"));
  key = await makeSigningKey();
  r1 = await makeRelease(join(dir, "r"), key, "1.1.0", 300_000);
  r2 = await makeRelease(join(dir, "r"), key, "1.2.0", 300_000);
  server = await startUpdateServer([r1, r2]);
}, 60_000);

afterAll(async () => {
  await server?.close();
  await key?.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

test("check answers the newest release on the channel, or the one asked for, as JSON", async () => {
  const m = (await (await fetch(`${server.url}/api/v1/updates/check?channel=stable&current_version=1.0.0`)).json()) as Record<string, unknown>;
  expect(m).toMatchObject({ update_available: true, version: "1.2.0", size: r2.size, sha256: r2.sha256, download_url: "/api/v1/images/download/1.2.0?type=update" });
  const one = (await (await fetch(`${server.url}/api/v1/updates/check?channel=stable&version=1.1.0`)).json()) as Record<string, unknown>;
  expect(one["version"]).toBe("1.1.0");
  expect((await fetch(`${server.url}/api/v1/updates/check?channel=stable&current_version=1.2.0`).then((x) => x.json())) as object).toMatchObject({ update_available: false });
  expect((await fetch(`${server.url}/api/v1/updates/check?channel=beta`)).status).toBe(404);
});

test("payloads download whole and by Range, match their sha256 and unpack to the image", async () => {
  const whole = Buffer.from(await (await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`)).arrayBuffer());
  expect(createHash("sha256").update(whole).digest("hex")).toBe(r1.sha256);
  expect(gunzipSync(whole).equals(r1.image)).toBe(true);
  const part = await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`, { headers: { range: "bytes=1000-" } });
  expect(part.status).toBe(206);
  expect(part.headers.get("content-range")).toBe(`bytes 1000-${r1.size - 1}/${r1.size}`);
  expect(Buffer.from(await part.arrayBuffer()).equals(whole.subarray(1000))).toBe(true);
});

test("gpg --verify accepts the .asc with the public key and rejects a changed payload", async () => {
  const home = await mkdtemp(join(tmpdir(), "upd-verify-"));
  try {
    const env = { ...process.env, GNUPGHOME: home };
    await writeFile(join(home, "key.asc"), key.publicKey);
    await run("gpg", ["--batch", "--import", join(home, "key.asc")], { env });
    const sig = Buffer.from(await (await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update-signature`)).arrayBuffer());
    expect(sig.toString()).toContain("-----BEGIN PGP SIGNATURE-----");
    await writeFile(join(home, "p.asc"), sig);
    const ok = await run("gpg", ["--batch", "--status-fd", "1", "--verify", join(home, "p.asc"), r1.payload], { env });
    expect(ok.stdout).toContain(`VALIDSIG ${key.fingerprint}`);
    const changed = Buffer.from(await (await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`)).arrayBuffer());
    changed[100] = changed[100]! ^ 1;
    await writeFile(join(home, "changed"), changed);
    await expect(run("gpg", ["--batch", "--verify", join(home, "p.asc"), join(home, "changed")], { env })).rejects.toMatchObject({ stderr: expect.stringContaining("BAD signature") });
  } finally {
    await rm(home, { recursive: true, force: true });
  }
});

test("faults: status codes, a flipped byte, a cut that a Range request resumes", async () => {
  server.faults.status = { code: 500, count: 1 };
  expect((await fetch(`${server.url}/api/v1/updates/check?channel=stable`)).status).toBe(500);
  expect((await fetch(`${server.url}/api/v1/updates/check?channel=stable`)).status).toBe(200);
  server.faults.flipByteAt = 10;
  const flipped = Buffer.from(await (await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`)).arrayBuffer());
  delete server.faults.flipByteAt;
  expect(flipped.length).toBe(r1.size);
  expect(createHash("sha256").update(flipped).digest("hex")).not.toBe(r1.sha256);
  server.faults.cutOnceAt = 5000;
  await expect(fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`).then((x) => x.arrayBuffer())).rejects.toThrow();
  const rest = await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`, { headers: { range: "bytes=5000-" } });
  expect(Buffer.from(await rest.arrayBuffer()).length).toBe(r1.size - 5000);
});

test("faults: a slow link serves at about the rate asked for, whole and intact", async () => {
  // At 400 kB/s the payload takes size / 400,000 seconds at least (timers only ever run late).
  server.faults.bytesPerSecond = 400_000;
  const t0 = performance.now();
  const body = Buffer.from(await (await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`)).arrayBuffer());
  const seconds = (performance.now() - t0) / 1000;
  delete server.faults.bytesPerSecond;
  expect(createHash("sha256").update(body).digest("hex")).toBe(r1.sha256);
  expect(seconds).toBeGreaterThan((r1.size / 400_000) * 0.7);
  const t1 = performance.now();
  await (await fetch(`${server.url}/api/v1/images/download/1.1.0?type=update`)).arrayBuffer();
  expect((performance.now() - t1) / 1000).toBeLessThan(seconds);
});

test("a release with an install image: the manifest carries install_image; the image downloads whole and by Range with its signature; a re-published release replaces the old", async () => {
  const img = join(dir, "piccolo-os-1.3.0.img.gz");
  await writeFile(img, Buffer.alloc(200_000, 3));
  await key.sign(img, `${img}.asc`);
  const r3 = { ...(await makeRelease(join(dir, "r"), key, "1.3.0", 100_000)), installImage: await installImageFile(img, `${img}.asc`) };
  server.add(r3);
  const m = (await (await fetch(`${server.url}/api/v1/updates/check?channel=stable&version=1.3.0`)).json()) as Record<string, unknown>;
  expect(m["install_image"]).toEqual({
    url: "/api/v1/images/download/1.3.0?type=install",
    size: 200_000,
    sha256: createHash("sha256").update(Buffer.alloc(200_000, 3)).digest("hex"),
    signature_url: "/api/v1/images/download/1.3.0?type=install-signature",
  });
  // Releases without one say nothing about it.
  expect((await (await fetch(`${server.url}/api/v1/updates/check?channel=stable&version=1.1.0`)).json()) as object).not.toHaveProperty("install_image");
  const whole = Buffer.from(await (await fetch(`${server.url}/api/v1/images/download/1.3.0?type=install`)).arrayBuffer());
  expect(whole.equals(Buffer.alloc(200_000, 3))).toBe(true);
  const part = await fetch(`${server.url}/api/v1/images/download/1.3.0?type=install`, { headers: { range: "bytes=150000-" } });
  expect(part.status).toBe(206);
  expect(part.headers.get("content-range")).toBe("bytes 150000-199999/200000");
  expect((await part.arrayBuffer()).byteLength).toBe(50_000);
  expect(await (await fetch(`${server.url}/api/v1/images/download/1.3.0?type=install-signature`)).text()).toBe(await readFile(`${img}.asc`, "utf8"));
  expect((await fetch(`${server.url}/api/v1/images/download/1.1.0?type=install`)).status).toBe(404);
  // Re-published with another image: same version, new sha256.
  await writeFile(img, Buffer.alloc(200_000, 4));
  server.add({ ...r3, installImage: await installImageFile(img, `${img}.asc`) });
  const again = (await (await fetch(`${server.url}/api/v1/updates/check?channel=stable&version=1.3.0`)).json()) as { install_image: { sha256: string } };
  expect(again.install_image.sha256).toBe(createHash("sha256").update(Buffer.alloc(200_000, 4)).digest("hex"));
  expect(((await (await fetch(`${server.url}/api/v1/updates/check?channel=stable`)).json()) as { version: string }).version).toBe("1.3.0");
});
