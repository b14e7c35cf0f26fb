/** The flag parsers of `containers create|run`: what they accept, and the flag each refusal names. */
import { MountType, PortProtocol, RestartPolicy } from "../../../gen/piccolo/containers/v1/containers.js";
import { parseBind, parseMemory, parsePort, parseRestart, parseSince, parseVolume, specFromOptions, splitCommand } from "./containers.js";
import { UsageError } from "./errors.js";

test("ports: [hostaddr:]hostport:containerport[/proto], IPv6 in brackets, container port alone", () => {
  expect(parsePort("8080:80")).toEqual({ hostAddress: "", hostPort: 8080, containerPort: 80, protocol: PortProtocol.PORT_PROTOCOL_TCP });
  expect(parsePort("127.0.0.1:53:53/udp")).toEqual({ hostAddress: "127.0.0.1", hostPort: 53, containerPort: 53, protocol: PortProtocol.PORT_PROTOCOL_UDP });
  expect(parsePort("[::1]:8443:443/sctp")).toEqual({ hostAddress: "::1", hostPort: 8443, containerPort: 443, protocol: PortProtocol.PORT_PROTOCOL_SCTP });
  expect(parsePort("80")).toMatchObject({ hostPort: 0, containerPort: 80 });
  for (const bad of ["", "x:80", "8080:0", "70000:80", "1:2:3:4", "80/icmp", ":8080:80"]) {
    expect(() => parsePort(bad)).toThrow(UsageError);
    expect(() => parsePort(bad)).toThrow(/^-p /);
  }
});

test("mounts, restart, memory, since and command splitting", () => {
  expect(parseBind("/data/app:/app:ro")).toEqual({ type: MountType.MOUNT_TYPE_BIND, source: "/data/app", target: "/app", readOnly: true });
  expect(() => parseBind("data:/app")).toThrow(/^-v .*absolute/);
  expect(() => parseBind("/data:/app:rx")).toThrow(/^-v /);
  expect(parseVolume("cache:/cache")).toEqual({ type: MountType.MOUNT_TYPE_VOLUME, source: "cache", target: "/cache", readOnly: false });
  expect(() => parseVolume("/abs:/cache")).toThrow(/^--volume-name /);
  expect(parseRestart("on-failure:5")).toEqual({ restartPolicy: RestartPolicy.RESTART_POLICY_ON_FAILURE, restartMaxRetries: 5 });
  expect(parseRestart("unless-stopped").restartPolicy).toBe(RestartPolicy.RESTART_POLICY_UNLESS_STOPPED);
  expect(() => parseRestart("sometimes")).toThrow(/^--restart /);
  expect(parseMemory("512m")).toBe(512 * 1024 * 1024);
  expect(parseMemory("1.5g")).toBe(1.5 * 1024 ** 3);
  expect(parseMemory("1048576")).toBe(1048576);
  expect(() => parseMemory("0")).toThrow(/^--memory /);
  expect(() => parseMemory("lots")).toThrow(/^--memory /);
  expect(parseSince("10m", 1_000_000).getTime()).toBe(1_000_000 - 600_000);
  expect(parseSince("2024-05-01T12:00:00Z").toISOString()).toBe("2024-05-01T12:00:00.000Z");
  expect(parseSince("1700000000").getTime()).toBe(1_700_000_000_000);
  expect(() => parseSince("yesterday")).toThrow(/^--since /);
  expect(splitCommand(`sh -c "echo \\"hi\\" there" 'a b' c\\ d`)).toEqual(["sh", "-c", 'echo "hi" there', "a b", "c d"]);
  expect(splitCommand(`x ""`)).toEqual(["x", ""]);
  expect(() => splitCommand("sh -c 'x")).toThrow(/^--cmd /);
});

test("specFromOptions maps every flag onto the spec's fields", () => {
  const s = specFromOptions("web", {
    image: "app:1",
    cmd: "serve --port 80",
    env: ["A=1", "B=x=y"],
    publish: ["8080:80"],
    volume: ["/srv/data:/data"],
    volumeName: ["cache:/cache:ro"],
    restart: "always",
    cpus: "0.5",
    memory: "64m",
    label: ["tier=web"],
    network: "none",
  });
  expect(s).toMatchObject({
    name: "web",
    image: "app:1",
    command: ["serve", "--port", "80"],
    env: { A: "1", B: "x=y" },
    ports: [{ hostPort: 8080, containerPort: 80 }],
    mounts: [{ type: MountType.MOUNT_TYPE_BIND, source: "/srv/data" }, { type: MountType.MOUNT_TYPE_VOLUME, source: "cache", readOnly: true }],
    restartPolicy: RestartPolicy.RESTART_POLICY_ALWAYS,
    resources: { cpus: 0.5, memoryBytes: 64 * 1024 * 1024 },
    labels: { tier: "web" },
    network: "none",
    privileged: false,
  });
  expect(specFromOptions("x", { image: "i" }, ["sleep", "1"]).command).toEqual(["sleep", "1"]);
  expect(() => specFromOptions("x", { image: "i", cmd: "a" }, ["b"])).toThrow(/^--cmd/);
  expect(() => specFromOptions("x", { image: "i", env: ["NOEQ"] })).toThrow(/^-e /);
});
