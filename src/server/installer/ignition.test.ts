import { checkIgnition, encryptedGrubCfg, encryptedIgnition, generateIgnition } from "./ignition.js";

test("generated configs carry the host name and SSH keys; bad ones name the field", () => {
  expect(generateIgnition("", [])).toBeUndefined();
  const doc = JSON.parse(generateIgnition("box-1", ["ssh-ed25519 AAAAC3Nza a@b"])!) as Record<string, unknown>;
  expect(doc).toMatchObject({ ignition: { version: "3.3.0" }, passwd: { users: [{ name: "core", sshAuthorizedKeys: ["ssh-ed25519 AAAAC3Nza a@b"] }] } });
  expect(JSON.stringify(doc)).toContain("data:,box-1");
  expect(() => generateIgnition("bad_name!", [])).toThrow(/^spec.ignition_settings.hostname/);
  expect(() => generateIgnition("", ["hello"])).toThrow(/^spec.ignition_settings.ssh_authorized_keys\[0\]/);
});

test("checkIgnition accepts 3.x documents only", () => {
  expect(checkIgnition('{"ignition":{"version":"3.4.0"}}', "f")).toBeTruthy();
  expect(() => checkIgnition("{", "f")).toThrow(/^f: not JSON/);
  expect(() => checkIgnition('{"ignition":{"version":"2.2.0"}}', "f")).toThrow(/not supported/);
  expect(() => checkIgnition("[]", "f")).toThrow(/not an Ignition config/);
});

test("the encrypted wrapper merges the inner config and unlocks ROOT by UUID", () => {
  const inner = generateIgnition("box", [])!;
  const doc = JSON.parse(encryptedIgnition("1234", inner)) as { ignition: { config: { merge: { source: string }[] } } };
  const merged = Buffer.from(doc.ignition.config.merge[0]!.source.replace(/^data:;base64,/, ""), "base64").toString();
  expect(merged).toBe(inner);
  expect(decodeURIComponent(JSON.stringify(doc))).toContain("rootencrypted UUID=1234 none tpm2-device=auto");
  expect(encryptedGrubCfg("1234")).toContain("rd.luks.name=1234=rootencrypted rd.luks.options=1234=tpm2-device=auto");
});
