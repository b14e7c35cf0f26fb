/**
 * A real Docker engine for tests, benchmarks and the demo: Debian's dockerd on a private socket,
 * data root and exec root in a temporary folder (no iptables, no bridge: containers use network
 * "none" or "host"), plus the docker CLI pointed at it as an independent client, busybox images
 * made with `docker import`, a local docker-registry on 127.0.0.1, and a bandwidth-limited TCP
 * proxy to make pulls slow enough to interrupt.
 *
 * Everything started here is stopped by its pid: stop() removes the containers, stops dockerd
 * (and any containerd shim it left), unmounts what is left below the folder; cleanup() also
 * removes the folder.
 *
 * From a shell (for the demo): `node dist/test/helpers/dockerd.js [--dir DIR]` (after
 * `npm run build`) or `npx tsx test/helpers/dockerd.ts [--dir DIR]` starts one, prints its socket
 * as JSON, and stops it on SIGINT/SIGTERM.
 */
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readdirSync, readFileSync, realpathSync } from "node:fs";
import { copyFile, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from "node:fs/promises";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** The docker CLI's answer. */
export interface CliResult {
  readonly code: number;
  readonly stdout: string;
  readonly stderr: string;
}

/** A running test engine. */
export interface TestDockerd {
  /** The temporary folder holding everything. */
  readonly dir: string;
  /** The engine's unix socket. */
  readonly socket: string;
  /** dockerd's pid (changes on restart). */
  readonly pid: number;
  /** Runs the docker CLI against this engine. */
  docker(args: readonly string[], options?: { input?: Buffer | string; timeoutMs?: number }): Promise<CliResult>;
  /** Runs the docker CLI and returns stdout; throws with stderr when it fails. */
  dockerOk(args: readonly string[], options?: { input?: Buffer | string; timeoutMs?: number }): Promise<string>;
  /** `docker ps -a` as objects (one per container, Docker's JSON format). */
  ps(): Promise<Record<string, string>[]>;
  /** `docker images` as objects. */
  images(): Promise<Record<string, string>[]>;
  /** Makes a busybox image with `docker import` (plus files, and CMD). */
  makeImage(tag: string, options?: { files?: Readonly<Record<string, string | Buffer>>; cmd?: readonly string[] }): Promise<void>;
  /** Writes a busybox root filesystem tarball (as `docker import` takes it) to `path`. */
  writeRootfsTar(path: string, options?: { files?: Readonly<Record<string, string | Buffer>> }): Promise<void>;
  /** SIGKILLs dockerd (its containerd dies with it; container shims may linger until restart). */
  kill9(): Promise<void>;
  /** Starts dockerd again on the same folder and socket. */
  restart(): Promise<void>;
  /** Whether dockerd runs. */
  running(): boolean;
  /** Removes every container, stops dockerd and whatever it left running, unmounts below the folder. */
  stop(): Promise<void>;
  /** stop(), then removes the folder. */
  cleanup(): Promise<void>;
}

/** A running docker-registry. */
export interface TestRegistry {
  /** "127.0.0.1:PORT", the registry part of image references. */
  readonly address: string;
  stop(): Promise<void>;
}

/** A TCP proxy that forwards to a port at a limited rate. */
export interface ThrottledProxy {
  readonly port: number;
  stop(): Promise<void>;
}

const DOCKERD = process.env["PICCOLO_TEST_DOCKERD"] ?? "dockerd";
const DOCKER = process.env["PICCOLO_TEST_DOCKER"] ?? "docker";
/** The first executable `name` on PATH (a static busybox gets copied into images, so a path is needed). */
function onPath(name: string): string {
  for (const d of (process.env["PATH"] ?? "").split(":")) {
    if (d && existsSync(join(d, name))) return join(d, name);
  }
  return name;
}
const BUSYBOX = process.env["PICCOLO_TEST_BUSYBOX"] ?? onPath("busybox");

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Runs a command and collects its output (never throws for a non-zero exit). */
export function run(cmd: string, args: readonly string[], options: { input?: Buffer | string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const p = execFile(cmd, args, { env: options.env ?? process.env, maxBuffer: 256 * 1024 * 1024, timeout: options.timeoutMs ?? 120_000, encoding: "utf8" }, (err, stdout, stderr) => {
      if (err && typeof (err as NodeJS.ErrnoException).code === "string") {
        reject(new Error(`${cmd} could not run: ${err.message}`));
        return;
      }
      resolve({ code: err ? ((err as { code?: number }).code ?? 1) : 0, stdout, stderr });
    });
    if (options.input !== undefined) p.stdin!.end(options.input);
    else p.stdin!.end();
  });
}

