#!/usr/bin/env bash
# Builds piccolod for Flatcar (the seed's build_piccolo.sh, for this project):
#   1. bundles daemon and CLI (esbuild) into one Node single-executable binary (postject);
#   2. packs it with the systemd unit, the update-engine drop-in and tmpfiles into a
#      systemd-sysext image (squashfs with extension-release.piccolod);
#   3. writes SHA256SUMS and detached GPG signatures;
#   4. emits the Ignition config that installs and enables it (validated by ignition-validate),
#      including /etc/flatcar/update.conf with updates from the public server turned off.
# Version, update server, channel and signing key come from flatcar/piccolo.env (or the environment).
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: flatcar/build.sh [--out DIR] [--os-id ID] [--sysext-url URL] [--help]

Builds the piccolod sysext image, its checksums and signatures, and the Ignition config.

  --out DIR         output folder (default: flatcar/out); rebuilt in place, idempotent
  --os-id ID        the OS the sysext is for: flatcar (default, from piccolo.env) or debian
                    (the VM stand-in of flatcar/test-image.sh)
  --sysext-url URL  where machines download the sysext from, written into the Ignition config
                    (default: $PICCOLO_UPDATE_SERVER/sysext/piccolod-$PICCOLO_VERSION.raw)
  --help            show this help

Settings (flatcar/piccolo.env, overridable from the environment):
  PICCOLO_VERSION, PICCOLO_UPDATE_SERVER, PICCOLO_UPDATE_GROUP, GPG_SIGNING_KEY_ID, SYSEXT_OS_ID

Outputs in the out folder:
  piccolod-<version>.raw          the systemd-sysext image (squashfs)
  piccolod-<version>.raw.asc      its detached, armored GPG signature
  piccolod                        the single executable (daemon; piccoloctl is a symlink to it)
  piccolod.ign                    the Ignition config (JSON)
  SHA256SUMS, SHA256SUMS.asc      checksums of the above and their signature
USAGE
}

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out="$here/out"
sysext_url=""
os_id_flag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --out) out=$2; shift 2 ;;
    --os-id) os_id_flag=$2; shift 2 ;;
    --sysext-url) sysext_url=$2; shift 2 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# shellcheck source=flatcar/piccolo.env
. "$here/piccolo.env"
[ -n "$os_id_flag" ] && SYSEXT_OS_ID=$os_id_flag
case "$SYSEXT_OS_ID" in flatcar|debian) ;; *) echo "build.sh: --os-id must be flatcar or debian" >&2; exit 2 ;; esac
[ -n "$sysext_url" ] || sysext_url="$PICCOLO_UPDATE_SERVER/sysext/piccolod-$PICCOLO_VERSION.raw"

cd "$root"
# shellcheck source=scripts/lib.sh
. scripts/lib.sh
ensure_node_modules
ensure_debian_packages "mksquashfs:squashfs-tools" "gpg:gnupg" "ignition-validate:ignition"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"

echo "==> bundling daemon and CLI"
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
build_time=$(date -u +%Y-%m-%dT%H:%M:%SZ)
node flatcar/bundle.mjs "$work/piccolod.cjs" \
  "{\"version\":\"$PICCOLO_VERSION\",\"commit\":\"$commit\",\"buildTime\":\"$build_time\"}"

echo "==> making the single executable"
cat >"$work/sea.json" <<JSON
{ "main": "$work/piccolod.cjs", "output": "$work/sea.blob", "disableExperimentalSEAWarning": true, "useCodeCache": true }
JSON
node --experimental-sea-config "$work/sea.json" >/dev/null
cp "$(command -v node)" "$work/piccolod"
chmod u+w "$work/piccolod"
node_modules/.bin/postject "$work/piccolod" NODE_SEA_BLOB "$work/sea.blob" \
  --sentinel-fuse NODE_SEA_FUSE_fce680ab2cc467b6e072b8b5df1996b2 >/dev/null 2>&1
smoke=$("$work/piccolod" --frobnicate x 2>&1 || true)
case "$smoke" in
  *"unknown flag --frobnicate"*) ;;
  *) echo "build.sh: the single executable does not run: $smoke" >&2; exit 1 ;;
esac

echo "==> assembling the sysext tree"
tree="$work/tree"
install -D -m 0755 "$work/piccolod" "$tree/usr/bin/piccolod"
ln -s piccolod "$tree/usr/bin/piccoloctl"
install -D -m 0644 "$here/piccolod.service" "$tree/usr/lib/systemd/system/piccolod.service"
install -D -m 0644 "$here/update-engine.service.d/10-piccolod-dependency.conf" \
  "$tree/usr/lib/systemd/system/update-engine.service.d/10-piccolod-dependency.conf"
