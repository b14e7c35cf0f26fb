import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { quoteExecWord, renderAgentUnit, type AgentUnitSpec } from "./agent-service.js";

const spec = (s: Partial<AgentUnitSpec> = {}): AgentUnitSpec => ({
  name: "docs",
  image: "registry.example:5000/agent:1",
  command: ["agent", "exec", "Fix 100% of $HOME's \"typos\"\nplease"],
  secrets: ["openai_key", "gh.token"],
  credstore: "/var/lib/piccolod/credstore",
  repository: "/var/lib/piccolo/data/repo",
  mountPath: "/workspace",
  secretMountPath: "/run/secrets",
  network: "none",
  cpus: 1.5,
  memoryBytes: 512 * 1024 * 1024,
  graceSeconds: 10,
  dockerCli: process.execPath,
  dockerSocket: "/var/run/docker.sock",
  ...s,
});

test("quoteExecWord escapes specifiers, variables and quotes", () => {
  expect(quoteExecWord("plain-word")).toBe("plain-word");
  expect(quoteExecWord("100% $HOME")).toBe('"100%% $$HOME"');
  expect(quoteExecWord('say "hi"\n')).toBe('"say \\"hi\\"\\n"');
  expect(quoteExecWord("%d/x", true)).toBe("%d/x");
});

test("the unit loads each key encrypted, mounts it as a file, and is hardened", () => {
  const text = renderAgentUnit(spec());
  const lines = text.split("\n");
  expect(lines).toEqual(
    expect.arrayContaining([
      "DynamicUser=yes",
      "PrivateUsers=yes",
      "PrivateNetwork=yes",
      "DevicePolicy=closed",
      "DeviceAllow=",
      "LoadCredentialEncrypted=piccolod_openai_key:/var/lib/piccolod/credstore/openai_key",
      "LoadCredentialEncrypted=piccolod_gh.token:/var/lib/piccolod/credstore/gh.token",
    ]),
  );
  expect(text).toContain("--mount type=bind,source=%d/piccolod_openai_key,target=/run/secrets/openai_key,readonly");
  expect(text).toContain('"Fix 100%% of $$HOME\'s \\"typos\\"\\nplease"');
  expect(text).not.toMatch(/Environment=.*(KEY|TOKEN)/i);
});

test("systemd-analyze verify accepts the unit", () => {
  const dir = mkdtempSync(join(tmpdir(), "agent-unit-"));
  try {
    const cred = join(dir, "cred");
    spawnSync("mkdir", ["-p", cred]);
    for (const s of ["openai_key", "gh.token"]) writeFileSync(join(cred, s), "sealed");
    const path = join(dir, "piccolo-agent-docs.service");
    writeFileSync(path, renderAgentUnit(spec({ credstore: cred, repository: dir })));
    const r = spawnSync("systemd-analyze", ["verify", "--man=no", path], { encoding: "utf8" });
    expect(r.stderr).toBe("");
    expect(r.status).toBe(0);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
