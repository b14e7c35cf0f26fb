#!/usr/bin/env bash
# The whole test suite: installs what is missing, runs the static checks, builds, runs jest.
# Extra arguments go to jest (e.g. a test file pattern).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules
# Host parts the tests run for real. systemd-notify proves the READY gate.
ensure_debian_packages "systemd-notify:systemd" "python3:python3" \
  "mksquashfs:squashfs-tools" "gpg:gnupg" "ignition-validate:ignition" "shellcheck:shellcheck" \
  "qemu-system-x86_64:qemu-system-x86" "swtpm:swtpm" "swtpm_setup:swtpm-tools" "tpm2_startup:tpm2-tools" \
  "debootstrap:debootstrap" "mkfs.ext4:e2fsprogs" \
  "dockerd:docker.io" "busybox:busybox-static" "docker-registry:docker-registry" \
  "git:git" "systemd-analyze:systemd" "dbus-daemon:dbus" "busctl:systemd" "cgpt:cgpt" "sgdisk:gdisk" "gpgv:gpgv" \
  "cryptsetup:cryptsetup-bin" "zstd:zstd" "bzip2:bzip2"
# Storage, network and backup areas.
ensure_debian_packages "restic:restic" "losetup:mount" "ping:iputils-ping" "ip:iproute2"
bash scripts/check.sh
build_dist
mkdir -p .test-tmp
status=0
NODE_OPTIONS=--experimental-vm-modules node_modules/.bin/jest --ci --json --outputFile=.test-tmp/jest.json "$@" || status=$?
# The booted-system checks (flatcar/test-image.sh). Only when no jest file pattern was given;
# PICCOLO_SKIP_VM=1 skips them on a developer machine (CI never sets it).
vm_passed=0
vm_failed=0
if [ $# -eq 0 ] && [ "${PICCOLO_SKIP_VM:-}" != 1 ]; then
  bash flatcar/test-image.sh 2>&1 | tee .test-tmp/vm.log || status=1
  summary=$(grep -E '^vm: [0-9]+ passed, [0-9]+ failed$' .test-tmp/vm.log | tail -1 || true)
  if [ -n "$summary" ]; then
    vm_passed=$(echo "$summary" | awk '{print $2}')
    vm_failed=$(echo "$summary" | awk '{print $4}')
  else
    vm_failed=1
    status=1
  fi
fi
# shellcheck disable=SC2016 # JavaScript template literals, not shell expansions
VM_PASSED=$vm_passed VM_FAILED=$vm_failed node -e '
  const r = JSON.parse(require("fs").readFileSync(".test-tmp/jest.json", "utf8"));
  const vp = Number(process.env.VM_PASSED), vf = Number(process.env.VM_FAILED);
  if (r.numTotalTests === 0) { console.error("no test ran"); process.exit(1); }
  console.log(`jest: ${r.numPassedTests} passed, ${r.numFailedTests} failed; vm: ${vp} passed, ${vf} failed`);
  console.log(`${r.numPassedTests + vp} passed, ${r.numFailedTests + vf} failed` + (r.numPendingTests ? `, ${r.numPendingTests} skipped` : ""));
' || status=1
exit "$status"
