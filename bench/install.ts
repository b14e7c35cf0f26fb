/**
 * Installer benchmark, in one run (`npm run build`, then `node dist/bench/install.js`; root, with
 * gdisk and gnupg installed): a signed, Flatcar-shaped raw image of 1 GiB and of 4 GiB (random
 * bytes, so nothing is sparse) is installed onto a file target through the real daemon, and the
 * same image is copied with `dd if=… of=… bs=4M conv=fsync` followed by `sha256sum` of the copy.
 *
 * Printed per size:
 *  - dd alone and dd + sha256sum, in MiB/s of image;
 *  - the install's write phase (decompress-less streaming write with hashing and progress
 *    overlapped, ending with the fsync), in MiB/s, and its ratio to dd alone: target ≥ 0.95;
 *  - the whole install (verify signature and hash, write, read back, partition, commit) against
 *    dd + sha256sum, as a detail.
 * A MISS is printed, never an exit status. Free space is checked with df before an image is made,
 * and every file is removed at the end (also on SIGINT/SIGTERM).
 *
 * Each size runs `--rounds` rounds (3 by default), dd first in odd rounds and the install first
 * in even ones, with the source read into the page cache before each run; the figures are
 * medians, and every run's time is printed too.
 *
 * Every timed run starts after the same pause (--settle-s, 30 s; see settle()).
 *
 * Options (flags or env): --sizes-mib 1024,4096 (BENCH_INSTALL_SIZES_MIB), --rounds 3
 * (BENCH_INSTALL_ROUNDS), --settle-s 30.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { open, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { InstallRequest, PlanInstallRequest } from "../gen/piccolo/installer/v1/installer.js";
import { OperationState, type OperationEvent } from "../gen/piccolo/operations/v1/operations.js";
import { createGrpcClients } from "../src/clients/grpc-client.js";
import { buildFlatcarImage, makeSigningKey, sparseTarget } from "../test/helpers/flatcar-image.js";

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "../..");
const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
const MiB = 1024 * 1024;

function parseArgs(argv: readonly string[]): { sizes: number[]; rounds: number } {
  let v = process.env["BENCH_INSTALL_SIZES_MIB"] ?? "1024,4096";
  let rounds = Number(process.env["BENCH_INSTALL_ROUNDS"] ?? 3);
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--help" || argv[i] === "-h") {
      process.stdout.write("usage: node dist/bench/install.js [--sizes-mib 1024,4096] [--rounds 3] [--settle-s 30]\n");
      process.exit(0);
    }
    if (argv[i] === "--sizes-mib") v = argv[++i] ?? "";
    if (argv[i] === "--rounds") rounds = Number(argv[++i]);
    if (argv[i] === "--settle-s") settleSeconds = Number(argv[++i]);
  }
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds: a whole number ≥ 1, got ${rounds}`);
  if (!(settleSeconds >= 0)) throw new Error(`--settle-s: seconds ≥ 0, got ${settleSeconds}`);
  const sizes = v.split(",").map(Number);
  if (sizes.some((n) => !Number.isInteger(n) || n < 64)) throw new Error(`--sizes-mib: whole numbers ≥ 64, got ${v}`);
  return { sizes, rounds };
}

/** Free bytes on the filesystem holding `dir`, from df. */
function freeBytes(dir: string): number {
  const out = spawnSync("df", ["-B1", "--output=avail", dir], { encoding: "utf8" }).stdout.trim().split("\n").pop() ?? "0";
  return Number(out);
}

const median = (xs: readonly number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
};

let settleSeconds = 30;
/**
 * Waits before a timed run. On a VM with free page reporting (virtio-balloon, as this project's
 * machines have) memory freed by deleting the previous run's output goes back to the host over the
 * next seconds, and writing into it again faults it back in page by page. dd of 1 GiB started right
 * after a delete took 0.5 s, after 5 s 1.6 s; dd of 4 GiB took 4.4 s after 5 s and 10.4 s after
 * 25 s (the host takes back 4 GiB more slowly). The install writes seconds after its start (the
 * verify phase comes first), so a short pause favoured dd; after 30 s both sides write into memory
 * the host has taken back.
 */
