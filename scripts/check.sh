#!/usr/bin/env bash
# Static checks: types, proto lint/format/breaking, generated code up to date, no import cycles.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules
buf=node_modules/.bin/buf

echo "==> buf lint"
$buf lint
echo "==> buf format"
$buf format proto --diff --exit-code
echo "==> buf breaking (against proto/released/piccolo-api.binpb)"
$buf breaking proto --against proto/released/piccolo-api.binpb
echo "==> gen/ is up to date with proto/"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$buf generate -o "$tmp"
$buf generate --template buf.gen.grpc.yaml -o "$tmp"
if ! diff -r gen "$tmp/gen" >"$tmp/diff" 2>&1; then
  head -50 "$tmp/diff"
  echo "gen/ differs from what 'npm run generate' writes: run it and commit the result" >&2
  exit 1
fi
echo "==> tsc --noEmit"
node_modules/.bin/tsc -p tsconfig.json --noEmit
echo "==> shellcheck"
ensure_debian_packages "shellcheck:shellcheck"
shellcheck -x scripts/*.sh flatcar/*.sh flatcar/vm/*.sh .ci/run
echo "==> eslint (warnings are errors)"
node_modules/.bin/eslint --max-warnings 0 .
echo "==> no circular imports"
dirs=()
for d in src tools bench test; do [ -d "$d" ] && dirs+=("$d"); done
node_modules/.bin/madge --circular --extensions ts --ts-config tsconfig.json "${dirs[@]}"
echo "==> checks passed"
