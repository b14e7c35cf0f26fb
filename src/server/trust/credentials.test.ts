import { spawnSync } from "node:child_process";
import { mkdtemp, readFile, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { startSwtpm, type Swtpm } from "../../../test/helpers/swtpm.js";
import { PiccoloError } from "../errors.js";
import { CredentialStore, flushTpmContexts } from "./credentials.js";

describe("CredentialStore (systemd-creds on a real swtpm)", () => {
  let tpm: Swtpm;
  let dir: string;
  let store: CredentialStore;

  beforeAll(async () => {
    tpm = await startSwtpm();
    dir = await mkdtemp(join(tmpdir(), "piccolo-creds-"));
    store = new CredentialStore({ dir: join(dir, "credstore"), tpm2Device: tpm.tcti, tpmDevices: [] });
  }, 30_000);
  afterAll(async () => {
    await tpm?.cleanup();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("seals to the TPM, and systemd-creds itself decrypts it under the embedded name", async () => {
    const info = await store.seal("api-key", Buffer.from("s3cret-value\n"));
    expect(info.sealedWith).toBe("tpm2");
    expect(info.credentialName).toBe("piccolod_api-key");
    const onDisk = await readFile(info.path);
    expect(onDisk.includes(Buffer.from("s3cret-value"))).toBe(false);
    const r = spawnSync("systemd-creds", ["decrypt", "--name=piccolod_api-key", `--tpm2-device=${tpm.tcti}`, info.path, "-"], { encoding: "utf8" });
    expect(r.stderr).not.toMatch(/failed/i);
    expect(r.stdout).toBe("s3cret-value\n");
    await flushTpmContexts(tpm.tcti);
    expect((await store.unseal("api-key")).toString()).toBe("s3cret-value\n");
    // Only sealed files in the folder systemd loads: metadata and temporary files live beside it.
    expect(await readdir(join(dir, "credstore"))).toEqual(["api-key"]);
  }, 60_000);

  it("lists names and keys, never values; replaces and deletes", async () => {
    await store.seal("b-secret", Buffer.from("one"));
    await store.seal("b-secret", Buffer.from("two"));
    expect((await store.unseal("b-secret")).toString()).toBe("two");
    const list = await store.list();
    expect(list.map((i) => i.name)).toEqual(["api-key", "b-secret"]);
    expect(JSON.stringify(list)).not.toContain("two");
    expect(await store.remove("b-secret")).toBe(true);
    expect(await store.remove("b-secret")).toBe(false);
    await expect(store.unseal("b-secret")).rejects.toMatchObject({ kind: "not_found" });
  }, 60_000);

  it("refuses a sealed file with one flipped byte with a clear error", async () => {
    const info = await store.seal("flip", Buffer.from("value"));
    const bytes = await readFile(info.path);
    bytes[bytes.length - 20] = bytes[bytes.length - 20]! ^ 0x01;
    await writeFile(info.path, bytes);
    const err = await store.unseal("flip").catch((e: unknown) => e);
    expect(err).toBeInstanceOf(PiccoloError);
    expect((err as PiccoloError).message).toMatch(/secret flip .* could not be unsealed: .+/);
  }, 60_000);

  it("refuses bad names and empty values before running anything", async () => {
    await expect(store.seal("../etc/passwd", Buffer.from("x"))).rejects.toMatchObject({ kind: "invalid_argument", field: "name" });
    await expect(store.seal("ok", Buffer.alloc(0))).rejects.toMatchObject({ kind: "invalid_argument", field: "value" });
    expect(await store.has("ok")).toBe(false);
  });

  it("falls back to the host key only when there is no TPM, and says so", async () => {
    const noTpm = new CredentialStore({ dir: join(dir, "host-only"), tpm2Device: "auto", tpmDevices: [join(dir, "no-such-tpm")] });
    expect(await noTpm.tpmAvailable()).toBe(false);
    const info = await noTpm.seal("host-secret", Buffer.from("hv"));
    expect(info.sealedWith).toBe("host");
    expect((await noTpm.unseal("host-secret")).toString()).toBe("hv");
  }, 60_000);
});
