#!/usr/bin/env bash
# The whole test suite: installs what is missing, runs the static checks, builds, runs jest.
# Extra arguments go to jest (e.g. a test file pattern).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules
# Host parts the tests run for real. systemd-notify proves the READY gate.
ensure_debian_packages "systemd-notify:systemd" "python3:python3"
bash scripts/check.sh
build_dist
mkdir -p .test-tmp
status=0
NODE_OPTIONS=--experimental-vm-modules node_modules/.bin/jest --ci --json --outputFile=.test-tmp/jest.json "$@" || status=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync(".test-tmp/jest.json", "utf8"));
  console.log(`${r.numPassedTests} passed, ${r.numFailedTests} failed` + (r.numPendingTests ? `, ${r.numPendingTests} skipped` : ""));
  if (r.numTotalTests === 0) { console.error("no test ran"); process.exit(1); }
' || status=1
exit "$status"