/** Resolves when GET /_ping on the socket answers OK. */
function ping(socket: string, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const req = http.get({ socketPath: socket, path: "/_ping", timeout: timeoutMs }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on("error", () => resolve(false));
    req.on("timeout", () => {
      req.destroy();
      resolve(false);
    });
  });
}

/** Pids of processes whose command line mentions `needle` (what a dockerd left behind). */
function processesMentioning(needle: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e) || Number(e) === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${e}/cmdline`, "utf8");
      if (cmd.includes(needle)) out.push(Number(e));
    } catch {
      // gone
    }
  }
  return out;
}

/** Children of a process (from /proc/<pid>/task/<pid>/children when the kernel offers it, else by scanning). */
function childrenOf(pid: number): number[] {
  const out: number[] = [];
  for (const e of readdirSync("/proc")) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === pid) out.push(Number(e));
    } catch {
      // gone
    }
  }
  return out;
}

function killTree(pid: number): void {
  for (const c of childrenOf(pid)) killTree(c);
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    // gone
  }
}

/** Unmounts every mount point below `dir`, deepest first (what a killed dockerd leaves mounted). */
async function unmountBelow(dir: string): Promise<void> {
  const points = readFileSync("/proc/self/mountinfo", "utf8")
    .split("\n")
    .map((l) => l.split(" ")[4] ?? "")
    .map((p) => p.replace(/\\040/g, " "))
    .filter((p) => p === dir || p.startsWith(dir + "/"))
    .sort((a, b) => b.length - a.length);
  for (const p of points) await run("umount", ["-l", p]).catch(() => undefined);
}

/** busybox applets, linked into /bin of a test root filesystem. */
let applets: string[] | undefined;
async function busyboxApplets(): Promise<string[]> {
  if (!applets) {
    // A dynamically linked busybox (Debian's "busybox") would not run inside a bare image.
    if (readFileSync(BUSYBOX).subarray(0, 64 * 1024).includes("ld-linux")) {
      throw new Error(`${BUSYBOX} is dynamically linked: install busybox-static (or set PICCOLO_TEST_BUSYBOX)`);
    }
    const r = await run(BUSYBOX, ["--list"]);
    if (r.code !== 0) throw new Error(`${BUSYBOX} --list failed: ${r.stderr}`);
    applets = r.stdout.split("\n").filter((a) => /^[a-z0-9_.[-]+$/.test(a) && a !== "busybox");
  }
  return applets;
}

/** Starts a dockerd on a private socket in a new temporary folder (or `options.dir`). */
export async function startDockerd(options: { dir?: string } = {}): Promise<TestDockerd> {
  // Unix socket paths are limited to 108 bytes: keep the folder short.
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), "pdk-")));
  await mkdir(dir, { recursive: true });
  const socket = join(dir, "docker.sock");
  const cliConfig = join(dir, "cli");
  await mkdir(cliConfig, { recursive: true });
  // The classic builder: this engine has no BuildKit, and the API builds the same way.
  const cliEnv = { ...process.env, DOCKER_CONFIG: cliConfig, DOCKER_HOST: `unix://${socket}`, DOCKER_CLI_HINTS: "false", DOCKER_BUILDKIT: "0" };
  let proc: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();

  const launch = async (): Promise<void> => {
    const log = openSync(join(dir, "dockerd.log"), "a");
    const p = spawn(
      DOCKERD,
      [
        "--data-root", join(dir, "data"),
        "--exec-root", join(dir, "exec"),
        "-H", `unix://${socket}`,
        "--pidfile", join(dir, "docker.pid"),
        "--iptables=false",
        "--ip-masq=false",
        "--bridge=none",
        // Containers here ignore SIGTERM (a shell as PID 1): do not wait long for them on shutdown.
        "--shutdown-timeout=2",
      ],
      { stdio: ["ignore", log, log], detached: true },
    );
    closeSync(log);
    proc = p;
    exited = new Promise((resolve) => p.once("exit", () => resolve()));
    const started = Date.now();
    for (;;) {
      if (p.exitCode !== null || p.signalCode !== null) {
        const tail = readFileSync(join(dir, "dockerd.log"), "utf8").split("\n").slice(-15).join("\n");
        throw new Error(`dockerd exited (${p.exitCode ?? p.signalCode}) before it answered:\n${tail}`);
      }
      if (await ping(socket, 500)) return;
      if (Date.now() - started > 60_000) throw new Error(`dockerd did not answer on ${socket} within 60 s`);
      await sleep(100);
    }
  };

  const isRunning = (): boolean => proc !== undefined && proc.exitCode === null && proc.signalCode === null;

  const files = async (root: string, extra: Readonly<Record<string, string | Buffer>> = {}): Promise<void> => {
    await mkdir(join(root, "bin"), { recursive: true });
    await copyFile(BUSYBOX, join(root, "bin/busybox"));
    await Promise.all((await busyboxApplets()).map((a) => symlink("busybox", join(root, "bin", a)).catch(() => undefined)));
    for (const d of ["tmp", "etc", "proc", "sys", "dev"]) await mkdir(join(root, d), { recursive: true });
    for (const [path, content] of Object.entries(extra)) {
      await mkdir(dirname(join(root, path)), { recursive: true });
      await writeFile(join(root, path), content);
    }
  };

  const d: TestDockerd = {
    dir,
    socket,
    get pid() {
      return proc?.pid ?? 0;
    },
    docker(args, o = {}) {
      return run(DOCKER, args, { env: cliEnv, input: o.input, timeoutMs: o.timeoutMs });
    },
    async dockerOk(args, o = {}) {
      const r = await d.docker(args, o);
      if (r.code !== 0) throw new Error(`docker ${args.join(" ")} failed (${r.code}): ${r.stderr.trim()}`);
      return r.stdout;
    },
    async ps() {
      const out = await d.dockerOk(["ps", "-a", "--no-trunc", "--format", "{{json .}}"]);
      return out.split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, string>);
    },
    async images() {
      const out = await d.dockerOk(["images", "--no-trunc", "--format", "{{json .}}"]);
      return out.split("\n").filter(Boolean).map((l) => JSON.parse(l) as Record<string, string>);
    },
    async writeRootfsTar(path, o = {}) {
      const root = await mkdtemp(join(dir, "rootfs-"));
      try {
        await files(root, o.files);
        const r = await run("tar", ["-C", root, "-cf", path, "."]);
        if (r.code !== 0) throw new Error(`tar failed: ${r.stderr}`);
      } finally {
        await rm(root, { recursive: true, force: true });
      }
    },
    async makeImage(tag, o = {}) {
      const tar = join(dir, `rootfs-${process.pid}-${Date.now()}.tar`);
      try {
        await d.writeRootfsTar(tar, o);
        const cmd = o.cmd ?? ["sh"];
        await d.dockerOk(["import", "--change", `CMD ${JSON.stringify(cmd)}`, tar, tag]);
      } finally {
        await rm(tar, { force: true });
      }
    },
    async kill9() {
      if (!isRunning()) return;
      proc!.kill("SIGKILL");
      await exited;
      // Its containerd dies with it, but where PID 1 does not reap orphans it stays a zombie,
      // and the next dockerd would take the zombie's pid file for a live containerd and wait
      // for it forever: make sure it is gone and drop the pid file, as a real host's init would.
      for (const pid of processesMentioning(join(dir, "exec", "containerd", "containerd.toml"))) killTree(pid);
      await rm(join(dir, "exec", "containerd", "containerd.pid"), { force: true });
    },
    async restart() {
      if (isRunning()) throw new Error("dockerd is running");
      await launch();
    },
    running: isRunning,
    async stop() {
      // A killed engine left containers behind: a fresh start cleans them up, then remove them all.
      if (!isRunning()) await launch().catch(() => undefined);
      if (isRunning()) {
        const ids = (await d.docker(["ps", "-aq"])).stdout.split("\n").filter(Boolean);
        if (ids.length > 0) await d.docker(["rm", "-f", "-v", ...ids], { timeoutMs: 60_000 });
        proc!.kill("SIGTERM");
        const timer = setTimeout(() => proc?.kill("SIGKILL"), 20_000);
        await exited;
        clearTimeout(timer);
      }
      // Whatever still mentions the folder (a containerd or shim of a killed engine) is ours.
      for (const pid of processesMentioning(dir)) killTree(pid);
      await unmountBelow(dir);
    },
    async cleanup() {
      await d.stop();
      await rm(dir, { recursive: true, force: true }).catch(async () => {
        await unmountBelow(dir);
        await rm(dir, { recursive: true, force: true });
      });
    },
  };
  await launch();
  return d;
}

