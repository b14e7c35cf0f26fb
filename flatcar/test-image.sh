#!/usr/bin/env bash
# Boots a system with QEMU (-accel tcg; nested KVM hangs here) with a virtual TPM from swtpm and a
# second virtual disk, and checks piccolod in it (the seed's test_piccolo_os_image.sh):
#   piccolod active as root and answering; restarted within 5 s after kill -9; update-engine held
#   back while piccolod is unhealthy and started once it is healthy; a key sealed in the guest with
#   --tpm2-device=auto reaching piccolod through LoadCredentialEncrypted=, and not decrypting on a
#   fresh TPM (a second boot with a new swtpm state); the API reachable through a port forward;
#   an agent service made by CreateAgentService started by systemd (dynamic user, its container
#   running with the sealed key as a read-only file and nowhere else, replaced and restarted by a
#   second call); an install onto a third disk with encryption tpm2 whose ROOT then unlocks with
#   systemd-cryptsetup through the TPM and with the recovery key (and not through a fresh TPM).
# Without --image (CI, and any machine that cannot download Flatcar) it boots a stand-in: a
# minimal Debian (debootstrap) with a kernel and systemd, cached by the hash of its recipe, with
# the piccolod sysext merged by systemd-sysext.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: flatcar/test-image.sh [--image FLATCAR_IMAGE] [--cache DIR] [--keep] [--timeout SECONDS] [--help]

  --image FILE     boot this Flatcar image (flatcar_production_qemu_image.img) instead of the
                   Debian stand-in: the sysext and the checks arrive through an Ignition config on
                   QEMU's fw_cfg, the sysext from a loopback HTTP server (10.0.2.2 in the guest)
  --cache DIR      where the stand-in root filesystem is cached (default ~/.cache/piccolo-vm)
  --keep           keep the work folder (disk images, serial logs) for inspection
  --timeout S      give up on a boot after S seconds (default 900)
  --help           show this help

Prints one line per check and a closing "N passed, N failed"; exits non-zero if any check failed.
USAGE
}

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
image=""
cache="${PICCOLO_VM_CACHE:-$HOME/.cache/piccolo-vm}"
keep=""
timeout_s=900
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --image) image=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    --timeout) timeout_s=$2; shift 2 ;;
    *) echo "test-image.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$image" ] && [ ! -f "$image" ]; then
  echo "test-image.sh: --image $image: no such file" >&2
  exit 2
fi

# One VM run at a time on this machine (the stand-in cache and the CPU are shared), taken after
# the arguments are read, so --help and a bad argument answer at once while another run holds it.
exec 9>"${TMPDIR:-/tmp}/piccolo-vm.lock"
flock 9

cd "$root"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_debian_packages "qemu-system-x86_64:qemu-system-x86" "swtpm:swtpm" "swtpm_setup:swtpm-tools" \
  "debootstrap:debootstrap" "mkfs.ext4:e2fsprogs" "mksquashfs:squashfs-tools"

