#!/usr/bin/env bash
# Starts piccolod as a sandboxed demo: no root needed, state and socket in ./.piccolo-demo,
# gRPC on 127.0.0.1:50051 and REST on 127.0.0.1:8080 (override with PICCOLO_DEMO_GRPC /
# PICCOLO_DEMO_REST). Host parts that are absent are reported by `piccoloctl health`.
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

node dist/src/server/main.js \
  --state-dir "$demo/state" --runtime-dir "$demo/run" \
  --grpc-listen "$grpc_listen" --rest-listen "$rest_listen" \
  --docker-socket "$docker_socket" --container-data-roots "$demo/data" >>"$demo/piccolod.log" 2>&1 &
pid=$!
stop() {
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  if [ -n "$dockerd_pid" ]; then kill -TERM "$dockerd_pid" 2>/dev/null || true; wait "$dockerd_pid" 2>/dev/null || true; fi
  echo
  echo "piccolod stopped"
}
trap stop INT TERM

for _ in $(seq 1 100); do
  [ -s "$demo/run/endpoints.json" ] && break
  if ! kill -0 $pid 2>/dev/null; then
    echo "piccolod did not start; its log ($demo/piccolod.log) ends with:" >&2
    tail -5 "$demo/piccolod.log" >&2
    exit 1
  fi
  sleep 0.1
done

cat <<MSG

piccolod is running (pid $pid)
  gRPC (unix socket)  unix://$demo/run/piccolod.sock
  gRPC (TCP)          $grpc_listen
  REST gateway        http://$rest_listen
  state folder        $demo/state
  log                 $demo/piccolod.log
  Docker engine       $docker_socket$( [ -S "$docker_socket" ] || echo " (absent: the containers API answers UNAVAILABLE; PICCOLO_DEMO_DOCKERD=1 starts a private one)")

Try, in another terminal:
  alias piccoloctl="node $PWD/dist/src/clients/cli/main.js"
  export PICCOLO_ENDPOINT=unix://$demo/run/piccolod.sock
  piccoloctl health
  piccoloctl diagnostics
  piccoloctl ops list
  piccoloctl containers ls -a
  curl -s http://$rest_listen/api/v1/version
  curl -sN -X POST http://$rest_listen/api/v1/diagnostics -d '{"writeProbeMib": 256}'

Press Ctrl-C to stop.
MSG
wait $pid