/** A free TCP port on 127.0.0.1 (closed again; taken by the caller right away). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

/** Starts Debian's docker-registry on 127.0.0.1 with its storage in `dir`. */
export async function startRegistry(dir: string): Promise<TestRegistry> {
  await mkdir(join(dir, "storage"), { recursive: true });
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const cfg = join(dir, "config.yml");
    await writeFile(
      cfg,
      [
        "version: 0.1",
        "log:",
        "  level: warn",
        "storage:",
        "  filesystem:",
        `    rootdirectory: ${join(dir, "storage")}`,
        "  delete:",
        "    enabled: true",
        "http:",
        `  addr: 127.0.0.1:${port}`,
        "",
      ].join("\n"),
    );
    const log = openSync(join(dir, "registry.log"), "a");
    const p = spawn("docker-registry", ["serve", cfg], { stdio: ["ignore", log, log], detached: true });
    closeSync(log);
    const exited = new Promise<void>((r) => p.once("exit", () => r()));
    const started = Date.now();
    let up = false;
    while (Date.now() - started < 15_000 && p.exitCode === null) {
      up = await fetch(`http://127.0.0.1:${port}/v2/`).then((r) => r.ok, () => false);
      if (up) break;
      await sleep(100);
    }
    if (up) {
      return {
        address: `127.0.0.1:${port}`,
        async stop() {
          if (p.exitCode === null && p.signalCode === null) p.kill("SIGTERM");
          await exited;
        },
      };
    }
    p.kill("SIGKILL");
    await exited;
    if (attempt >= 2) throw new Error(`docker-registry did not start: ${await readFile(join(dir, "registry.log"), "utf8")}`);
  }
}

