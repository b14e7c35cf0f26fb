/**
 * Update benchmark, in one run (`npm run build`, then `node dist/bench/update.js`; root, with
 * dbus, cgpt, gdisk, gnupg, curl and rauc installed):
 *
 *  1. piccolod's whole update path for a payload whose USR image is 512 MiB: ApplyUpdate
 *     (download from the reference update server, SHA-256, gpgv signature, loopback Omaha
 *     responder, update.conf, AttemptUpdate over D-Bus to the update_engine simulator, which
 *     downloads it again, gunzips it into USR-B and sets the GPT flags) — against the baseline
 *     `curl -o` + `sha256sum` + `gpg --verify` + `gzip -dc | dd` of the same payload into the same
 *     partition. Target: piccolod's throughput ≥ 0.8 × the baseline's (median of the runs; the
 *     same image bytes on both sides, so it is the ratio of the times).
 *  2. For reference, the same image installed by RAUC (Debian's rauc 1.8, plain bundle signed
 *     with a throwaway X.509 key, `rauc service` on the same private bus, a file-backed raw slot):
 *     `curl -o bundle` + `rauc install`. The ratio is printed, with no target.
 *
 * The runs are interleaved so other load on the machine hits every side alike. A MISS is printed,
 * never an exit status. Everything started is stopped and the temporary folder removed.
 *
 * Options (flags or env): --mib (BENCH_UPDATE_MIB, 512), --runs (BENCH_UPDATE_RUNS, 3), --settle-s
 * (the pause before each timed side, 5), --no-rauc.
 */
