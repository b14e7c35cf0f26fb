/**
 * The shipped single executable (flatcar/build.sh → flatcar/out/piccolod): time from exec to
 * READY=1 on NOTIFY_SOCKET (the moment systemd counts it started), and idle RSS two seconds later,
 * against a baseline measured in the same run: the same Node runtime starting a bare HTTP server
 * (exec → listening). Prints figures, ratios and targets (< 500 ms, < 80 MB); never fails on a miss.
 *
 * Usage: node dist/bench/sea.js [--binary PATH] [--runs N]
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const args = process.argv.slice(2);
if (args.includes("--help") || args.includes("-h")) {
  process.stdout.write("usage: node dist/bench/sea.js [--binary flatcar/out/piccolod] [--runs 10]   (build the binary with flatcar/build.sh)\n");
  process.exit(0);
}
const opt = (name: string, dflt: string): string => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 && args[i + 1] ? args[i + 1]! : dflt;
};
const binary = resolve(opt("binary", "flatcar/out/piccolod"));
const runs = Number(opt("runs", "10"));
if (!existsSync(binary)) {
  console.error(`no single executable at ${binary}: run flatcar/build.sh first (npm run bench:sea does)`);
  process.exit(2);
}

const rssMb = (pid: number): number => {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return m ? Number(m[1]) / 1024 : NaN;
};
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Listens on a NOTIFY_SOCKET (python3: Node has no unix datagram sockets) and reports READY. */
function notifyListener(path: string): { proc: ChildProcess; ready: Promise<number> } {
  const proc = spawn("python3", [
    "-u",
    "-c",
    "import socket,sys,time\ns=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\ns.bind(sys.argv[1])\nprint('L',flush=True)\nwhile True:\n  d=s.recv(65536).decode()\n  if 'READY=1' in d: print('R',time.monotonic_ns(),flush=True)",
    path,
  ]);
  let buf = "";
  let onReady: (t: number) => void = () => undefined;
  const ready = new Promise<number>((r) => (onReady = r));
  proc.stdout!.on("data", (d: Buffer) => {
    buf += d.toString();
    const m = /R (\d+)/.exec(buf);
    if (m) onReady(Number(BigInt(m[1]!) / 1000n) / 1000);
  });
  return { proc, ready };
}

const monotonicMs = (): number => Number(process.hrtime.bigint() / 1000n) / 1000;

async function waitFor(proc: ChildProcess, re: RegExp): Promise<void> {
  let out = "";
  await new Promise<void>((resolve, reject) => {
    proc.stdout!.on("data", (d: Buffer) => {
      out += d.toString();
      if (re.test(out)) resolve();
    });
    proc.once("exit", (c) => reject(new Error(`exited ${c}: ${out}`)));
  });
}

async function measureSea(): Promise<{ ms: number; rss: number }> {
  const dir = mkdtempSync(join(tmpdir(), "piccolo-sea-bench-"));
  const sock = join(dir, "notify.sock");
  const l = notifyListener(sock);
  await waitFor(l.proc, /^L/m);
  const t0 = monotonicMs();
  const p = spawn(binary, ["--state-dir", join(dir, "state"), "--runtime-dir", join(dir, "run"), "--grpc-listen", "127.0.0.1:0", "--rest-listen", "127.0.0.1:0", "--log-level", "warn"], {
    env: { ...process.env, NOTIFY_SOCKET: sock },
    stdio: "ignore",
  });
  const readyAt = await Promise.race([l.ready, sleep(30_000).then(() => NaN)]);
  // python's monotonic clock and Node's hrtime share CLOCK_MONOTONIC.
  const ms = readyAt - t0;
  await sleep(2000);
  const rss = rssMb(p.pid!);
  p.kill("SIGTERM");
  l.proc.kill();
  await new Promise((r) => p.once("exit", r));
  rmSync(dir, { recursive: true, force: true });
  return { ms, rss };
}

async function measureBaseline(): Promise<{ ms: number; rss: number }> {
  const t0 = monotonicMs();
  const p = spawn(process.execPath, ["-e", "require('http').createServer((q,s)=>s.end('ok')).listen(0,'127.0.0.1',()=>console.log('listening'))"], {
    stdio: ["ignore", "pipe", "ignore"],
  });
  await waitFor(p, /listening/);
  const ms = monotonicMs() - t0;
  await sleep(2000);
  const rss = rssMb(p.pid!);
  p.kill();
  await new Promise((r) => p.once("exit", r));
  return { ms, rss };
}

const sea: { ms: number; rss: number }[] = [];
const base: { ms: number; rss: number }[] = [];
for (let i = 0; i < runs; i++) {
  sea.push(await measureSea());
  base.push(await measureBaseline());
}
const seaMs = median(sea.map((r) => r.ms));
const baseMs = median(base.map((r) => r.ms));
const seaRss = median(sea.map((r) => r.rss));
const baseRss = median(base.map((r) => r.rss));
const size = readFileSync(binary).length / 1024 / 1024;
const line = (what: string, fig: string, baseline: string, ratio: number, target: string, ok: boolean) =>
  console.log(`${what.padEnd(34)} ${fig.padEnd(26)} ${baseline.padEnd(36)} ${ratio.toFixed(2).padEnd(6)} ${target.padEnd(10)} ${ok ? "PASS" : "MISS"}`);
console.log(`single executable ${binary} (${size.toFixed(1)} MiB), ${runs} runs each, node ${process.version}`);
console.log(`${"metric".padEnd(34)} ${"figure".padEnd(26)} ${"baseline (bare node http server)".padEnd(36)} ${"ratio".padEnd(6)} ${"target".padEnd(10)} result`);
line("exec → READY=1 (median)", `${seaMs.toFixed(0)} ms (max ${Math.max(...sea.map((r) => r.ms)).toFixed(0)})`, `${baseMs.toFixed(0)} ms to listening`, seaMs / baseMs, "< 500 ms", seaMs < 500);
line("idle RSS after 2 s (median)", `${seaRss.toFixed(1)} MB`, `${baseRss.toFixed(1)} MB`, seaRss / baseRss, "< 80 MB", seaRss < 80);
console.log(JSON.stringify({ bench: "piccolod-sea", runs, readyMedianMs: seaMs, readyMaxMs: Math.max(...sea.map((r) => r.ms)), idleRssMb: seaRss, baselineMs: baseMs, baselineRssMb: baseRss }));