work=$(mktemp -d /tmp/piccolo-vm.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if [ -n "$keep" ]; then echo "work folder kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# The unit that runs the in-guest checks (flatcar/vm/guest-test.sh) on every boot.
test_unit='[Unit]
Description=piccolod checks in the test VM
After=ensure-sysext.service piccolod.service update-engine.service
[Service]
Type=oneshot
# Stays "active" so a re-queued multi-user.target does not run the checks twice.
RemainAfterExit=yes
ExecStart=/opt/piccolo-test/guest-test.sh
[Install]
WantedBy=multi-user.target'

prepare_standin() {
# --- the stand-in root filesystem, cached by the hash of its recipe ---
suite=bookworm
mirror=http://deb.debian.org/debian
# docker.io (with apparmor, which its engine needs on a kernel with AppArmor on) runs the agent
# service checks; busybox-static is the whole of the agent image made in the guest.
packages="systemd,systemd-sysv,udev,kmod,dbus,linux-image-amd64,curl,tpm2-tools,cryptsetup-bin,procps,iproute2,e2fsprogs,docker.io,apparmor,busybox-static,gdisk"
recipe="debootstrap --variant=minbase --include=$packages $suite $mirror v1"
key=$(printf '%s' "$recipe" | sha256sum | cut -c1-16)
base="$cache/rootfs-$key.tar"
if [ ! -f "$base" ]; then
  echo "==> building the stand-in root filesystem (cached as $base)"
  mkdir -p "$cache"
  rfs="$work/rootfs-build"
  debootstrap --variant=minbase --include="$packages" "$suite" "$rfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2; exit 1; }
  tar -C "$rfs" -cf "$base.tmp" . && mv "$base.tmp" "$base"
  rm -rf "$rfs"
else
  echo "==> stand-in root filesystem from cache ($base)"
fi

# --- the sysext, built for the stand-in's OS ---
echo "==> building the piccolod sysext"
bash "$here/build.sh" --os-id debian --out "$work/build" >"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; exit 1; }
for f in "$work/build"/piccolod-*.raw; do raw=$f; done

# --- this run's root filesystem ---
echo "==> preparing the guest"
rfs="$work/rootfs"
mkdir -p "$rfs"
tar -C "$rfs" -xf "$base"
echo piccolo-vm >"$rfs/etc/hostname"
printf '/dev/vda / ext4 rw 0 1\n' >"$rfs/etc/fstab"
install -D -m 0644 "$raw" "$rfs/var/lib/extensions/piccolod.raw"
mkdir -p "$rfs/etc/systemd/system/multi-user.target.wants" "$rfs/etc/systemd/system/sysinit.target.wants" "$rfs/etc/piccolod"
ln -sf /lib/systemd/system/systemd-sysext.service "$rfs/etc/systemd/system/sysinit.target.wants/systemd-sysext.service"
# DHCP on the user-mode network, so the host reaches the API through QEMU's port forward.
mkdir -p "$rfs/etc/systemd/network" "$rfs/etc/systemd/system/sockets.target.wants"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' >"$rfs/etc/systemd/network/20-dhcp.network"
ln -sf /lib/systemd/system/systemd-networkd.service "$rfs/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
ln -sf /lib/systemd/system/systemd-networkd.socket "$rfs/etc/systemd/system/sockets.target.wants/systemd-networkd.socket"
# Units that arrive with a sysext are not known when systemd first builds the boot transaction;
# Flatcar's ensure-sysext.service reloads systemd after the merge and re-queues the targets. The
# stand-in gets the same unit.
cat >"$rfs/etc/systemd/system/ensure-sysext.service" <<'UNIT'
[Unit]
Description=Start units from merged system extensions (as Flatcar's ensure-sysext.service)
BindsTo=systemd-sysext.service
After=systemd-sysext.service
DefaultDependencies=no
Before=sysinit.target shutdown.target
Conflicts=shutdown.target
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/systemctl daemon-reload
ExecStart=/bin/systemctl restart --no-block sockets.target timers.target multi-user.target
[Install]
WantedBy=sysinit.target
UNIT
ln -sf /etc/systemd/system/ensure-sysext.service "$rfs/etc/systemd/system/sysinit.target.wants/ensure-sysext.service"
# piccolod's unit comes from the sysext; enabling it is a symlink into /usr/lib, as Ignition would make.
ln -sf /usr/lib/systemd/system/piccolod.service "$rfs/etc/systemd/system/multi-user.target.wants/piccolod.service"
echo '{"restListen": "0.0.0.0:8080"}' >"$rfs/etc/piccolod/config.json"
# Stand-in for Flatcar's update-engine.service; the real drop-in arrives with the sysext.
cat >"$rfs/etc/systemd/system/update-engine.service" <<'UNIT'
[Unit]
Description=update_engine stand-in (the real one marks the booted USR partition good)
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/update-engine.service "$rfs/etc/systemd/system/multi-user.target.wants/update-engine.service"
# The checks report on the serial console; a getty there would hang up their output.
ln -sf /dev/null "$rfs/etc/systemd/system/serial-getty@ttyS0.service"
ln -sf /dev/null "$rfs/etc/systemd/system/getty@tty1.service"
install -D -m 0755 "$here/vm/guest-test.sh" "$rfs/opt/piccolo-test/guest-test.sh"
install -D -m 0755 "$here/place-keys.sh" "$rfs/opt/piccolo-test/place-keys.sh"
cp -r "$work/install" "$rfs/opt/piccolo-test/install"
printf '%s\n' "$test_unit" >"$rfs/etc/systemd/system/piccolo-vm-test.service"
ln -sf /etc/systemd/system/piccolo-vm-test.service "$rfs/etc/systemd/system/multi-user.target.wants/piccolo-vm-test.service"
for f in "$rfs"/boot/vmlinuz-*; do cp "$f" "$work/vmlinuz"; done
for f in "$rfs"/boot/initrd.img-*; do cp "$f" "$work/initrd"; done
truncate -s 3G "$work/root.img"
mkfs.ext4 -q -F -L root -d "$rfs" "$work/root.img"
rm -rf "$rfs"
truncate -s 1G "$work/disk2.img"
qemu_boot=(-kernel "$work/vmlinuz" -initrd "$work/initrd" -append "console=ttyS0 root=/dev/vda rw panic=-1 systemd.show_status=0"
  -drive "file=$work/root.img,format=raw,if=virtio")
}

prepare_flatcar() {
  # A real Flatcar image: the sysext and the checks arrive through Ignition (QEMU's fw_cfg), the
  # sysext itself from a loopback HTTP server the guest reaches at 10.0.2.2 (QEMU user network).
  ensure_debian_packages "qemu-img:qemu-utils"
  local http_port www fmt
  http_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "==> building the piccolod sysext (flatcar)"
  bash "$here/build.sh" --os-id flatcar --out "$work/build" --sysext-url "http://10.0.2.2:$http_port/piccolod.raw" \
    >"$work/build.log" 2>&1 || { tail -20 "$work/build.log" >&2; exit 1; }
  www="$work/www"
  mkdir -p "$www"
  for f in "$work/build"/piccolod-*.raw; do ln -sf "$f" "$www/piccolod.raw"; done
  # Flatcar has no busybox; the agent image the guest makes for the agent service checks is the
  # host's static one (the stand-in has busybox-static installed).
  ensure_debian_packages "busybox:busybox-static"
  if ldd "$(command -v busybox)" >/dev/null 2>&1; then
    echo "test-image.sh: $(command -v busybox) is not statically linked; install busybox-static" >&2
    exit 1
  fi
  ln -sf "$(command -v busybox)" "$www/busybox"
  cp "$work/install"/piccolo-os.img.gz* "$www/"
  cp "$work/build/piccolod.ign" "$www/piccolod.ign"
  python3 -m http.server --bind 127.0.0.1 --directory "$www" "$http_port" >"$work/http.log" 2>&1 &
  pids+=("$!")
  b64() { base64 -w0 "$1"; }
  printf '{"restListen": "0.0.0.0:8080"}\n' >"$work/config.json"
  printf '%s\n' "$test_unit" >"$work/piccolo-vm-test.service"
  python3 - "$work" "$http_port" "$(b64 "$here/vm/guest-test.sh")" "$(b64 "$here/place-keys.sh")" "$(b64 "$work/config.json")" <<'PY'
import json, sys
work, port, guest, keys, conf = sys.argv[1:]
unit = open(f"{work}/piccolo-vm-test.service").read()
ign = {
  "ignition": {"version": "3.3.0", "config": {"merge": [{"source": f"http://10.0.2.2:{port}/piccolod.ign"}]}},
  "storage": {"files": [
    {"path": "/opt/piccolo-test/guest-test.sh", "mode": 493, "contents": {"source": "data:;base64," + guest}},
    {"path": "/opt/piccolo-test/place-keys.sh", "mode": 493, "contents": {"source": "data:;base64," + keys}},
    {"path": "/opt/piccolo-test/busybox", "mode": 493, "contents": {"source": f"http://10.0.2.2:{port}/busybox"}},
    *[{"path": f"/opt/piccolo-test/install/{f}", "mode": 420, "contents": {"source": f"http://10.0.2.2:{port}/{f}"}}
      for f in ("piccolo-os.img.gz", "piccolo-os.img.gz.sha256", "piccolo-os.img.gz.asc")],
    {"path": "/etc/piccolod/config.json", "mode": 420, "contents": {"source": "data:;base64," + conf}},
  ]},
  "systemd": {"units": [
    {"name": "piccolo-vm-test.service", "enabled": True, "contents": unit},
    {"name": "serial-getty@ttyS0.service", "mask": True},
  ]},
}
json.dump(ign, open(f"{work}/test.ign", "w"), indent=1)
PY
  ignition-validate "$work/test.ign"
  fmt=$(qemu-img info --output=json "$image" | python3 -c 'import json,sys; print(json.load(sys.stdin)["format"])')
  qemu-img create -q -f qcow2 -F "$fmt" -b "$(readlink -f "$image")" "$work/root.qcow2"
  truncate -s 1G "$work/disk2.img"
  qemu_boot=(-drive "file=$work/root.qcow2,format=qcow2,if=virtio" -fw_cfg "name=opt/org.flatcar-linux/config,file=$work/test.ign")
}

# The build's signing key, made here (build.sh would make its own throwaway one) so that the install
# image below is signed by the key the sysext ships as /usr/share/piccolod/signing-keys.asc.
ensure_debian_packages "gpg:gnupg" "sgdisk:gdisk" "debugfs:e2fsprogs" "gzip:gzip"
export GNUPGHOME="$work/gnupg"
mkdir -m 0700 "$GNUPGHOME"
gpg --batch --quiet --passphrase '' --quick-gen-key "Piccolo VM test build <vm@piccolo.invalid>" ed25519 sign 1d 2>/dev/null
GPG_SIGNING_KEY_ID=$(gpg --batch --list-keys --with-colons 2>/dev/null | awk -F: '/^fpr/ {print $10; exit}')
export GPG_SIGNING_KEY_ID

# A Flatcar-shaped install image, gzipped, with .sha256 and .asc beside it: what the guest installs
# onto its third disk. Built by the installer tests' own fixture (test/helpers/flatcar-image.ts),
# signed here with the build's key.
make_install_image() { # make_install_image DIR
  local dir=$1
  mkdir -p "$dir"
  ensure_node_modules
  IMG="$dir/piccolo-os.img" node_modules/.bin/tsx -e \
    'import { buildFlatcarImage, compress } from "./test/helpers/flatcar-image.ts"; buildFlatcarImage(process.env.IMG!, 64); compress(process.env.IMG!, "gzip");'
  rm "$dir/piccolo-os.img"
  (cd "$dir" && sha256sum piccolo-os.img.gz >piccolo-os.img.gz.sha256)
  gpg --batch --yes --quiet --local-user "$GPG_SIGNING_KEY_ID" --armor --detach-sign --output "$dir/piccolo-os.img.gz.asc" "$dir/piccolo-os.img.gz"
}
make_install_image "$work/install"
# Larger than installerMinDiskBytes (8 GiB); sparse, so only what the install writes takes room.
truncate -s 9G "$work/disk3.img"

if [ -n "$image" ]; then prepare_flatcar; else prepare_standin; fi

passed=0
failed=0
boot() { # boot NAME TPMSTATE MODE
  local name=$1 tpmdir=$2 mode=$3 port
  mkdir -p "$tpmdir"
  printf 'PICCOLO-MODE=%s' "$mode" | dd of="$work/disk2.img" bs=64 count=1 conv=notrunc,sync status=none
  swtpm socket --tpm2 --tpmstate dir="$tpmdir" --ctrl type=unixio,path="$work/$name-tpm.sock" \
    --log file="$work/$name-swtpm.log" --daemon --pid file="$work/$name-swtpm.pid"
  pids+=("$(cat "$work/$name-swtpm.pid")")
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  echo "==> booting ($name; API forwarded to 127.0.0.1:$port)"
  local t0=$SECONDS
  timeout "$timeout_s" qemu-system-x86_64 -accel tcg -m 2048 -smp 2 -nographic -no-reboot \
    "${qemu_boot[@]}" -drive file="$work/disk2.img",format=raw,if=virtio -drive file="$work/disk3.img",format=raw,if=virtio \
    -chardev socket,id=chrtpm,path="$work/$name-tpm.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-crb,tpmdev=tpm0 \
    -netdev user,id=n0,hostfwd=tcp:127.0.0.1:"$port"-:8080 -device virtio-net-pci,netdev=n0 \
    >"$work/$name-serial.log" 2>&1 &
  local qpid=$!
  pids+=("$qpid")
  if [ "$mode" = main ]; then
    # From the host, through the port forward, while the guest runs its checks.
    local reached=""
    for _ in $(seq 1 "$timeout_s"); do
      # HTTPS with the guest daemon's self-signed certificate, which the host has no copy of (the
      # guest pins it in its own checks); the health RPC is public.
      if curl -fsSk --max-time 30 "https://127.0.0.1:$port/api/v1/health" >"$work/host-version.json" 2>/dev/null; then reached=1; break; fi
      kill -0 "$qpid" 2>/dev/null || break
      sleep 1
    done
    if [ -n "$reached" ]; then
      echo "PICCOLO-CHECK PASS host_reaches_api $(grep -o '"state":"[^"]*"' "$work/host-version.json" | head -1)" >>"$work/host-checks.log"
    else
      echo "PICCOLO-CHECK FAIL host_reaches_api no answer on 127.0.0.1:$port" >>"$work/host-checks.log"
    fi
  fi
  wait "$qpid" || true
  echo "    guest ran for $((SECONDS - t0)) s"
  if ! grep -q PICCOLO-DONE "$work/$name-serial.log"; then
    echo "PICCOLO-CHECK FAIL ${name}_boot_completed the guest did not finish its checks (serial log tail below)" >>"$work/host-checks.log"
    tail -30 "$work/$name-serial.log" | sed 's/^/    | /'
  fi
}

boot main "$work/tpm-main" main
boot fresh "$work/tpm-fresh" fresh-tpm

echo "==> results"
while read -r line; do
  case "$line" in
    *"PICCOLO-CHECK PASS "*) passed=$((passed + 1)); echo "  PASS ${line#*PICCOLO-CHECK PASS }" ;;
    *"PICCOLO-CHECK FAIL "*) failed=$((failed + 1)); echo "  FAIL ${line#*PICCOLO-CHECK FAIL }" ;;
  esac
done < <(cat "$work"/main-serial.log "$work"/fresh-serial.log "$work/host-checks.log" 2>/dev/null | tr -d '\r' | grep -a "PICCOLO-CHECK")
echo "vm: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
