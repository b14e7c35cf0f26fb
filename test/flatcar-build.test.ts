/**
 * flatcar/build.sh end to end: the sysext image's tree, its extension-release, the units passing
 * systemd-analyze verify, checksums and signatures that verify, an Ignition config that
 * ignition-validate accepts and that turns public updates off, and a rebuild that leaves the same
 * set of files. The booted checks are flatcar/test-image.sh's (run by `npm test` after jest).
 */
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ROOT } from "./helpers/daemon.js";

const out = mkdtempSync(join(tmpdir(), "piccolo-flatcar-"));
const extracted = join(out, "tree");
let buildLog = "";

beforeAll(() => {
  const r = spawnSync("bash", [join(ROOT, "flatcar/build.sh"), "--out", out, "--sysext-url", "https://updates.example.test/piccolod.raw"], {
    encoding: "utf8",
    env: { ...process.env, PICCOLO_VERSION: "9.8.7" },
  });
  buildLog = r.stdout + r.stderr;
  if (r.status !== 0) throw new Error(`build.sh failed:\n${buildLog}`);
  execFileSync("unsquashfs", ["-q", "-d", extracted, join(out, "piccolod-9.8.7.raw")]);
}, 600_000);
afterAll(() => rmSync(out, { recursive: true, force: true }));

test("the sysext holds exactly the expected tree, under 80 MB", () => {
  const list = execFileSync("unsquashfs", ["-l", join(out, "piccolod-9.8.7.raw")], { encoding: "utf8" })
    .split("\n")
    .filter((l) => l.startsWith("squashfs-root/"))
    .map((l) => l.slice("squashfs-root".length));
  const files = list.filter((p) => !list.some((q) => q.startsWith(p + "/")));
  expect(files.sort()).toEqual(
    [
      "/usr/bin/piccoloctl",
      "/usr/bin/piccolod",
      "/usr/lib/extension-release.d/extension-release.piccolod",
      "/usr/lib/systemd/system/piccolod.service",
      "/usr/lib/systemd/system/update-engine.service.d/10-piccolod-dependency.conf",
      "/usr/lib/tmpfiles.d/piccolod.conf",
      "/usr/share/doc/piccolod/README.md",
      "/usr/share/doc/piccolod/keys.md",
      "/usr/share/piccolod/signing-keys.asc",
      "/usr/share/piccolod/update.conf",
    ].sort(),
  );
  expect(readFileSync(join(extracted, "usr/lib/extension-release.d/extension-release.piccolod"), "utf8")).toBe(
    "ID=flatcar\nSYSEXT_LEVEL=1.0\nARCHITECTURE=x86-64\n",
  );
  expect(statSync(join(out, "piccolod-9.8.7.raw")).size).toBeLessThan(80 * 1024 * 1024);
});

test("the single executable is both daemon and CLI and carries the build's version", () => {
  const bin = join(extracted, "usr/bin/piccolod");
  const daemon = spawnSync(bin, ["--no-such-flag", "x"], { encoding: "utf8" });
  expect(daemon.status).toBe(2);
  expect(daemon.stderr).toContain("unknown flag --no-such-flag");
  const cli = spawnSync(join(extracted, "usr/bin/piccoloctl"), ["--help"], { encoding: "utf8" });
  expect(cli.status).toBe(0);
  expect(cli.stdout).toContain("Usage: piccoloctl");
});

test("every unit passes systemd-analyze verify", () => {
  // The unit names /usr/bin/piccolod, which exists only once the sysext is merged; verify a copy
  // whose ExecStart points into the extracted tree instead (the VM test verifies the real path).
  const dir = mkdtempSync(join(tmpdir(), "piccolo-units-"));
  const unit = readFileSync(join(extracted, "usr/lib/systemd/system/piccolod.service"), "utf8").replace(
    "ExecStart=/usr/bin/piccolod",
    `ExecStart=${join(extracted, "usr/bin/piccolod")}`,
  );
  writeFileSync(join(dir, "piccolod.service"), unit);
  writeFileSync(join(dir, "update-engine.service"), "[Unit]\nDescription=stand-in\n[Service]\nExecStart=/bin/true\n");
  execFileSync("mkdir", ["-p", join(dir, "update-engine.service.d")]);
  writeFileSync(
    join(dir, "update-engine.service.d/10-piccolod-dependency.conf"),
    readFileSync(join(extracted, "usr/lib/systemd/system/update-engine.service.d/10-piccolod-dependency.conf")),
  );
  for (const u of ["piccolod.service", "update-engine.service"]) {
    const r = spawnSync("systemd-analyze", ["verify", "--man=no", join(dir, u)], {
      encoding: "utf8",
      env: { ...process.env, SYSTEMD_UNIT_PATH: `${dir}:` },
    });
    expect({ unit: u, status: r.status, stderr: r.stderr.trim() }).toEqual({ unit: u, status: 0, stderr: "" });
  }
  const show = unit;
  expect(show).toContain("Type=notify");
  expect(show).toContain("User=root");
  expect(show).toContain("Restart=always");
  expect(show).toMatch(/WatchdogSec=\d+/);
  expect(show).toContain("LoadCredentialEncrypted=");
  rmSync(dir, { recursive: true, force: true });
});

