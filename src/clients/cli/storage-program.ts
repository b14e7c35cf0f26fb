/** The command trees of `piccoloctl storage …`, `network …` and `backup …` (implementations load only when one runs). */
import { InvalidArgumentError, type Command } from "commander";
import type { CommandContext } from "./context.js";

type Commands = typeof import("./commands.js");
/** How program.ts runs a command. */
export type RunCommand = (cmd: Command, work: (m: Commands, c: CommandContext) => Promise<number>, follows?: boolean) => Promise<void>;

const many = (value: string, previous: string[] = []): string[] => [...previous, value];
const whole = (name: string, min: number, max: number) => (v: string): number => {
  if (!/^\d+$/.test(v.trim()) || Number(v) < min || Number(v) > max) throw new InvalidArgumentError(`${name} must be a whole number from ${min} to ${max}.`);
  return Number(v);
};
const labels = (values: readonly string[] | undefined): Record<string, string> => {
  const out: Record<string, string> = {};
  for (const v of values ?? []) {
    const i = v.indexOf("=");
    if (i <= 0) throw new InvalidArgumentError(`-l ${JSON.stringify(v)}: expected KEY=VALUE`);
    out[v.slice(0, i)] = v.slice(i + 1);
  }
  return out;
};

/** `storage …`. */
export function addStorageCommands(program: Command, run: RunCommand): void {
  const st = program.command("storage").description("disks, filesystems, app data volumes, disk encryption and low-space alerts");
  st.command("disks").description("list block devices (lsblk's inventory)").action((_o, cmd: Command) => run(cmd, (m, c) => m.storageDisksCommand(c)));
  st.command("filesystems").alias("df").description("list mounted filesystems with size, used and free space").action((_o, cmd: Command) => run(cmd, (m, c) => m.storageFilesystemsCommand(c)));
  const vol = st.command("volumes").description("app data volumes (Docker named volumes)");
  vol.command("ls").description("list volumes and the containers using each").option("-a, --all", "also volumes piccolod did not create").action((o: { all?: boolean }, cmd: Command) => run(cmd, (m, c) => m.storageVolumesListCommand(c, o)));
  vol
    .command("create")
    .description("create a volume")
    .argument("<name>", "volume name")
    .option("-l, --label <key=value>", "label (repeatable)", many)
    .action((name: string, o: { label?: string[] }, cmd: Command) => run(cmd, (m, c) => m.storageVolumesCreateCommand(c, name, labels(o.label))));
  vol.command("rm").description("delete a volume and its data (refused while a container uses it)").argument("<name>", "volume name").action((name: string, _o, cmd: Command) => run(cmd, (m, c) => m.storageVolumesRemoveCommand(c, name)));
  const enc = st.command("encryption").description("LUKS2 disk encryption");
  enc.command("status").description("keyslots, tokens, TPM2 PCRs and recovery key of LUKS devices").argument("[devices...]", "devices or image files (default: every crypto_LUKS block device)").action((devices: string[], _o, cmd: Command) => run(cmd, (m, c) => m.storageEncryptionStatusCommand(c, devices)));
  enc
    .command("reseal")
    .description("re-enrol the TPM2 slot against the PCR values of now (after an update)")
    .argument("<device>", "LUKS2 device or image file")
    .option("--pcrs <list>", "PCRs to seal against, e.g. 7 or 0+7 (default 7)")
    .option("--key-file <path>", "file holding a passphrase or recovery key that unlocks the device (- for stdin)")
    .option("--key-credential <name>", "sealed secret in piccolod's credential store holding the key")
    .option("-d, --detach", "start it and print the operation id")
    .action((device: string, o: { pcrs?: string; keyFile?: string; keyCredential?: string; detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.storageEncryptionResealCommand(c, device, o), true));
  st.command("alerts").description("stream low-space alerts until Ctrl-C").action((_o, cmd: Command) => run(cmd, (m, c) => m.storageAlertsCommand(c), true));
}

/** `network …`. */
export function addNetworkCommands(program: Command, run: RunCommand): void {
  const net = program.command("network").description("interfaces, systemd-networkd configuration in try mode, host name, connectivity");
  net.command("interfaces").alias("ls").description("list interfaces with addresses and routes").action((_o, cmd: Command) => run(cmd, (m, c) => m.networkInterfacesCommand(c)));
  net.command("config").description("show piccolod's network configuration and any change waiting for confirmation").action((_o, cmd: Command) => run(cmd, (m, c) => m.networkConfigCommand(c)));
  net
    .command("apply")
    .description("configure an interface; it reverts by itself unless confirmed in time")
    .argument("<interface>", "interface name")
    .option("--dhcp", "use DHCP")
    .option("--address <cidr>", "static address, e.g. 192.168.1.10/24 (repeatable)", many)
    .option("--gateway <ip>", "default gateway (static)")
    .option("--dns <ip>", "DNS server (repeatable)", many)
    .option("--confirm-timeout <seconds>", "seconds to confirm before it reverts (5-3600; default 120)", whole("--confirm-timeout", 5, 3600))
    .action((name: string, o: { dhcp?: boolean; address?: string[]; gateway?: string; dns?: string[]; confirmTimeout?: number }, cmd: Command) => run(cmd, (m, c) => m.networkApplyCommand(c, name, o)));
  net.command("confirm").description("keep a change made by apply").argument("<id>", "change id").action((id: string, _o, cmd: Command) => run(cmd, (m, c) => m.networkConfirmCommand(c, id)));
  net.command("hostname").description("set the host name").argument("<name>", "host name").action((name: string, _o, cmd: Command) => run(cmd, (m, c) => m.networkHostnameCommand(c, name)));
  net
    .command("check")
    .description("resolve a name and ping the default gateways; exit 1 when something fails")
    .argument("[hostname]", "name to resolve (default piccolo.space)")
    .option("--timeout <seconds>", "seconds per check (1-30; default 3)", whole("--timeout", 1, 30))
    .action((host: string | undefined, o: { timeout?: number }, cmd: Command) => run(cmd, (m, c) => m.networkCheckCommand(c, host, o)));
}

const scopeOptions = (c: Command): Command =>
  c
    .option("--state", "piccolod's state folder")
    .option("--credentials", "the sealed secrets, as they are on disk")
    .option("--volume <name>", "an app data volume (repeatable)", many)
    .option("--all-volumes", "every volume (piccolod's, or the snapshot's for a restore)")
    .option("-d, --detach", "start it and print the operation id");

/** `backup …`. */
export function addBackupCommands(program: Command, run: RunCommand): void {
  const b = program.command("backup").description("restic backups of piccolod's state, sealed secrets and app volumes");
  b.command("repo").description("show the repository piccolod backs up to").action((_o, cmd: Command) => run(cmd, (m, c) => m.backupRepoCommand(c)));
  b
    .command("init")
    .description("create a repository (or connect to an existing one) with its password sealed to the TPM")
    .argument("<location>", "absolute path, or rest:http(s)://host:port/path")
    .option("--existing", "connect to an existing repository")
    .option("--password-file <path>", "with --existing: file holding its password (- for stdin)")
    .action((loc: string, o: { existing?: boolean; passwordFile?: string }, cmd: Command) => run(cmd, (m, c) => m.backupInitCommand(c, loc, o)));
  scopeOptions(b.command("create").description("back up, with the apps using the volumes stopped or paused around it"))
    .option("--quiesce <mode>", "stop, pause or none (default stop)")
    .option("--tag <tag>", "extra restic tag (repeatable)", many)
    .action((o: import("./backup.js").ScopeOptions & { quiesce?: string; tag?: string[]; detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.backupCreateCommand(c, o), true));
  b.command("snapshots").alias("ls").description("list snapshots").action((_o, cmd: Command) => run(cmd, (m, c) => m.backupSnapshotsCommand(c)));
  scopeOptions(b.command("restore").description("put a snapshot's scope back in place").argument("<snapshot>", "snapshot id (8+ hex digits)")).action(
    (id: string, o: import("./backup.js").ScopeOptions & { detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.backupRestoreCommand(c, id, o), true),
  );
  b
    .command("verify")
    .description("check the repository (restic check)")
    .option("--read-data <percent>", "also read back this percent of the data (0-100)", whole("--read-data", 0, 100))
    .option("-d, --detach", "start it and print the operation id")
    .action((o: { readData?: number; detach?: boolean }, cmd: Command) => run(cmd, (m, c) => m.backupVerifyCommand(c, o), true));
  b
    .command("forget")
    .description("forget snapshots by a keep policy (and prune)")
    .option("--keep-last <n>", "keep the newest n", whole("--keep-last", 1, 100000))
    .option("--keep-daily <n>", "keep one a day for n days", whole("--keep-daily", 1, 100000))
    .option("--keep-weekly <n>", "keep one a week for n weeks", whole("--keep-weekly", 1, 100000))
    .option("--keep-monthly <n>", "keep one a month for n months", whole("--keep-monthly", 1, 100000))
    .option("--prune", "free the space the forgotten snapshots held")
    .option("-d, --detach", "start it and print the operation id")
    .action((o: Record<string, number | boolean | undefined>, cmd: Command) => run(cmd, (m, c) => m.backupForgetCommand(c, o), true));
}
