#!/usr/bin/env bash
# Starts piccolod as a sandboxed demo: no root needed, state and socket in ./.piccolo-demo,
# gRPC on 127.0.0.1:50051 and REST on 127.0.0.1:8080 (override with PICCOLO_DEMO_GRPC /
# PICCOLO_DEMO_REST), TLS with the daemon's own certificate and a bearer token on both. Host parts
# that are absent are reported by `piccoloctl health`.
# Runs until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules
build_dist

demo=$PWD/.piccolo-demo
mkdir -p "$demo/state" "$demo/run"
grpc_listen=${PICCOLO_DEMO_GRPC:-127.0.0.1:50051}
rest_listen=${PICCOLO_DEMO_REST:-127.0.0.1:8080}
rm -f "$demo/run/endpoints.json"

# Containers: the host's Docker engine when there is one; with PICCOLO_DEMO_DOCKERD=1 (as root,
# with Debian's docker.io) a private dockerd in the demo folder; otherwise the containers API
# answers UNAVAILABLE naming the socket.
docker_socket=${PICCOLO_DEMO_DOCKER_SOCKET:-/var/run/docker.sock}
dockerd_pid=""
if [ "${PICCOLO_DEMO_DOCKERD:-}" = 1 ]; then
  mkdir -p "$demo/docker"
  node dist/test/helpers/dockerd.js --dir "$demo/docker" >"$demo/dockerd.json" 2>>"$demo/dockerd.log" &
  dockerd_pid=$!
  for _ in $(seq 1 300); do [ -s "$demo/dockerd.json" ] && break; sleep 0.1; done
  docker_socket=$(node -p 'JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).socket' "$demo/dockerd.json")
fi
mkdir -p "$demo/data"
# The API keys are sealed with systemd-creds, which needs root (the host key) or a TPM; an
# unprivileged demo keeps them in a mode-0600 file instead.
key_protection=sealed
[ "$(id -u)" -eq 0 ] || key_protection="file"

# OS updates (docs/update-engine.md): the update_engine simulator on a private dbus-daemon, a
# Flatcar-like disk image with USR-A/USR-B, and a reference update server offering a signed demo
# release. Needs dbus, cgpt, gdisk and gnupg; PICCOLO_DEMO_UPDATE=0 leaves it out.
update_args=()
update_pids=()
if [ "${PICCOLO_DEMO_UPDATE:-1}" = 1 ]; then
  ensure_debian_packages "dbus-daemon:dbus" "cgpt:cgpt" "sgdisk:gdisk" "gpg:gnupg" "gpgv:gpgv" || true
fi
if [ "${PICCOLO_DEMO_UPDATE:-1}" = 1 ] && command -v dbus-daemon >/dev/null && command -v cgpt >/dev/null &&
  command -v sgdisk >/dev/null && command -v gpg >/dev/null && command -v gpgv >/dev/null; then
  rm -f "$demo/update-rig.json" "$demo/update-server.json"
  node dist/test/sim/update-engine-harness.js --dir "$demo/update-rig" --usr-mib 64 >"$demo/update-rig.json" 2>>"$demo/update.log" &
  update_pids+=($!)
  node dist/test/sim/update-server.js --dir "$demo/update-server" --mib 48 --install-image-mib 64 >"$demo/update-server.json" 2>>"$demo/update.log" &
  update_pids+=($!)
  for _ in $(seq 1 600); do [ -s "$demo/update-rig.json" ] && [ -s "$demo/update-server.json" ] && break; sleep 0.1; done
  # shellcheck disable=SC2016 # JavaScript, not shell
  mapfile -t update_args < <(node -e '
    const fs = require("fs");
    const rig = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
    const srv = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
    for (const a of [...rig.daemonArgs, "--update-server", srv.url, "--signing-key-files", srv.keyFile]) console.log(a);
    // The release carries an install image too: installs go to sparse image files in targets/.
    if (srv.installImage) for (const a of ["--installer-file-target-dirs", process.argv[3]]) console.log(a);
  ' "$demo/update-rig.json" "$demo/update-server.json" "$demo/targets" 2>>"$demo/update.log" || true)
  if printf '%s\n' "${update_args[@]}" | grep -qx -- --installer-file-target-dirs; then
    mkdir -p "$demo/targets"
    # A sparse 16 GiB "disk" (the installer wants 8 GiB at least); it takes only what is written.
    rm -f "$demo/targets/disk.img"
    truncate -s 16G "$demo/targets/disk.img"
  fi
fi

node dist/src/server/main.js \
  --state-dir "$demo/state" --runtime-dir "$demo/run" \
  --grpc-listen "$grpc_listen" --rest-listen "$rest_listen" \
  --docker-socket "$docker_socket" --container-data-roots "$demo/data" "${update_args[@]}" \
  --key-protection "$key_protection" >>"$demo/piccolod.log" 2>&1 &
pid=$!
stop() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$dockerd_pid" ]; then kill -TERM "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; fi
  for p in "${update_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  echo
  echo "piccolod stopped"
}
trap stop INT TERM