install -D -m 0644 "$here/piccolod.tmpfiles.conf" "$tree/usr/lib/tmpfiles.d/piccolod.conf"
install -D -m 0644 README.md "$tree/usr/share/doc/piccolod/README.md"
install -D -m 0644 docs/keys.md "$tree/usr/share/doc/piccolod/keys.md"
install -D -m 0644 "$here/update.conf" "$tree/usr/share/piccolod/update.conf"
echo "==> the signing key"
# The build's signing key: its public half ships in the sysext as the default signingKeyFiles
# (/usr/share/piccolod/signing-keys.asc), which the updater and the installer check payloads and
# install images against, and it signs the outputs below.
gnupghome=""
key=$GPG_SIGNING_KEY_ID
if [ -z "$key" ]; then
  gnupghome=$(mktemp -d)
  export GNUPGHOME=$gnupghome
  gpg --batch --quiet --passphrase '' --quick-gen-key "Piccolo development build <dev@piccolo.invalid>" ed25519 sign 1d 2>/dev/null
  key=$(gpg --batch --list-keys --with-colons | awk -F: '/^fpr/ {print $10; exit}')
  echo "    (no GPG_SIGNING_KEY_ID: signed with a throwaway key $key — development build only)"
fi
gpg --batch --armor --export "$key" >"$work/signing-key.asc"
if ! grep -q "BEGIN PGP PUBLIC KEY BLOCK" "$work/signing-key.asc"; then
  echo "build.sh: GPG_SIGNING_KEY_ID $key: gpg has no such key to export" >&2
  exit 1
fi
install -D -m 0644 "$work/signing-key.asc" "$tree/usr/share/piccolod/signing-keys.asc"

release="$tree/usr/lib/extension-release.d/extension-release.piccolod"
mkdir -p "$(dirname "$release")"
if [ "$SYSEXT_OS_ID" = flatcar ]; then
  printf 'ID=flatcar\nSYSEXT_LEVEL=1.0\nARCHITECTURE=x86-64\n' >"$release"
else
  printf 'ID=debian\nVERSION_ID=12\nARCHITECTURE=x86-64\n' >"$release"
fi
# Reproducible timestamps inside the image.
find "$tree" -exec touch -h -d "@0" {} +

echo "==> packing the squashfs image"
raw="piccolod-$PICCOLO_VERSION.raw"
mksquashfs "$tree" "$work/$raw" -all-root -noappend -comp zstd -quiet -no-progress -mkfs-time 0 >/dev/null

echo "==> writing the Ignition config"
sha512=$(sha512sum "$work/$raw" | cut -d' ' -f1)
update_conf_b64=$(base64 -w0 "$here/update.conf")
cat >"$work/piccolod.ign" <<JSON
{
  "ignition": { "version": "3.3.0" },
  "storage": {
    "files": [
      {
        "path": "/opt/extensions/piccolod/$raw",
        "mode": 420,
        "contents": { "source": "$sysext_url", "verification": { "hash": "sha512-$sha512" } }
      },
      {
        "path": "/etc/flatcar/update.conf",
        "overwrite": true,
        "mode": 420,
        "contents": { "source": "data:text/plain;base64,$update_conf_b64" }
      }
    ],
    "links": [
      { "path": "/etc/extensions/piccolod.raw", "target": "/opt/extensions/piccolod/$raw", "hard": false }
    ]
  },
  "systemd": {
    "units": [
      { "name": "systemd-sysext.service", "enabled": true },
      { "name": "piccolod.service", "enabled": true }
    ]
  }
}
JSON
ignition-validate "$work/piccolod.ign"

echo "==> checksums and signatures"
(cd "$work" && sha256sum piccolod "$raw" piccolod.ign >SHA256SUMS)
for f in "$raw" SHA256SUMS; do
  gpg --batch --yes --quiet --local-user "$key" --armor --detach-sign --output "$work/$f.asc" "$work/$f"
done
[ -n "$gnupghome" ] && rm -rf "$gnupghome"

# Replace the outputs together, so the folder never mixes two builds.
for f in piccolod "$raw" "$raw.asc" piccolod.ign SHA256SUMS SHA256SUMS.asc signing-key.asc; do
  [ -f "$work/$f" ] && mv -f "$work/$f" "$out/$f"
done
size=$(stat -c %s "$out/$raw")
echo "==> done: $out/$raw ($((size / 1024 / 1024)) MiB), piccolod.ign, SHA256SUMS(.asc)"
