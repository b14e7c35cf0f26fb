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

node dist/src/server/main.js \
  --state-dir "$demo/state" --runtime-dir "$demo/run" \
  --grpc-listen "$grpc_listen" --rest-listen "$rest_listen" >>"$demo/piccolod.log" 2>&1 &
pid=$!
trap 'kill -TERM $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; echo; echo "piccolod stopped"' INT TERM

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

Try, in another terminal:
  alias piccoloctl="node $PWD/dist/src/clients/cli/main.js"
  export PICCOLO_ENDPOINT=unix://$demo/run/piccolod.sock
  piccoloctl health
  piccoloctl diagnostics
  piccoloctl ops list
  curl -s http://$rest_listen/api/v1/version
  curl -sN -X POST http://$rest_listen/api/v1/diagnostics -d '{"writeProbeMib": 256}'

Press Ctrl-C to stop.
MSG
wait $pid