for _ in $(seq 1 100); do
  [ -s "$demo/run/endpoints.json" ] && break
  if ! kill -0 $pid 2>/dev/null; then
    echo "piccolod did not start; its log ($demo/piccolod.log) ends with:" >&2
    tail -5 "$demo/piccolod.log" >&2
    for p in "${update_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    exit 1
  fi
  sleep 0.1
done

ctl="node $PWD/dist/src/clients/cli/main.js"
sock="unix://$demo/run/piccolod.sock"
fingerprint=$($ctl --endpoint "$sock" auth fingerprint)
cert="$demo/state/tls/cert.pem"
cat <<MSG

piccolod is running (pid $pid)
  gRPC (unix socket)  $sock  (root's: no token needed)
  gRPC (TCP, TLS)     $grpc_listen
  REST gateway        https://$rest_listen
  TLS certificate     $cert
                      SHA-256 $fingerprint
  state folder        $demo/state
  log                 $demo/piccolod.log
  Docker engine       $docker_socket$( [ -S "$docker_socket" ] || echo " (absent: the containers API answers UNAVAILABLE; PICCOLO_DEMO_DOCKERD=1 starts a private one)")

Try, in another terminal:
  alias piccoloctl="$ctl"
  export PICCOLO_ENDPOINT=$sock
  piccoloctl health
  piccoloctl diagnostics
  piccoloctl ops list
  piccoloctl containers ls -a
$( [ ${#update_args[@]} -gt 0 ] && printf '%s\n' \
  "  piccoloctl update status          # A/B slots and their GPT flags (a disk image in $demo/update-rig)" \
  "  piccoloctl update apply           # download, verify and install 1.1.0 through the update_engine simulator" \
  "  piccoloctl update rollback        # make the other slot the next boot again" || echo "  (OS updates off: needs dbus, cgpt, gdisk and gnupg; see $demo/update.log)")
$( [ -f "$demo/targets/disk.img" ] && printf '%s\n' \
  "  piccoloctl install plan $demo/targets/disk.img --version 1.1.0   # what an install of 1.1.0 would erase and write" \
  "  piccoloctl install run $demo/targets/disk.img --version 1.1.0    # download, verify and install it onto that sparse 16 GiB file")

The TCP listeners want a token. Mint one on the unix socket (or set a password with
\`piccoloctl auth passwd\` and use \`piccoloctl auth login\`), and pin the certificate:
  export PICCOLO_TOKEN=\$(piccoloctl auth token --role operator --ttl 1h)
  export PICCOLO_TLS_FINGERPRINT=$fingerprint
  piccoloctl --endpoint $grpc_listen version
  piccoloctl --endpoint https://$rest_listen ops list
  curl -s --cacert $cert -H "authorization: Bearer \$PICCOLO_TOKEN" https://$rest_listen/api/v1/version
  curl -sN --cacert $cert -H "authorization: Bearer \$PICCOLO_TOKEN" -X POST https://$rest_listen/api/v1/diagnostics -d '{"writeProbeMib": 256}'

Press Ctrl-C to stop.
MSG
wait $pid
