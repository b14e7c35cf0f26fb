#!/bin/bash
# Runs inside the booted test VM (as piccolo-vm-test.service) and prints one line per check to the
# serial console: "PICCOLO-CHECK PASS|FAIL <name> <detail>", then "PICCOLO-DONE", then powers off.
# The mode comes from the kernel command line: piccolo.test=main (default) or piccolo.test=fresh-tpm.
set -uo pipefail
exec >/dev/ttyS0 2>&1

failures=0
pass() { echo "PICCOLO-CHECK PASS $1 ${2:-}"; }
fail() { echo "PICCOLO-CHECK FAIL $1 ${2:-}"; failures=$((failures + 1)); }
check() { local name=$1; shift; if out=$("$@" 2>&1); then pass "$name" "$(echo "$out" | tail -1)"; else fail "$name" "$(echo "$out" | tail -3 | tr '\n' ' ')"; fi; }
# Under TCG emulation everything is 10-50x slower than on hardware: generous timeouts.
# The REST gateway is HTTPS with the daemon's own certificate, and wants a token (docs/auth.md).
cert=/var/lib/piccolod/tls/cert.pem
api() { curl -fsS --max-time 60 --cacert "$cert" -H "authorization: Bearer $(piccoloctl auth token --role reader --ttl 10m)" "https://127.0.0.1:8080$1"; }
# wait_api SECONDS: until the API answers (the public health RPC), or SECONDS pass.
wait_api() {
  local end=$((SECONDS + ${1:-120}))
  while [ $SECONDS -lt "$end" ]; do
    curl -fsS --max-time 10 --cacert "$cert" https://127.0.0.1:8080/api/v1/health >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}
main_pid() { systemctl show -p MainPID --value piccolod.service; }

# The second disk carries the mode in its first bytes ("PICCOLO-MODE=main|fresh-tpm", written by
# the host before each boot) and, from 1 MiB on, the sealed key saved by the main boot. A disk
# works the same on the Debian stand-in and on Flatcar, whose kernel command line the host
# cannot set.
blob_disk=/dev/vdb
mode=$(head -c 64 "$blob_disk" | tr -d '\0' | sed -n 's/^PICCOLO-MODE=\([a-z-]*\).*/\1/p')
mode=${mode:-main}
echo "PICCOLO-MODE $mode"
here=$(dirname "$(readlink -f "$0")")

if [ "$mode" = fresh-tpm ]; then
  # The sealed credential from the first boot, read back from the second disk.
  dd if="$blob_disk" of=/tmp/blob bs=4096 skip=256 count=16 status=none
  len=$(head -c 16 /tmp/blob | tr -d '\0 ')
  head -c $((16 + len)) /tmp/blob | tail -c "$len" >/tmp/sealed
  if systemd-creds decrypt --name=piccolod_vm-key /tmp/sealed - >/tmp/out 2>/tmp/err; then
    fail fresh_tpm_refuses_key "decrypted on a fresh TPM: $(cat /tmp/out)"
  else
    pass fresh_tpm_refuses_key "$(tail -1 /tmp/err)"
  fi
  echo PICCOLO-DONE
  systemctl poweroff
  exit 0
fi

# 1. The sysext is merged and piccolod runs as root and answers.
check sysext_merged sh -c 'systemd-sysext status --no-pager | grep -q piccolod && systemd-sysext status --no-pager | tail -3'
t0=$SECONDS
if wait_api 300; then pass api_up "answering $((SECONDS - t0)) s after the checks began"; else fail api_up "no answer within 300 s"; fi
check piccolod_active systemctl is-active piccolod.service
pid=$(main_pid)
check runs_as_root sh -c "test \"\$(ps -o user= -p $pid | tr -d ' ')\" = root && echo 'user root, pid $pid'"
check api_version sh -c "curl -fsS --max-time 60 --cacert $cert -H \"authorization: Bearer \$(piccoloctl auth token --role reader --ttl 10m)\" https://127.0.0.1:8080/api/v1/version | grep -o '\"version\":\"[^\"]*\"'"
check api_refuses_without_token sh -c "test \"\$(curl -s -o /dev/null -w '%{http_code}' --max-time 60 --cacert $cert https://127.0.0.1:8080/api/v1/version)\" = 401 && echo 401"
check auth_keys_sealed_to_tpm sh -c 'grep -q "\"sealedWith\":\"tpm2\"" /var/lib/piccolod/secrets.meta/auth-keys.json && piccoloctl auth whoami | grep "^keys"'
check tpm_seen sh -c 'curl -fsS --max-time 60 --cacert '"$cert"' https://127.0.0.1:8080/api/v1/health | grep -o "\"name\":\"tpm_device\",\"status\":\"CHECK_STATUS_PASS\""'

# 2. kill -9: systemd restarts it within 5 s (a new main process), and the API answers again
#    (how long that takes under emulation is reported, not bounded: Node starts 10-50x slower here).
old=$(main_pid)
start=$(date +%s%N)
kill -9 "$old"
new=""
while [ $(( ($(date +%s%N) - start) / 1000000 )) -lt 5000 ]; do
  cur=$(main_pid)
  if [ "$cur" != 0 ] && [ "$cur" != "$old" ]; then new=$cur; break; fi
  sleep 0.1
done
ms=$(( ($(date +%s%N) - start) / 1000000 ))
if [ -n "$new" ]; then pass restarted_within_5s "new main process $new after ${ms} ms (was $old)"; else fail restarted_within_5s "no new main process after ${ms} ms"; fi
if wait_api 300; then
  pass api_back_after_kill9 "API answering $(( ($(date +%s%N) - start) / 1000000 )) ms after kill -9 (under TCG)"
else
  fail api_back_after_kill9 "API not back within 300 s"
fi

# 3. Health gate: update-engine (a stand-in unit with the real drop-in) needs a healthy piccolod.
check update_engine_dropin sh -c 'systemctl show -p Requires -p After update-engine.service | tr "\n" " " | grep -q "piccolod.service" && echo "Requires/After piccolod.service"'
check update_engine_active_when_healthy systemctl is-active update-engine.service
systemctl stop update-engine.service
mkdir -p /etc/piccolod
echo '{"stateDir": "/dev/null/not-a-folder", "restListen": "0.0.0.0:8080"}' >/etc/piccolod/config.json
systemctl stop piccolod.service
out=$(systemctl start update-engine.service 2>&1); rc=$?
state=$(systemctl is-active update-engine.service)
if [ $rc -ne 0 ] && [ "$state" != active ] && echo "$out" | grep -qi "dependency"; then
  pass update_engine_blocked_when_unhealthy "$(echo "$out" | head -1)"
else
  fail update_engine_blocked_when_unhealthy "rc=$rc state=$state out=$out"
fi
if journalctl -u piccolod.service --no-pager -n 50 | grep -q "state_dir_writable"; then
  pass unhealthy_reason_logged "state_dir_writable in the journal"
else
  fail unhealthy_reason_logged "no start-up check failure in the journal"
fi
echo '{"restListen": "0.0.0.0:8080"}' >/etc/piccolod/config.json
systemctl reset-failed piccolod.service update-engine.service
check update_engine_starts_when_healthy_again sh -c 'systemctl start update-engine.service && systemctl is-active update-engine.service piccolod.service | tr "\n" " "'
wait_api 300 || true

# 4. A key sealed with --tpm2-device=auto reaches piccolod through LoadCredentialEncrypted=.
secret="vm-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf %s "$secret" | "$here/place-keys.sh" vm-key >/dev/null 2>/tmp/seal.err
systemctl restart piccolod.service
wait_api 300 || true
got=$(cat /run/credentials/piccolod.service/piccolod_vm-key 2>/dev/null || true)
if [ "$got" = "$secret" ]; then pass credential_reaches_piccolod "\$CREDENTIALS_DIRECTORY/piccolod_vm-key matches"; else fail credential_reaches_piccolod "got '${got}' ($(cat /tmp/seal.err))"; fi
# Keep the sealed blob for the fresh-TPM boot: a 16-byte length header, then the bytes.
blob=/var/lib/piccolod/credstore/vm-key
{ printf '%-16s' "$(stat -c %s "$blob")"; cat "$blob"; } | dd of="$blob_disk" bs=4096 seek=256 conv=fsync status=none && pass sealed_blob_saved "$(stat -c %s "$blob") bytes"

# The trust and network checks below change things: an admin token, minted on the unix socket.
ADMIN_TOKEN=$(piccoloctl auth token --role admin --ttl 1h)
export ADMIN_TOKEN cert

# 6. Trust on the vTPM: the API sees the TPM and makes the identity, and a secret sealed through
#    SealSecret is read back by a transient unit with LoadCredentialEncrypted=.
# shellcheck disable=SC2016 # expanded by the inner sh, from the exported variables
check trust_tpm_present sh -c 'curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 120 https://127.0.0.1:8080/api/v1/trust/tpm | grep -o "\"present\":true"'
# shellcheck disable=SC2016
check trust_identity sh -c 'curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 300 https://127.0.0.1:8080/api/v1/trust/identity | grep -o "\"deviceId\":\"[0-9a-f]*\""'
tvalue="vm-trust-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
if curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 300 -X PUT -H 'content-type: application/json' -d "{\"value\":\"$(printf %s "$tvalue" | base64 -w0)\"}" \
  https://127.0.0.1:8080/api/v1/trust/secrets/vm-trust >/tmp/seal.json 2>&1; then
  got=$(timeout 300 systemd-run --wait --pipe --quiet -p LoadCredentialEncrypted=piccolod_vm-trust:/var/lib/piccolod/secrets/vm-trust \
    systemd-creds cat piccolod_vm-trust 2>/tmp/run.err)
  if [ "$got" = "$tvalue" ]; then pass trust_secret_in_transient_unit "systemd-run with LoadCredentialEncrypted= read it back"; else fail trust_secret_in_transient_unit "got '${got}' ($(tr '\n' ' ' </tmp/run.err))"; fi
else
  fail trust_secret_in_transient_unit "SealSecret failed: $(cat /tmp/seal.json)"
fi

# 5. Network try mode on a dummy interface (the guest's own link stays as it is): a confirmed static
# address is applied live by systemd-networkd; an unconfirmed change is applied, then reverted on
# time, both in the .network file and in the live addresses.
net_apply() { curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 60 -H 'content-type: application/json' -d "{\"interfaces\":[{\"name\":\"pdummy0\",\"mode\":\"ADDRESSING_MODE_STATIC\",\"addresses\":[\"$1\"]}],\"confirmTimeoutSeconds\":$2}" https://127.0.0.1:8080/api/v1/network/config:apply | sed -n 's/.*"id":"\([^"]*\)".*/\1/p'; }
has_addr() { ip -4 -o addr show dev pdummy0 2>/dev/null | grep -q " $1/"; }
wait_for() { local end=$((SECONDS + $1)); shift; while [ $SECONDS -lt "$end" ]; do "$@" && return 0; sleep 1; done; return 1; }
net_file=/etc/systemd/network/50-piccolod-pdummy0.network
if ip link add pdummy0 type dummy 2>/tmp/dummy.err && ip link set pdummy0 up; then
  id=$(net_apply 10.99.0.4/24 120)
  if [ -n "$id" ] && curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 60 -H 'content-type: application/json' -d "{\"id\":\"$id\"}" https://127.0.0.1:8080/api/v1/network/config:confirm >/dev/null &&
    wait_for 120 has_addr 10.99.0.4; then
    pass network_confirmed_applied "10.99.0.4/24 on pdummy0 (change $id confirmed)"
  else
    fail network_confirmed_applied "change '${id}': $(ip -4 -o addr show dev pdummy0 | tr '\n' ' ') | $(networkctl list --no-pager 2>&1 | grep pdummy0) | $(journalctl -u systemd-networkd -n 4 --no-pager -o cat 2>&1 | tr '\n' ' ')"
  fi
  t_apply=$SECONDS
  id=$(net_apply 10.99.0.5/24 30)
  if [ -n "$id" ] && wait_for 120 has_addr 10.99.0.5; then pass network_try_applied "10.99.0.5/24 live (change $id, not confirmed)"; else fail network_try_applied "change '${id}': $(ip -4 -o addr show dev pdummy0 | tr '\n' ' ')"; fi
  reverted() { grep -q 'Address=10.99.0.4/24' "$net_file" && ! has_addr 10.99.0.5 && has_addr 10.99.0.4; }
  if wait_for 300 reverted; then
    pass network_reverted "file and live address back to 10.99.0.4/24 $((SECONDS - t_apply)) s after the apply (timeout 30 s)"
  else
    fail network_reverted "$(tr '\n' ' ' <"$net_file") | $(ip -4 -o addr show dev pdummy0 | tr '\n' ' ')"
  fi
  ip link del pdummy0 2>/dev/null || true
else
  fail network_dummy_link "$(cat /tmp/dummy.err)"
fi

if [ "$failures" -gt 0 ]; then
  echo "--- piccolod journal (last 40 lines) ---"
  journalctl -u piccolod.service --no-pager -n 40 -o short-monotonic | cut -c1-300
  echo "---"
fi

# 6. The installed unit verifies in the booted system (slow under emulation, hence last and bounded).
check unit_verifies timeout 300 systemd-analyze verify --man=no /usr/lib/systemd/system/piccolod.service

echo PICCOLO-DONE
systemctl poweroff