function settle(): void {
  if (settleSeconds > 0) spawnSync("sleep", [String(settleSeconds)]);
}

/** Reads a file once so that both sides start with the source in the page cache. */
function warm(path: string): void {
  spawnSync("cat", [path], { stdio: ["ignore", "ignore", "ignore"] });
}

function timed(cmd: string, args: string[]): number {
  const t = performance.now();
  const r = spawnSync(cmd, args, { stdio: ["ignore", "ignore", "pipe"], encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} failed: ${r.stderr}`);
  return (performance.now() - t) / 1000;
}

/** Random bytes over everything but the first and last MiB (the GPT stays valid). */
async function fillRandom(path: string, bytes: number): Promise<string> {
  const fh = await open(path, "r+");
  const buf = Buffer.alloc(4 * MiB);
  try {
    for (let o = MiB; o < bytes - MiB; o += buf.length) {
      const n = Math.min(buf.length, bytes - MiB - o);
      randomFillSync(buf, 0, n);
      await fh.write(buf, 0, n, o);
    }
  } finally {
    await fh.close();
  }
  const h = createHash("sha256");
  const fr = await open(path, "r");
  for await (const c of fr.createReadStream({ highWaterMark: 4 * MiB })) h.update(c as Buffer);
  return h.digest("hex");
}

async function startDaemon(dir: string, images: string, targets: string, keyring: string): Promise<{ proc: ChildProcess; socket: string }> {
  const socket = join(dir, "run/piccolod.sock");
  const proc = spawn(process.execPath, [
    DAEMON_JS,
    "--state-dir", join(dir, "state"),
    "--runtime-dir", join(dir, "run"),
    "--grpc-listen", "",
    "--rest-listen", "",
    "--log-level", "warn",
    "--installer-image-dirs", images,
    "--installer-file-target-dirs", targets,
    "--signing-key-files", keyring,
    "--installer-min-disk-bytes", "0",
  ], { stdio: ["ignore", "ignore", "inherit"], env: { ...process.env, NOTIFY_SOCKET: "" } });
  for (let i = 0; i < 400; i++) {
    if (existsSync(join(dir, "run/endpoints.json"))) {
      const ep = JSON.parse(await readFile(join(dir, "run/endpoints.json"), "utf8")) as { pid: number };
      if (ep.pid === proc.pid) return { proc, socket };
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error("piccolod did not start");
}

const mibps = (bytes: number, s: number): string => `${(bytes / MiB / s).toFixed(0)} MiB/s`;

async function main(): Promise<void> {
  const { sizes, rounds } = parseArgs(process.argv.slice(2));
  if (!existsSync(DAEMON_JS)) throw new Error(`${DAEMON_JS} is missing: npm run build first`);
  const dir = mkdtempSync(join(tmpdir(), "piccolo-bench-install-"));
  const images = join(dir, "images");
  const targets = join(dir, "targets");
  spawnSync("mkdir", ["-p", images, targets]);
  const key = makeSigningKey("Piccolo Bench");
  let daemon: ChildProcess | undefined;
  const cleanup = (): void => {
    daemon?.kill("SIGKILL");
    key.cleanup();
    rmSync(dir, { recursive: true, force: true });
  };
  process.once("SIGINT", () => (cleanup(), process.exit(130)));
  process.once("SIGTERM", () => (cleanup(), process.exit(143)));
  try {
    const d = await startDaemon(dir, images, targets, key.keyring);
    daemon = d.proc;
    const api = createGrpcClients({ endpoint: `unix://${d.socket}` });
    console.log("installer benchmark: Install (file target, raw image) vs dd bs=4M conv=fsync + sha256sum, same run");
    for (const sizeMib of sizes) {
      const bytes = sizeMib * MiB;
      const need = bytes * 3 + 512 * MiB;
      if (freeBytes(dir) < need) {
        console.log(`${sizeMib} MiB: SKIPPED, df shows less than ${(need / 2 ** 30).toFixed(1)} GiB free in ${dir}`);
        continue;
      }
      const src = join(images, `piccolo-os-${sizeMib}.0.0.img`);
      buildFlatcarImage(src, sizeMib, false);
      const sha = await fillRandom(src, bytes);
      await writeFile(`${src}.sha256`, `${sha}  ${src}\n`);
      await writeFile(`${src}.asc`, key.signature(src));

      // Rounds in alternating order (dd first, then install first, …), the source read into the
      // page cache before each run: this machine's disk and page cache vary a lot from minute to
      // minute, so one run of each in a fixed order measures the order more than the writer.
      const runs = { dd: [] as number[], sum: [] as number[], write: [] as number[], whole: [] as number[] };
      let phases: string[] = [];
      const runDd = (): void => {
        const ddTarget = join(targets, "dd.img");
        warm(src);
        settle();
        runs.dd.push(timed("dd", [`if=${src}`, `of=${ddTarget}`, "bs=4M", "conv=fsync", "status=none"]));
        runs.sum.push(timed("sha256sum", [ddTarget]));
        rmSync(ddTarget);
        spawnSync("sync");
      };
      const runInstall = async (): Promise<void> => {
        const target = sparseTarget(join(targets, "install.img"), bytes + 64 * MiB);
        const spec = { target, imagePath: src };
        warm(src);
        settle();
        const t0 = performance.now();
        const plan = await api.installer.planInstall(PlanInstallRequest.fromPartial({ spec }));
        const events: { ev: OperationEvent; t: number }[] = [];
        for await (const ev of api.installer.install(InstallRequest.fromPartial({ spec, confirmationToken: plan.confirmationToken }))) {
          events.push({ ev, t: performance.now() });
        }
        runs.whole.push((performance.now() - t0) / 1000);
        const end = events[events.length - 1]!.ev.outcome;
        if (end?.state !== OperationState.OPERATION_STATE_SUCCEEDED) throw new Error(`install failed: ${end?.error?.message}`);
        const first = (phase: string): number => events.find((e) => e.ev.progress?.phase === phase)!.t;
        runs.write.push((first("readback") - first("write")) / 1000);
        phases = ["verify", "write", "readback", "partition", "commit"].map((p, i, a) => {
          const next = a[i + 1];
          return `${p} ${(((next ? first(next) : events[events.length - 1]!.t) - first(p)) / 1000).toFixed(2)} s`;
        });
        rmSync(target);
        spawnSync("sync");
      };
      for (let r = 0; r < rounds; r++) {
        if (r % 2 === 0) {
          runDd();
          await runInstall();
        } else {
          await runInstall();
          runDd();
        }
      }
      rmSync(src);
      rmSync(`${src}.asc`);
      rmSync(`${src}.sha256`);
      const tDd = median(runs.dd);
      const tSum = median(runs.sum);
      const tWrite = median(runs.write);
      const tInstall = median(runs.whole);
      const list = (xs: number[]): string => xs.map((x) => x.toFixed(1)).join("/");

      const ratio = tDd / tWrite;
      const ratioAll = (tDd + tSum) / tInstall;
      console.log(`${sizeMib} MiB image, median of ${rounds} rounds (dd runs ${list(runs.dd)} s; write phases ${list(runs.write)} s):`);
      console.log(`  dd alone                 ${tDd.toFixed(2)} s  ${mibps(bytes, tDd)}`);
      console.log(`  dd + sha256sum           ${(tDd + tSum).toFixed(2)} s  ${mibps(bytes, tDd + tSum)}`);
      console.log(`  install, write phase     ${tWrite.toFixed(2)} s  ${mibps(bytes, tWrite)}  ratio to dd ${ratio.toFixed(2)}  (target ≥ 0.95: ${ratio >= 0.95 ? "MET" : "MISS"})`);
      console.log(`  install, whole           ${tInstall.toFixed(2)} s  ${mibps(bytes, tInstall)}  ratio to dd + sha256sum ${ratioAll.toFixed(2)}  (${phases.join(", ")})`);
    }
    api.close();
  } finally {
    cleanup();
  }
}

main().catch((e: unknown) => {
  console.error(`bench/install: ${(e as Error).message}`);
  process.exit(1);
});