import { execFile, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { OperationState } from "../gen/piccolo/operations/v1/operations.js";
import { ApplyUpdateRequest, RollbackUpdateRequest } from "../gen/piccolo/update/v1/update.js";
import { createGrpcClients } from "../src/clients/grpc-client.js";
import { startUpdateRig, type UpdateRig } from "../test/sim/update-engine-harness.js";
import { makeRelease, makeSigningKey, startUpdateServer, type SigningKey, type UpdateServer } from "../test/sim/update-server.js";

const run = promisify(execFile);
const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = resolve(HERE, "../..");
const DAEMON_JS = join(ROOT, "dist/src/server/main.js");
const MiB = 1024 * 1024;

if (process.argv.includes("--help") || process.argv.includes("-h")) {
  process.stdout.write("usage: node dist/bench/update.js [--mib 512] [--runs 3] [--settle-s 5] [--no-rauc]   (root; dbus, cgpt, gdisk, gnupg, curl, rauc)\n");
  process.exit(0);
}

/** Waits `seconds` (see the run loop for why). */
function settle(seconds: number): void {
  if (seconds > 0) spawnSync("sleep", [String(seconds)]);
}

function option(flag: string, env: string, dflt: number): number {
  const i = process.argv.indexOf(`--${flag}`);
  const raw = i >= 0 ? process.argv[i + 1] : process.env[env];
  if (raw === undefined || raw === "") return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new Error(`--${flag}/${env}: expected a positive integer, got ${raw}`);
  return n;
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

const sh = async (cmd: string, env: NodeJS.ProcessEnv = process.env): Promise<void> => {
  await run("bash", ["-o", "pipefail", "-c", cmd], { env, maxBuffer: 16 << 20 });
};

async function startDaemon(dir: string, args: string[]): Promise<{ proc: ChildProcess; socket: string; stop(): Promise<void> }> {
  const runtime = join(dir, "run");
  const proc = spawn(process.execPath, [DAEMON_JS, "--state-dir", join(dir, "state"), "--runtime-dir", runtime, "--grpc-listen", "", "--rest-listen", "", "--log-level", "warn", ...args], {
    stdio: ["ignore", "ignore", "inherit"],
    env: { ...process.env, NOTIFY_SOCKET: "" },
  });
  for (let i = 0; ; i++) {
    try {
      const ep = JSON.parse(await readFile(join(runtime, "endpoints.json"), "utf8")) as { socket: string; pid: number };
      if (ep.pid === proc.pid) return { proc, socket: ep.socket, stop: async () => void (proc.kill("SIGTERM"), await new Promise((r) => proc.once("exit", r))) };
    } catch {
      // not yet
    }
    if (proc.exitCode !== null || i > 400) throw new Error("piccolod did not start");
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function main(): Promise<void> {
  const mib = option("mib", "BENCH_UPDATE_MIB", 512);
  const runs = option("runs", "BENCH_UPDATE_RUNS", 3);
  const settleSeconds = process.argv.includes("--settle-s") ? Number(process.argv[process.argv.indexOf("--settle-s") + 1]) : 5;
  if (!(settleSeconds >= 0)) throw new Error("--settle-s: seconds ≥ 0");
  const withRauc = !process.argv.includes("--no-rauc") && process.env["BENCH_UPDATE_RAUC"] !== "0";
  const work = mkdtempSync(join(tmpdir(), "bench-update-"));
  let rig: UpdateRig | undefined;
  let key: SigningKey | undefined;
  let server: UpdateServer | undefined;
  let daemon: Awaited<ReturnType<typeof startDaemon>> | undefined;
  let rauc: ChildProcess | undefined;
  const cleanup = async (): Promise<void> => {
    rauc?.kill("SIGTERM");
    await daemon?.stop().catch(() => undefined);
    await server?.close().catch(() => undefined);
    await rig?.cleanup().catch(() => undefined);
    await key?.cleanup().catch(() => undefined);
    rmSync(work, { recursive: true, force: true });
  };
  process.once("SIGINT", () => void cleanup().then(() => process.exit(130)));
  process.once("SIGTERM", () => void cleanup().then(() => process.exit(143)));
  try {
    console.log(`==> preparing: a ${mib} MiB USR image, gzip'd and signed; a Flatcar-like disk; the update_engine simulator`);
    rig = await startUpdateRig({ dir: join(work, "rig"), usrMiB: mib + 8 });
    key = await makeSigningKey();
    const release = await makeRelease(join(work, "release"), key, "1.1.0", mib * MiB);
    server = await startUpdateServer([release]);
    await writeFile(join(work, "key.asc"), key.publicKey);
    daemon = await startDaemon(join(work, "piccolod"), [...rig.daemonArgs(), "--update-server", server.url, "--signing-key-files", join(work, "key.asc")]);
    const api = createGrpcClients({ endpoint: `unix://${daemon.socket}` });
    const url = `${server.url}/api/v1/images/download/1.1.0?type=update`;
    const imageBytes = release.image.length;
    console.log(`    payload ${(release.size / MiB).toFixed(1)} MiB compressed, ${(imageBytes / MiB).toFixed(0)} MiB image`);

    // RAUC: a plain bundle of the same image, a service on the private bus, a file-backed slot.
    let raucInstall: (() => Promise<void>) | undefined;
    if (withRauc) {
      const r = join(work, "rauc");
      await mkdir(join(r, "bundle"), { recursive: true });
      await writeFile(join(r, "bundle", "rootfs.img"), release.image);
      await writeFile(join(r, "bundle", "manifest.raucm"), "[update]\ncompatible=piccolo-bench\nversion=1.1.0\n\n[bundle]\nformat=plain\n\n[image.rootfs]\nfilename=rootfs.img\n");
      await sh(`openssl req -x509 -newkey rsa:2048 -nodes -keyout ${r}/key.pem -out ${r}/cert.pem -days 2 -subj /CN=piccolo-bench 2>/dev/null`);
      await sh(`rauc bundle --cert=${r}/cert.pem --key=${r}/key.pem ${r}/bundle ${r}/update.raucb >/dev/null`);
      await sh(`truncate -s ${mib + 8}M ${r}/slotA.img ${r}/slotB.img`);
      await writeFile(
        join(r, "system.conf"),
        `[system]\ncompatible=piccolo-bench\nbootloader=noop\nbundle-formats=plain\ndata-directory=${r}/data\n\n[keyring]\npath=${r}/cert.pem\n\n` +
          `[slot.rootfs.0]\ndevice=${r}/slotA.img\ntype=raw\nbootname=A\n\n[slot.rootfs.1]\ndevice=${r}/slotB.img\ntype=raw\nbootname=B\n`,
      );
      await mkdir(join(r, "mnt"), { recursive: true });
      await writeFile(join(r, "served.raucb"), ""); // placeholder for the copy the server hands out
      const env = { ...process.env, DBUS_SYSTEM_BUS_ADDRESS: rig.bus.address };
      rauc = spawn("rauc", ["service", `--conf=${r}/system.conf`, `--mount=${r}/mnt`, "--override-boot-slot=A"], { env, stdio: ["ignore", "ignore", "pipe"] });
      let raucErr = "";
      rauc.stderr!.on("data", (d: Buffer) => (raucErr = (raucErr + d.toString()).slice(-4000)));
      await new Promise((res) => setTimeout(res, 1500));
      if (rauc.exitCode !== null) throw new Error(`rauc service exited: ${raucErr}`);
      // Serve the bundle from the same reference server as a release file would be.
      const bundleUrl = `file://${r}/update.raucb`;
      raucInstall = async () => {
        await sh(`curl -sf -o ${r}/served.raucb ${bundleUrl} && rauc install ${r}/served.raucb >/dev/null`, env);
      };
    }

    // piccolod's whole path.
    const runPiccolod = async (): Promise<number> => {
      const t0 = performance.now();
      let ok = false;
      let why = "";
      const phaseStart: [string, number][] = [];
      for await (const ev of api.update.applyUpdate(ApplyUpdateRequest.fromPartial({ version: "1.1.0" }))) {
        const ph = ev.progress?.phase;
        if (ph && phaseStart[phaseStart.length - 1]?.[0] !== ph) phaseStart.push([ph, performance.now()]);
        if (ev.outcome) {
          ok = ev.outcome.state === OperationState.OPERATION_STATE_SUCCEEDED;
          why = ev.outcome.error?.message ?? "";
        }
      }
      const tp = (performance.now() - t0) / 1000;
      if (!ok) throw new Error(`ApplyUpdate failed: ${why}`);
      if (process.env["BENCH_UPDATE_PHASES"] === "1") {
        const end = performance.now();
        console.log(`    phases: ${phaseStart.map(([n, t], k) => `${n} ${(((phaseStart[k + 1]?.[1] ?? end) - t) / 1000).toFixed(2)}s`).join(", ")}`);
      }
      for await (const ev of api.update.rollbackUpdate(RollbackUpdateRequest.fromPartial({}))) void ev;
      return tp;
    };
    // The baseline, into the same partition.
    const runBaseline = async (): Promise<number> => {
      const f = join(work, "baseline.raw.gz");
      const t0 = performance.now();
      await sh(`curl -sf -o ${f} '${url}'`);
      const sum = (await run("sha256sum", [f])).stdout.split(" ")[0];
      if (sum !== release.sha256) throw new Error("baseline: sha256 mismatch");
      await sh(`gpg --batch --verify ${release.signature} ${f} 2>/dev/null`, { ...process.env, GNUPGHOME: key!.home });
      await sh(`gzip -dc ${f} | dd of=${rig!.disk.path} bs=4M seek=${rig!.disk.offsetB} oflag=seek_bytes conv=notrunc status=none`);
      const tb = (performance.now() - t0) / 1000;
      rmSync(f, { force: true });
      return tb;
    };
    const runRauc = async (): Promise<number> => {
      const t0 = performance.now();
      await raucInstall!();
      return (performance.now() - t0) / 1000;
    };

    const times: Record<"piccolod" | "baseline" | "rauc", number[]> = { piccolod: [], baseline: [], rauc: [] };
    const sides = [
      ["piccolod", runPiccolod],
      ["baseline", runBaseline],
      ...(raucInstall ? ([["rauc", runRauc]] as const) : []),
    ] as const;
    for (let i = 0; i < runs; i++) {
      // The order rotates from run to run, and every side starts after the same pause: on a VM
      // with free page reporting, memory the previous side freed goes back to the host within
      // seconds and is slow to touch again, so whoever ran second after a quick side won.
      const order = [...sides.slice(i % sides.length), ...sides.slice(0, i % sides.length)];
      const line: string[] = [];
      for (const [name, side] of order) {
        settle(settleSeconds);
        const t = await side();
        times[name].push(t);
        line.push(`${name} ${t.toFixed(2)} s`);
      }
      console.log(`    run ${i + 1}: ${line.join(", ")}`);
    }
    const piccolod = times.piccolod;
    const baseline = times.baseline;
    const raucTimes = times.rauc;
    const mibps = (s: number): number => imageBytes / MiB / s;
    const p = mibps(median(piccolod));
    const b = mibps(median(baseline));
    const ratio = p / b;
    console.log(`\nupdate apply of a ${mib} MiB image (median of ${runs}):`);
    console.log(`  piccolod ApplyUpdate (whole path)              ${p.toFixed(1)} MiB/s`);
    console.log(`  curl + sha256sum + gpg --verify + gzip|dd      ${b.toFixed(1)} MiB/s`);
    console.log(`  ratio piccolod/baseline                        ${ratio.toFixed(2)}  (target >= 0.80: ${ratio >= 0.8 ? "MET" : "MISS"})`);
    if (raucTimes.length > 0) {
      const r = mibps(median(raucTimes));
      console.log(`  RAUC 1.8 (curl + rauc install, file slot)      ${r.toFixed(1)} MiB/s`);
      console.log(`  ratio piccolod/RAUC (reference, no target)     ${(p / r).toFixed(2)}`);
    }
    api.close();
  } finally {
    await cleanup();
  }
}

main().catch((e: unknown) => {
  console.error(`bench/update: ${(e as Error).message}`);
  process.exit(1);
});
