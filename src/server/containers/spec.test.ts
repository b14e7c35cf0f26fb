import { mkdirSync, mkdtempSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ContainerSpec, MountType, PortProtocol, RestartPolicy } from "../../../gen/piccolo/containers/v1/containers.js";
import { loadConfig } from "../config.js";
import { PiccoloError } from "../errors.js";
import { checkHostPath, checkSpec, parseImageReference, type SpecPolicy } from "./spec.js";

const dir = mkdtempSync(join(tmpdir(), "piccolod-spec-"));
const data = join(dir, "data");
const state = join(dir, "state");
mkdirSync(join(data, "app"), { recursive: true });
mkdirSync(state);
writeFileSync(join(data, "app/file"), "x");
symlinkSync("/etc", join(data, "to-etc"));
symlinkSync(state, join(data, "to-state"));
symlinkSync(join(data, "app"), join(data, "to-app"));

const policy: SpecPolicy = {
  dataRoots: [data],
  protectedPaths: [
    { path: join(dir, "docker.sock"), holds: "the Docker engine's API" },
    { path: state, holds: "piccolod's state" },
  ],
  cpuCount: 2,
};

const spec = (s: Partial<ContainerSpec> = {}): ContainerSpec => ({
  ...ContainerSpec.create(),
  name: "app",
  image: "registry.example:5000/team/app:1.2",
  ...s,
});

async function refusal(p: Promise<unknown>): Promise<{ kind: string; field: string | undefined; message: string }> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(PiccoloError);
    const pe = e as PiccoloError;
    return { kind: pe.kind, field: pe.field, message: pe.message };
  }
  throw new Error("expected a refusal");
}

test("a full spec becomes the engine's create request, managed label added", async () => {
  const c = await checkSpec(
    spec({
      command: ["serve", "--port", "80"],
      env: { A: "1", B: "x=y" },
      labels: { team: "web" },
      ports: [
        { hostAddress: "", hostPort: 8080, containerPort: 80, protocol: PortProtocol.PORT_PROTOCOL_UNSPECIFIED },
        { hostAddress: "::1", hostPort: 0, containerPort: 53, protocol: PortProtocol.PORT_PROTOCOL_UDP },
      ],
      mounts: [
        { type: MountType.MOUNT_TYPE_BIND, source: join(data, "to-app") + "/", target: "/srv/", readOnly: true },
        { type: MountType.MOUNT_TYPE_VOLUME, source: "", target: "/cache", readOnly: false },
      ],
      restartPolicy: RestartPolicy.RESTART_POLICY_ON_FAILURE,
      restartMaxRetries: 5,
      resources: { cpus: 1.5, memoryBytes: 128 * 1024 * 1024 },
      healthcheck: { command: ["true"], interval: { seconds: 5, nanos: 0 }, timeout: undefined, retries: 2, startPeriod: undefined },
    }),
    "spec",
    policy,
  );
  expect(c.name).toBe("app");
  expect(c.body).toMatchObject({
    Image: "registry.example:5000/team/app:1.2",
    Cmd: ["serve", "--port", "80"],
    Env: ["A=1", "B=x=y"],
    Labels: { team: "web", "space.piccolo.managed": "true" },
    ExposedPorts: { "80/tcp": {}, "53/udp": {} },
    Healthcheck: { Test: ["CMD", "true"], Interval: 5e9, Retries: 2 },
    HostConfig: {
      PortBindings: { "80/tcp": [{ HostIp: "", HostPort: "8080" }], "53/udp": [{ HostIp: "::1", HostPort: "" }] },
      // The symlink is resolved: what is mounted is what was checked.
      Mounts: [
        { Type: "bind", Source: join(data, "app"), Target: "/srv", ReadOnly: true },
        { Type: "volume", Source: "", Target: "/cache", ReadOnly: false },
      ],
      RestartPolicy: { Name: "on-failure", MaximumRetryCount: 5 },
      NanoCpus: 1_500_000_000,
      Memory: 128 * 1024 * 1024,
      Privileged: false,
    },
  });
  expect(c.ports).toEqual([
    { hostAddress: "", hostPort: 8080, containerPort: 80, protocol: "tcp" },
    { hostAddress: "::1", hostPort: 0, containerPort: 53, protocol: "udp" },
  ]);
});

