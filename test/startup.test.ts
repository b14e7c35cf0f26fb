/**
 * Start-up and shutdown of the real daemon: READY only after the start-up checks pass (the
 * Flatcar health gate depends on it), refusal with a clear message on bad configuration or an
 * unusable state folder, and a clean exit on SIGTERM.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { DAEMON_JS, startTestDaemon } from "./helpers/daemon.js";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "piccolod-startup-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A NOTIFY_SOCKET listener (python3: Node has no unix datagram sockets) that records each message. */
async function notifyListener(path: string): Promise<{ messages: string[]; proc: ChildProcess; waitFor(re: RegExp, ms: number): Promise<string> }> {
  const proc = spawn("python3", [
    "-c",
    "import socket,sys\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint('LISTENING',flush=True)\nwhile True:\n  print(s.recv(65536).decode().replace('\\n',' '),flush=True)",
    path,
  ]);
  const messages: string[] = [];
  let buf = "";
  const waiters: (() => void)[] = [];
  proc.stdout.on("data", (d: Buffer) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf("\n")) >= 0) {
      messages.push(buf.slice(0, i));
      buf = buf.slice(i + 1);
      waiters.splice(0).forEach((w) => w());
    }
  });
  const waitFor = async (re: RegExp, ms: number): Promise<string> => {
    const end = Date.now() + ms;
    for (;;) {
      const m = messages.find((x) => re.test(x));
      if (m) return m;
      if (Date.now() > end) throw new Error(`no notification matching ${re} in ${ms} ms; got ${JSON.stringify(messages)}`);
      await new Promise<void>((r) => {
        waiters.push(r);
        setTimeout(r, 50);
      });
    }
  };
  await waitFor(/^LISTENING$/, 5000);
  return { messages, proc, waitFor };
}

function run(args: string[], env: Record<string, string> = {}): Promise<{ code: number | null; stderr: string; stdout: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [DAEMON_JS, ...args], { env: { ...process.env, ...env } });
    let stderr = "";
    let stdout = "";
    p.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    p.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    p.on("exit", (code) => resolve({ code, stderr, stdout }));
  });
}

test("READY=1 is sent once the daemon listens, naming its endpoints", async () => {
  const sock = join(dir, "notify-ok.sock");
  const l = await notifyListener(sock);
  const d = await startTestDaemon({ env: { NOTIFY_SOCKET: sock } });
  try {
    const ready = await l.waitFor(/READY=1/, 10_000);
    expect(ready).toContain(`STATUS=serving on ${d.endpoints.socket}`);
    expect(ready).toContain(d.endpoints.grpc);
    expect(ready).toContain(`MAINPID=${d.endpoints.pid}`);
    expect(await d.stop()).toBe(0);
    await l.waitFor(/STOPPING=1/, 10_000);
    expect(existsSync(d.endpoints.socket)).toBe(false);
  } finally {
    l.proc.kill();
    await d.cleanup();
  }
});

test("an unusable state folder fails the start-up checks: exit 1, no READY", async () => {
  const sock = join(dir, "notify-bad.sock");
  const l = await notifyListener(sock);
  try {
    // A path below a regular file can never be created, not even by root.
    const r = await run(["--state-dir", "/dev/null/piccolod", "--runtime-dir", join(dir, "run-bad"), "--grpc-listen", "", "--rest-listen", ""], {
      NOTIFY_SOCKET: sock,
    });
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("state_dir_writable");
    expect(r.stderr).toContain("/dev/null/piccolod");
    await new Promise((res) => setTimeout(res, 200));
    expect(l.messages.filter((m) => m.includes("READY=1"))).toEqual([]);
  } finally {
    l.proc.kill();
  }
});

test("a bad configuration is refused with exit 2, naming each bad key and its source", async () => {
  const r = await run(["--state-dir", "relative", "--rest-listen", "nope"], { PICCOLOD_LOG_LEVEL: "chatty" });
  expect(r.code).toBe(2);
  expect(r.stderr).toContain("stateDir (from flag --state-dir): expected an absolute path");
  expect(r.stderr).toContain("restListen (from flag --rest-listen)");
  expect(r.stderr).toContain("logLevel (from env PICCOLOD_LOG_LEVEL)");
});

test("a port already in use is a clear start-up error", async () => {
  const d = await startTestDaemon();
  try {
    const port = new URL(d.endpoints.rest).port;
    const r = await run(["--state-dir", join(dir, "s2"), "--runtime-dir", join(dir, "r2"), "--grpc-listen", "", "--rest-listen", `127.0.0.1:${port}`]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/cannot listen: .*EADDRINUSE/);
  } finally {
    await d.cleanup();
  }
});