test("checksums and detached signatures verify with the signing key", () => {
  execFileSync("sha256sum", ["-c", "SHA256SUMS"], { cwd: out });
  const gnupg = mkdtempSync(join(tmpdir(), "piccolo-gpg-"));
  const env = { ...process.env, GNUPGHOME: gnupg };
  execFileSync("gpg", ["--batch", "--quiet", "--import", join(out, "signing-key.asc")], { env, stdio: "ignore" });
  for (const f of ["SHA256SUMS", "piccolod-9.8.7.raw"]) {
    const r = spawnSync("gpg", ["--batch", "--verify", join(out, `${f}.asc`), join(out, f)], { env, encoding: "utf8" });
    expect({ f, status: r.status }).toEqual({ f, status: 0 });
    expect(r.stderr).toContain("Good signature");
  }
  // One flipped byte is caught.
  const copy = join(gnupg, "tampered.raw");
  const bytes = readFileSync(join(out, "piccolod-9.8.7.raw"));
  bytes[1000] = bytes[1000]! ^ 0xff;
  writeFileSync(copy, bytes);
  expect(spawnSync("gpg", ["--batch", "--verify", join(out, "piccolod-9.8.7.raw.asc"), copy], { env }).status).not.toBe(0);
  rmSync(gnupg, { recursive: true, force: true });
});

test("the sysext ships the public key that signed the build, where signingKeyFiles points by default", () => {
  const shipped = readFileSync(join(extracted, "usr/share/piccolod/signing-keys.asc"), "utf8");
  expect(shipped).toContain("-----BEGIN PGP PUBLIC KEY BLOCK-----");
  expect(shipped).not.toContain("PRIVATE KEY");
  expect(shipped).toBe(readFileSync(join(out, "signing-key.asc"), "utf8"));
  // gpgv with only the shipped key accepts the build's signatures.
  const home = mkdtempSync(join(tmpdir(), "piccolo-gpgv-"));
  const keyring = join(home, "shipped.gpg");
  execFileSync("gpg", ["--homedir", home, "--batch", "--dearmor", "--output", keyring, join(extracted, "usr/share/piccolod/signing-keys.asc")]);
  const r = spawnSync("gpgv", ["--homedir", home, "--keyring", keyring, join(out, "SHA256SUMS.asc"), join(out, "SHA256SUMS")], { encoding: "utf8" });
  expect({ status: r.status, stderr: r.stderr }).toMatchObject({ status: 0, stderr: expect.stringContaining("Good signature") });
  rmSync(home, { recursive: true, force: true });
});

test("the Ignition config installs the sysext, enables the service and turns public updates off", () => {
  const ign = JSON.parse(readFileSync(join(out, "piccolod.ign"), "utf8"));
  expect(spawnSync("ignition-validate", [join(out, "piccolod.ign")]).status).toBe(0);
  const files = Object.fromEntries(ign.storage.files.map((f: { path: string }) => [f.path, f]));
  const sysext = files["/opt/extensions/piccolod/piccolod-9.8.7.raw"];
  expect(sysext.contents.source).toBe("https://updates.example.test/piccolod.raw");
  const sha512 = execFileSync("sha512sum", [join(out, "piccolod-9.8.7.raw")], { encoding: "utf8" }).split(" ")[0];
  expect(sysext.contents.verification.hash).toBe(`sha512-${sha512}`);
  const conf = Buffer.from(files["/etc/flatcar/update.conf"].contents.source.split(",")[1], "base64").toString();
  expect(conf).toMatch(/^GROUP=disabled$/m);
  expect(conf).toMatch(/^SERVER=disabled$/m);
  expect(ign.storage.links).toEqual([{ path: "/etc/extensions/piccolod.raw", target: "/opt/extensions/piccolod/piccolod-9.8.7.raw", hard: false }]);
  expect(ign.systemd.units).toEqual(
    expect.arrayContaining([{ name: "piccolod.service", enabled: true }, { name: "systemd-sysext.service", enabled: true }]),
  );
});

test("the scripts are shellcheck-clean and have a real --help", () => {
  const scripts = ["flatcar/build.sh", "flatcar/test-image.sh", "flatcar/place-keys.sh", "flatcar/vm/guest-test.sh"];
  const sc = spawnSync("shellcheck", ["-x", ...scripts], { cwd: ROOT, encoding: "utf8" });
  expect(sc.stdout + sc.stderr).toBe("");
  for (const s of scripts.slice(0, 3)) {
    const r = spawnSync("bash", [join(ROOT, s), "--help"], { encoding: "utf8" });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/^Usage: flatcar\//);
  }
});

test("a rebuild into the same folder leaves the same set of files", () => {
  const before = readdirSync(out).filter((f) => f !== "tree").sort();
  const r = spawnSync("bash", [join(ROOT, "flatcar/build.sh"), "--out", out], { encoding: "utf8", env: { ...process.env, PICCOLO_VERSION: "9.8.7" } });
  expect(r.status).toBe(0);
  expect(readdirSync(out).filter((f) => f !== "tree").sort()).toEqual(before);
  execFileSync("sha256sum", ["-c", "SHA256SUMS"], { cwd: out });
}, 600_000);
