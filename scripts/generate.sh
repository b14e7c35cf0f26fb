#!/usr/bin/env bash
# Regenerates gen/ from proto/ with buf and the local plugins (ts-proto and tools/protoc-gen-piccolo.ts).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules
node_modules/.bin/buf generate "$@"
node_modules/.bin/buf generate --template buf.gen.grpc.yaml "$@"
