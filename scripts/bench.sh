#!/usr/bin/env bash
# npm run bench [-- --duration-ms 5000 --warmup-ms 1000 --concurrency 64 --starts 10 …; --help]
# Installs dependencies if needed, builds dist/ when a source is newer than the build, then runs
# the RPC benchmarks (bench/rpc.ts; docs/benchmarks.md). A missed target is printed, never an
# exit status.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules

out=dist/bench/rpc.js
if [ ! -f "$out" ] || [ ! -f dist/bench/bare-server.js ] || [ ! -f dist/bench/auth.js ] || [ ! -f dist/src/server/main.js ] || [ ! -f dist/piccolod.cjs ] ||
  [ -n "$(find src gen bench package.json package-lock.json tsconfig.json tsconfig.build.json -newer "$out" -print -quit 2>/dev/null)" ]; then
  build_dist >&2
fi

# Start-up and memory are measured on the bundled daemon (dist/piccolod.cjs), the form that ships
# in the single executable; BENCH_DAEMON=dist/src/server/main.js measures the unbundled tree.
export BENCH_DAEMON=${BENCH_DAEMON:-dist/piccolod.cjs}
echo "==> RPC (bench/rpc.ts)"
node "$out" "$@"
echo
echo "==> auth (bench/auth.ts; TLS + JWT against plaintext without auth)"
node dist/bench/auth.js
echo
echo "==> containers (bench/containers.ts; a private dockerd)"
ensure_debian_packages "dockerd:docker.io" "busybox:busybox-static"
node dist/bench/containers.js
echo
echo "==> OS update (bench/update.ts; update_engine simulator on a private bus, RAUC as a reference)"
ensure_debian_packages "dbus-daemon:dbus" "cgpt:cgpt" "sgdisk:gdisk" "gpg:gnupg" "curl:curl" "rauc:rauc"
node dist/bench/update.js
echo "==> backup (bench/backup.ts; a private dockerd and swtpm, restic)"
ensure_debian_packages "dockerd:docker.io" "busybox:busybox-static" "restic:restic" "swtpm:swtpm" "tpm2_flushcontext:tpm2-tools"
node dist/bench/backup.js
echo
echo "==> installer (bench/install.ts; 1 and 4 GiB images onto a file target against dd + sha256sum)"
ensure_debian_packages "sgdisk:gdisk" "gpg:gnupg" "gpgv:gpgv"
node dist/bench/install.js
echo
echo "==> single executable (bench/sea.ts; flatcar/build.sh)"
[ -x flatcar/out/piccolod ] || bash flatcar/build.sh >&2
node dist/bench/sea.js
