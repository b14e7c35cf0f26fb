#!/usr/bin/env bash
# Shared helpers for the scripts in this folder. Source it; do not run it.

# Installs npm packages when node_modules is missing or older than package-lock.json.
ensure_node_modules() {
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    echo "==> installing npm packages (npm ci)"
    if ! npm ci --no-audit --no-fund; then
      # With npm's omit-lockfile-registry-resolved (set on these machines) the lock leaves out
      # other platforms' optional packages and npm ci refuses it; npm install --no-save installs
      # the same pinned versions from it without rewriting it.
      echo "==> npm ci refused the lock; installing the locked versions with npm install --no-save"
      npm install --no-save --no-audit --no-fund
    fi
  fi
}

# Installs the given Debian packages when a command they provide is missing.
# Usage: ensure_debian_packages "cmd1:pkg1" "cmd2:pkg2" ...
ensure_debian_packages() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})" >&2
    return 1
  fi
  echo "==> installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Compiles the daemon, CLI and benchmarks into dist/ and records the build info.
build_dist() {
  echo "==> building dist/"
  node_modules/.bin/tsc -p tsconfig.build.json
  local commit
  commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
  node -e '
    const [version, commit] = [require("./package.json").version, process.argv[1]];
    require("fs").writeFileSync("dist/build-info.json", JSON.stringify({ version, commit, buildTime: new Date().toISOString() }) + "\n");
  ' "$commit"
  bash scripts/build-browser.sh
  # The daemon and CLI as one bundled file, as they ship inside the single executable
  # (flatcar/build.sh); the benchmarks measure start-up and memory on this form.
  node flatcar/bundle.mjs dist/piccolod.cjs "{\"version\":\"$(node -p 'require("./package.json").version')\",\"commit\":\"$commit\",\"buildTime\":\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\"}"
  chmod +x dist/src/server/main.js dist/src/clients/cli/main.js 2>/dev/null || true
}
