import { ContainerEventType, HealthStatus } from "../../../gen/piccolo/containers/v1/containers.js";
import { eventFrom, humanDuration, statsFrom } from "./convert.js";

test("stats are computed the way docker stats computes them (cgroup v1 and v2)", () => {
  const sample = {
    read: "2026-11-23T14:02:23.541Z",
    cpu_stats: { cpu_usage: { total_usage: 3_000_000_000 }, system_cpu_usage: 20_000_000_000, online_cpus: 2 },
    precpu_stats: { cpu_usage: { total_usage: 2_000_000_000 }, system_cpu_usage: 10_000_000_000 },
    memory_stats: { usage: 10_000_000, limit: 100_000_000, stats: { total_inactive_file: 2_000_000 } },
    networks: { eth0: { rx_bytes: 10, tx_bytes: 20 }, eth1: { rx_bytes: 1, tx_bytes: 2 } },
    blkio_stats: { io_service_bytes_recursive: [{ op: "Read", value: 5 }, { op: "Write", value: 7 }, { op: "read", value: 1 }] },
    pids_stats: { current: 3 },
  };
  expect(statsFrom(sample, "id1", "/web")).toEqual({
    id: "id1",
    name: "web",
    time: new Date("2026-11-23T14:02:23.541Z"),
    cpuPercent: 20,
    onlineCpus: 2,
    memoryUsageBytes: 8_000_000,
    memoryLimitBytes: 100_000_000,
    memoryPercent: 8,
    networkRxBytes: 11,
    networkTxBytes: 22,
    blockReadBytes: 6,
    blockWriteBytes: 7,
    pids: 3,
  });
  const v2 = statsFrom({ ...sample, memory_stats: { usage: 10_000_000, limit: 100_000_000, stats: { inactive_file: 4_000_000 } } }, "id1", "web");
  expect(v2.memoryUsageBytes).toBe(6_000_000);
  // A stopped container: zeros, no division by zero.
  expect(statsFrom({ read: "0001-01-01T00:00:00Z" }, "id2", "gone")).toMatchObject({ cpuPercent: 0, memoryPercent: 0, pids: 0 });
});

test("engine events become container events; other types are dropped", () => {
  const base = { Type: "container", Actor: { ID: "abc", Attributes: { name: "web", image: "app:1", "space.piccolo.managed": "true" } }, timeNano: 1_700_000_000_123_456_789 };
  expect(eventFrom({ ...base, Action: "health_status: unhealthy" })).toMatchObject({
    type: ContainerEventType.CONTAINER_EVENT_TYPE_HEALTH_STATUS,
    health: HealthStatus.HEALTH_STATUS_UNHEALTHY,
    containerName: "web",
    managed: true,
    time: new Date(1_700_000_000_123),
  });
  expect(eventFrom({ ...base, Action: "die", Actor: { ID: "abc", Attributes: { name: "web", exitCode: "137" } } })).toMatchObject({
    type: ContainerEventType.CONTAINER_EVENT_TYPE_DIE,
    exitCode: 137,
    managed: false,
  });
  expect(eventFrom({ ...base, Action: "kill", Actor: { ID: "abc", Attributes: { signal: "15" } } })?.signal).toBe("15");
  expect(eventFrom({ ...base, Action: "attach" })?.type).toBe(ContainerEventType.CONTAINER_EVENT_TYPE_UNSPECIFIED);
  expect(eventFrom({ ...base, Type: "image", Action: "pull" })).toBeUndefined();
});

test("durations read like docker ps", () => {
  expect(humanDuration(300)).toBe("Less than a second");
  expect(humanDuration(45_000)).toBe("45 seconds");
  expect(humanDuration(65_000)).toBe("About a minute");
  expect(humanDuration(3 * 3600_000)).toBe("3 hours");
  expect(humanDuration(3 * 86400_000)).toBe("3 days");
});
