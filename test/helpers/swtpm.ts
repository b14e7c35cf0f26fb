/**
 * Starts a real software TPM (swtpm) on loopback TCP for a test, powered on and started up, and
 * hands out the TCTI string that tpm2-tools (TPM2TOOLS_TCTI / --tcti) and systemd
 * (--tpm2-device=) both accept.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

/** A running swtpm. */
export interface Swtpm {
  /** "swtpm:host=127.0.0.1,port=P": for tpm2-tools and for systemd's --tpm2-device=. */
  readonly tcti: string;
  /** The TPM state folder (survives stop() when it was passed in). */
  readonly stateDir: string;
  /** Environment for tpm2-tools: TPM2TOOLS_TCTI set to this TPM. */
  readonly env: Readonly<Record<string, string>>;
  /** Stops swtpm (the state stays in stateDir until cleanup()). */
  stop(): Promise<void>;
  /** Stops it and removes the state folder when this helper made it. */
  cleanup(): Promise<void>;
}

/** Options of startSwtpm. */
export interface SwtpmOptions {
  /** Reuse a TPM state folder (same keys and seeds as before); a new one otherwise. */
  readonly stateDir?: string;
  /**
   * Manufacture the TPM first with swtpm_setup: an EK and its certificate, as a TPM from a
   * vendor has (only when the state folder is new).
   */
  readonly manufacture?: boolean;
}

async function freePortPair(): Promise<number> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = await new Promise<number>((resolve, reject) => {
      const s = createServer();
      s.once("error", reject);
      s.listen(0, "127.0.0.1", () => {
        const p = (s.address() as { port: number }).port;
        s.close(() => resolve(p));
      });
    });
    if (port >= 65535) continue;
    const second = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once("error", () => resolve(false));
      s.listen(port + 1, "127.0.0.1", () => s.close(() => resolve(true)));
    });
    if (second) return port;
  }
  throw new Error("no two free adjacent loopback ports for swtpm");
}

async function waitListening(port: number, proc: ChildProcess, out: () => string): Promise<void> {
  const deadline = Date.now() + 15_000;
  for (;;) {
    if (proc.exitCode !== null) throw new Error(`swtpm exited with ${proc.exitCode}: ${out()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = createServer();
      s.once("error", () => resolve(true)); // in use: swtpm is listening
      s.listen(port, "127.0.0.1", () => s.close(() => resolve(false)));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`swtpm did not listen on ${port}: ${out()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Starts swtpm (TPM 2.0) on 127.0.0.1 and waits until it answers. */
export async function startSwtpm(options: SwtpmOptions = {}): Promise<Swtpm> {
  const owned = options.stateDir === undefined;
  const stateDir = options.stateDir ?? (await mkdtemp(join(tmpdir(), "piccolo-swtpm-")));
  if (options.manufacture && owned) {
    const r = spawnSync(
      "swtpm_setup",
      ["--tpm2", "--tpm-state", stateDir, "--create-ek-cert", "--create-platform-cert", "--lock-nvram", "--overwrite", "--display"],
      { encoding: "utf8" },
    );
    if (r.status !== 0) throw new Error(`swtpm_setup failed (${r.status}): ${r.stderr}${r.stdout}`);
  }
  const port = await freePortPair();
  let output = "";
  const proc = spawn(
    "swtpm",
    [
      "socket",
      "--tpm2",
      "--tpmstate",
      `dir=${stateDir}`,
      "--server",
      `type=tcp,port=${port},bindaddr=127.0.0.1`,
      "--ctrl",
      `type=tcp,port=${port + 1},bindaddr=127.0.0.1`,
      "--flags",
      "not-need-init,startup-clear",
    ],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  proc.stdout?.on("data", (d: Buffer) => (output += d.toString()));
  proc.stderr?.on("data", (d: Buffer) => (output += d.toString()));
  await waitListening(port, proc, () => output);
  const tcti = `swtpm:host=127.0.0.1,port=${port}`;
  const stop = async (): Promise<void> => {
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise<void>((r) => proc.once("exit", () => r()));
    proc.kill("SIGTERM");
    const timer = setTimeout(() => proc.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  };
  return {
    tcti,
    stateDir,
    env: { TPM2TOOLS_TCTI: tcti },
    stop,
    async cleanup() {
      await stop();
      if (owned) await rm(stateDir, { recursive: true, force: true });
    },
  };
}
