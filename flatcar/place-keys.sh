#!/usr/bin/env bash
# Seals API keys and other secrets to this machine's TPM with systemd-creds, into the folder that
# piccolod.service loads with LoadCredentialEncrypted= (the seed's place_keys.sh). See docs/keys.md.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: flatcar/place-keys.sh [--store DIR] [--tpm2-device DEV] [--with-key KEY] NAME [FILE]
       flatcar/place-keys.sh --list [--store DIR]
       flatcar/place-keys.sh --remove NAME [--store DIR]

Seals the secret in FILE (or read from standard input, never from the command line) as credential
NAME, so piccolod reads it at $CREDENTIALS_DIRECTORY/piccolod_NAME. Re-running with the same NAME
replaces it (after a restart of piccolod.service).

  --store DIR         credential folder (default /var/lib/piccolod/credstore)
  --tpm2-device DEV   TPM to seal to (default auto; e.g. "swtpm:host=127.0.0.1,port=2321" in tests)
  --with-key KEY      systemd-creds key: tpm2 (default), host+tpm2, or host when there is no TPM
  --list              list sealed credentials
  --remove NAME       delete one
  --help              show this help
USAGE
}

store=/var/lib/piccolod/credstore
device=auto
with_key=tpm2
mode=seal
name=""
file=""
while [ $# -gt 0 ]; do
  case "$1" in
    --help|-h) usage; exit 0 ;;
    --store) store=$2; shift 2 ;;
    --tpm2-device) device=$2; shift 2 ;;
    --with-key) with_key=$2; shift 2 ;;
    --list) mode=list; shift ;;
    --remove) mode=remove; name=$2; shift 2 ;;
    -*) echo "place-keys.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) if [ -z "$name" ]; then name=$1; elif [ -z "$file" ]; then file=$1; else echo "place-keys.sh: too many arguments" >&2; exit 2; fi; shift ;;
  esac
done

valid_name() { [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$ ]]; }

case "$mode" in
  list)
    [ -d "$store" ] || exit 0
    find "$store" -maxdepth 1 -type f -printf '%f\t%s bytes\t%TY-%Tm-%Td %TH:%TM\n' | sort
    ;;
  remove)
    valid_name "$name" || { echo "place-keys.sh: bad credential name $name" >&2; exit 2; }
    rm -f -- "$store/$name"
    echo "removed $name (restart piccolod.service to drop it from \$CREDENTIALS_DIRECTORY)"
    ;;
  seal)
    [ -n "$name" ] || { usage >&2; exit 2; }
    valid_name "$name" || { echo "place-keys.sh: credential names are letters, digits, _ . - (got $name)" >&2; exit 2; }
    install -d -m 0700 "$store"
    tmp=$(mktemp "$store/.$name.XXXXXX")
    trap 'rm -f "$tmp"' EXIT
    # The credential's embedded name must be the one systemd loads it as: piccolod_NAME.
    if [ -n "$file" ]; then src=$file; else src=-; fi
    systemd-creds encrypt --with-key="$with_key" --tpm2-device="$device" --name="piccolod_$name" "$src" "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$store/$name"
    trap - EXIT
    echo "sealed $name into $store/$name; piccolod reads it as \$CREDENTIALS_DIRECTORY/piccolod_$name after: systemctl restart piccolod"
    ;;
esac