/**
 * A TCP proxy on 127.0.0.1 to `targetPort` whose answers flow at about `bytesPerSecond` in all
 * (so a pull through it takes a predictable time); requests flow unthrottled.
 */
export async function startThrottledProxy(targetPort: number, bytesPerSecond: number): Promise<ThrottledProxy> {
  const sockets = new Set<net.Socket>();
  // One budget for all connections, refilled every 20 ms.
  let budget = 0;
  const waiting: (() => void)[] = [];
  const tick = setInterval(() => {
    budget = bytesPerSecond / 50;
    while (budget > 0 && waiting.length > 0) waiting.shift()!();
  }, 20);
  const take = async (n: number): Promise<void> => {
    while (budget <= 0) await new Promise<void>((r) => waiting.push(r));
    budget -= n;
  };
  const server = net.createServer((client) => {
    const upstream = net.connect(targetPort, "127.0.0.1");
    sockets.add(client).add(upstream);
    client.pipe(upstream);
    // Answers are written in order through one chain, and the client is only ended once all of
    // it went out: ending it early would cut the transfer short.
    let pending = Promise.resolve();
    upstream.on("data", (chunk: Buffer) => {
      upstream.pause();
      pending = pending
        .then(async () => {
          for (let off = 0; off < chunk.length; off += 16 * 1024) {
            const part = chunk.subarray(off, off + 16 * 1024);
            await take(part.length);
            if (client.destroyed) return;
            client.write(part);
          }
        })
        .then(() => {
          upstream.resume();
        });
    });
    const finish = (): void => {
      pending = pending.then(() => {
        client.end();
      });
    };
    upstream.on("end", finish);
    upstream.on("close", finish);
    upstream.on("error", finish);
    client.on("error", () => upstream.destroy());
    client.on("close", () => {
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    port: (server.address() as net.AddressInfo).port,
    async stop() {
      clearInterval(tick);
      for (const s of sockets) s.destroy();
      while (waiting.length > 0) waiting.shift()!();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

// Run from a shell: start one and keep it until SIGINT/SIGTERM.
const isMain = process.argv[1] !== undefined && fileURLToPath(import.meta.url) === realpathSync(process.argv[1]);

if (isMain) {
  const args = process.argv.slice(2);
  if (args.includes("--help") || args.includes("-h")) {
    process.stdout.write(
      "usage: dockerd.js [--dir DIR]\n  Starts a private dockerd (socket DIR/docker.sock), prints {socket, pid, dir} as JSON,\n  and stops it (removing its containers) on SIGINT or SIGTERM. Without --dir a temporary\n  folder is used and removed at the end.\n",
    );
    process.exit(0);
  }
  const i = args.indexOf("--dir");
  const dir = i >= 0 ? args[i + 1] : undefined;
  if (i >= 0 && !dir) {
    process.stderr.write("--dir needs a value\n");
    process.exit(2);
  }
  if (dir) mkdirSync(dir, { recursive: true });
  const d = await startDockerd({ dir });
  process.stdout.write(JSON.stringify({ socket: d.socket, pid: d.pid, dir: d.dir }) + "\n");
  let stopping = false;
  const stop = (): void => {
    if (stopping) return;
    stopping = true;
    void (dir ? d.stop() : d.cleanup()).then(() => process.exit(0));
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}