test.each([
  ["privileged", spec({ privileged: true }), "spec.privileged"],
  ["host PID", spec({ pidMode: "host" }), "spec.pid_mode"],
  ["host IPC", spec({ ipcMode: "host" }), "spec.ipc_mode"],
  ["odd PID mode", spec({ pidMode: "weird" }), "spec.pid_mode"],
  ["/", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/", target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["/etc/ssl", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/etc/ssl", target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["/usr via ..", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: `${data}/../../../../usr`, target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["the engine socket's folder", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: dir, target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["a symlink to /etc", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: join(data, "to-etc"), target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["a symlink to the state folder", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: join(data, "to-state"), target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["a relative path", spec({ mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "data/app", target: "/h", readOnly: true }] }), "spec.mounts[0].source"],
  ["a mount on /", spec({ mounts: [{ type: MountType.MOUNT_TYPE_VOLUME, source: "v1", target: "/", readOnly: false }] }), "spec.mounts[0].target"],
  ["an unspecified mount type", spec({ mounts: [{ type: MountType.MOUNT_TYPE_UNSPECIFIED, source: "v1", target: "/x", readOnly: false }] }), "spec.mounts[0].type"],
  ["a port twice", spec({ ports: [1, 2].map((c) => ({ hostAddress: "127.0.0.1", hostPort: 80, containerPort: c, protocol: 0 })) }), "spec.ports[1].host_port"],
  ["a port out of range", spec({ ports: [{ hostAddress: "", hostPort: 70000, containerPort: 80, protocol: 0 }] }), "spec.ports[0].host_port"],
  ["a bad host address", spec({ ports: [{ hostAddress: "localhost", hostPort: 80, containerPort: 80, protocol: 0 }] }), "spec.ports[0].host_address"],
  ["retries without on-failure", spec({ restartPolicy: RestartPolicy.RESTART_POLICY_ALWAYS, restartMaxRetries: 3 }), "spec.restart_max_retries"],
  ["an env name with =", spec({ env: { "A=B": "x" } }), 'spec.env["A=B"]'],
  ["a healthcheck without a command", spec({ healthcheck: { command: [], interval: undefined, timeout: undefined, retries: 0, startPeriod: undefined } }), "spec.healthcheck.command"],
  ["a one-character name", spec({ name: "a" }), "spec.name"],
  ["an upper-case repository", spec({ image: "Team/App:1" }), "spec.image"],
])("%s is refused as INVALID_ARGUMENT naming the field", async (_what, s, field) => {
  const r = await refusal(checkSpec(s, "spec", policy));
  expect(r).toMatchObject({ kind: "invalid_argument", field });
  expect(r.message.startsWith(`${field}: `)).toBe(true);
});

test("the reason says what the protected path holds, and where a symlink led", async () => {
  const viaLink = await refusal(checkHostPath(join(data, "to-etc"), "f", policy, "bind mounts"));
  expect(viaLink.message).toBe(`f: ${join(data, "to-etc")} leads to /etc; bind mounts of /etc are refused: it holds the host's configuration`);
  const parent = await refusal(checkHostPath(dir, "f", policy, "bind mounts"));
  expect(parent.message).toMatch(/^f: bind mounts of .* are refused: it contains .*docker\.sock, which holds the Docker engine's API$/);
  const outside = await refusal(checkHostPath("/srv/elsewhere", "f", policy, "image imports"));
  expect(outside.message).toBe(`f: /srv/elsewhere is outside the data roots (${data}); image imports must be below one of them`);
});

test("a missing bind source inside a data root is FAILED_PRECONDITION; an existing one resolves", async () => {
  expect(await refusal(checkHostPath(join(data, "nope"), "f", policy, "bind mounts"))).toMatchObject({ kind: "failed_precondition", field: "f" });
  await expect(checkHostPath(join(data, "app/file"), "f", policy, "bind mounts")).resolves.toBe(join(data, "app/file"));
});

test("image references follow the engine's grammar", () => {
  expect(parseImageReference("busybox")).toEqual({ repository: "busybox", tag: "", digest: "" });
  expect(parseImageReference("127.0.0.1:5000/multi:1")).toEqual({ repository: "127.0.0.1:5000/multi", tag: "1", digest: "" });
  expect(parseImageReference(`app@sha256:${"a".repeat(64)}`)).toEqual({ repository: "app", tag: "", digest: `sha256:${"a".repeat(64)}` });
  expect(parseImageReference(`sha256:${"b".repeat(64)}`)?.repository).toBe("sha256");
  for (const bad of ["", "UPPER", "a b", "app:", ":1", "app::1", "-app", "app:-x"]) expect(parseImageReference(bad)).toBeUndefined();
});

test("data roots are configured with containerDataRoots (flag or env); / is refused", () => {
  expect(loadConfig({ argv: [], env: {} }).containerDataRoots).toEqual(["/var/lib/piccolo/data"]);
  expect(loadConfig({ argv: ["--container-data-roots", "/srv/a,/srv/b"], env: {} }).containerDataRoots).toEqual(["/srv/a", "/srv/b"]);
  expect(loadConfig({ argv: [], env: { PICCOLOD_CONTAINER_DATA_ROOTS: "/data" } }).containerDataRoots).toEqual(["/data"]);
  expect(() => loadConfig({ argv: ["--container-data-roots", "/srv/a,/"], env: {} })).toThrow(/containerDataRoots\.1 \(from flag --container-data-roots\): "\/" cannot be a data root/);
  expect(() => loadConfig({ argv: ["--container-data-roots", "relative"], env: {} })).toThrow(/containerDataRoots\.0 .*absolute path/);
});
