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
# wait_for SECONDS CMD...: until CMD succeeds, or SECONDS pass.
wait_for() { local end=$((SECONDS + $1)); shift; while [ $SECONDS -lt "$end" ]; do "$@" && return 0; sleep 1; done; return 1; }

# The third disk is the install target of the install check (the main boot installs onto it with
# encryption tpm2; the fresh-TPM boot finds it as left). The recovery key is kept in /run (tmpfs)
# and, for the fresh-TPM boot, on the second disk at 2 MiB.
inst_disk=/dev/vdc
inst_root=/dev/vdc9
inst_img=/opt/piccolo-test/install/piccolo-os.img.gz
rk_file=/run/piccolo-test/recovery-key
install -d -m 0700 /run/piccolo-test
# unlock_root KEYFILE OPTIONS: opens the installed ROOT as crypttab would (systemd-cryptsetup attach),
# checks the mapping is active, closes it.
unlock_root() {
  local status
  /usr/lib/systemd/systemd-cryptsetup attach piccolo-vm-root "$inst_root" "$1" "$2" || return 1
  status=$(cryptsetup status piccolo-vm-root)
  /usr/lib/systemd/systemd-cryptsetup detach piccolo-vm-root || return 1
  echo "$status" | grep -q "is active" && ! cryptsetup status piccolo-vm-root >/dev/null 2>&1 &&
    echo "opened ($(echo "$status" | awk '$1 == "type:" || $1 == "size:" { $1 = ""; sub(/^ /, ""); o = o (o ? ", " : "") $0 } END { printf "%s", o }')) and closed"
}

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
  # The ROOT the main boot installed is sealed to that boot's TPM: this one cannot open it; the
  # recovery key still does.
  (umask 077 && dd if="$blob_disk" bs=4096 skip=512 count=1 status=none | tr -d '\0' >"$rk_file")
  if [ "$(wc -c <"$rk_file")" != 71 ]; then
    fail fresh_tpm_refuses_root "no recovery key saved by the main boot"
  elif unlock_root - tpm2-device=auto,headless=true >/tmp/out 2>/tmp/err; then
    fail fresh_tpm_refuses_root "a fresh TPM opened the installed ROOT: $(cat /tmp/out)"
  else
    pass fresh_tpm_refuses_root "systemd-cryptsetup through the fresh TPM: $(grep -i -m1 'tpm' /tmp/err || grep -v '^$' /tmp/err | tail -1)"
    check fresh_tpm_root_recovery_key unlock_root "$rk_file" headless=true
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

# The build's public signing key ships in the sysext and is what updates and installs are checked against.
signing_key_loaded() {
  test -s /usr/share/piccolod/signing-keys.asc &&
    journalctl -b -u piccolod.service -o cat | grep 'Piccolo signing keys loaded' | tail -1 | grep -o '"keys":\["[0-9A-Fa-f]\{40,64\}"\]'
}
check signing_key_loaded signing_key_loaded

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

# 7. An agent service (TaskService.CreateAgentService) started by the real systemd: the unit runs
#    the agent container with the docker CLI as a dynamic user, its sealed key reaches the
#    container as a read-only file and nowhere else, and a second call with another prompt
#    replaces and restarts it. The image is made here from busybox-static (no registry).
agent=vmagent
aunit=piccolo-agent-$agent.service
actr=piccolo-agent-$agent
aimage=piccolo-vm-agent:1
akey=vm-agent-key
arepo=/var/lib/piccolo/data/vm-agent-repo
avalue="vm-agent-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
asha=$(printf %s "$avalue" | sha256sum | cut -d' ' -f1)
adm() { curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 300 "$@"; }
engine_info() { docker info --format 'dockerd {{.ServerVersion}}, storage {{.Driver}}, security {{join .SecurityOptions ","}}' 2>/dev/null; }
engine_up() { systemctl start docker.service && wait_for 300 engine_info >/dev/null && engine_info; }
make_agent_image() {
  local r
  r=$(mktemp -d)
  mkdir -p "$r/bin" "$r/tmp"
  # busybox-static on the stand-in; on Flatcar the host's, placed by Ignition.
  cp "$(command -v busybox || echo "$here/busybox")" "$r/bin/busybox" || return 1
  for a in sh sleep sha256sum cat echo; do ln -s busybox "$r/bin/$a"; done
  tar -C "$r" -c . | docker import - "$aimage" >/dev/null || return 1
  rm -rf "$r"
  docker image inspect -f "$aimage {{.Id}}, {{.Size}} bytes" "$aimage"
}
seal_agent_key() {
  adm -X PUT -H 'content-type: application/json' -d "{\"value\":\"$(printf %s "$avalue" | base64 -w0)\"}" \
    "https://127.0.0.1:8080/api/v1/trust/secrets/$akey" >/dev/null && echo "$akey sealed, sha256 ${asha:0:12}…"
}
# The agent: says it is up with its prompt, then waits, and ends on SIGTERM (docker stop).
agent_template='/bin/sh -c "trap \"exit 0\" TERM; echo \"agent up: {prompt}\"; while :; do sleep 1; done"'
create_agent() { # create_agent PROMPT: CreateAgentService over REST, with start
  local tpl=${agent_template//\\/\\\\}
  tpl=${tpl//\"/\\\"}
  adm -X POST -H 'content-type: application/json' "https://127.0.0.1:8080/api/v1/tasks/services" \
    -d "{\"name\":\"$agent\",\"profile\":{\"image\":\"$aimage\",\"commandTemplate\":\"$tpl\",\"secrets\":[\"$akey\"]},\"repository\":\"$arepo\",\"prompt\":\"$1\",\"writeOnly\":false}"
}
unit_prop() { systemctl show -p "$1" --value "$aunit"; }
ctr_running() { [ "$(docker inspect -f '{{.State.Running}}' "$actr" 2>/dev/null)" = true ]; }
agent_running() { systemctl is-active --quiet "$aunit" && ctr_running; }
agent_created() {
  local out
  out=$(create_agent "$1") || return 1
  echo "$out" | grep -q '"started":true' || { echo "not started: $out"; return 1; }
  # systemd reads it whatever piccolod's umask (0077); 0600 makes it warn on every reload.
  [ "$(stat -c %a "/etc/systemd/system/$aunit")" = 644 ] || { echo "unit file mode $(stat -c %a "/etc/systemd/system/$aunit")"; return 1; }
  echo "$(echo "$out" | grep -o '"unitPath":"[^"]*"\|"replaced":[a-z]*' | tr '\n' ' ')mode 644"
}
agent_active() {
  wait_for 300 agent_running || { systemctl status --no-pager -n 0 "$aunit" | head -5; return 1; }
  echo "$aunit $(systemctl is-active "$aunit") ($(unit_prop SubState)), container $actr running"
}
agent_dynamic_user() {
  local pid uid
  pid=$(unit_prop MainPID)
  uid=$(ps -o uid= -p "$pid" | tr -d ' ')
  [ "$(unit_prop DynamicUser)" = yes ] && [ -n "$uid" ] && [ "$uid" -ne 0 ] &&
    [ "$uid" -ge 61184 ] && [ "$uid" -le 65519 ] &&
    echo "main process $pid ($(ps -o comm= -p "$pid")) runs as uid $uid (dynamic range 61184-65519), not root; groups $(ps -o supgrp= -p "$pid" | tr -d ' ')"
}
agent_in_ps() { docker ps --filter "name=^$actr\$" --filter status=running --format '{{.Names}} {{.Image}} {{.Status}}' | grep .; }
agent_secret_matches() {
  local got
  got=$(docker exec "$actr" sha256sum "/run/secrets/$akey" | cut -d' ' -f1)
  [ "$got" = "$asha" ] && echo "sha256 of /run/secrets/$akey in the container ${got:0:12}… equals the sealed value's"
}
agent_secret_read_only() {
  ! docker exec "$actr" sh -c "echo x >>/run/secrets/$akey" 2>/dev/null &&
    docker inspect -f '{{range .Mounts}}{{if eq .Destination "/run/secrets/'"$akey"'"}}{{.Source}} -> {{.Destination}} rw={{.RW}}{{end}}{{end}}' "$actr" | grep 'rw=false'
}
agent_secret_not_in_inspect() {
  local n
  n=$(docker inspect "$actr" | wc -c)
  ! docker inspect "$actr" | grep -qF "$avalue" && ! grep -qF "$avalue" "/etc/systemd/system/$aunit" &&
    ! tr '\0' ' ' <"/proc/$(unit_prop MainPID)/cmdline" | grep -qF "$avalue" &&
    echo "not in docker inspect ($n bytes), the unit file, nor the docker CLI's command line"
}
agent_secret_not_in_journal() {
  local unit_lines all_lines
  journalctl --sync 2>/dev/null || true
  unit_lines=$(journalctl -u "$aunit" --no-pager -o cat | wc -l)
  all_lines=$(journalctl --no-pager -o cat | wc -l)
  journalctl -u "$aunit" --no-pager -o cat | grep -q "agent up:" || { echo "the agent's output is not in the unit's journal"; return 1; }
  ! journalctl --no-pager -o cat | grep -qF "$avalue" &&
    echo "not in the unit's journal ($unit_lines lines, with the agent's output) nor the whole journal ($all_lines lines)"
}
new_agent() { agent_running && [ "$(unit_prop InvocationID)" != "$inv0" ] && docker inspect -f '{{json .Args}}' "$actr" | grep -q "round two"; }
agent_replaced() {
  local ctr0 out
  inv0=$(unit_prop InvocationID)
  ctr0=$(docker inspect -f '{{.Id}}' "$actr")
  out=$(agent_created "tidy the docs, round two") || { echo "$out"; return 1; }
  echo "$out" | grep -q '"replaced":true' || { echo "not replaced: $out"; return 1; }
  wait_for 300 new_agent || { echo "still the old agent: InvocationID $(unit_prop InvocationID), $(docker inspect -f '{{json .Args}}' "$actr" 2>&1)"; return 1; }
  agent_secret_matches >/dev/null || { echo "the restarted container's secret does not match"; return 1; }
  grep -q "round two" "/etc/systemd/system/$aunit" &&
    echo "replaced; InvocationID ${inv0:0:8}→$(unit_prop InvocationID | cut -c1-8), container ${ctr0:0:12}→$(docker inspect -f '{{.Id}}' "$actr" | cut -c1-12) with the new prompt, key still matching"
}
agent_stops() {
  systemctl disable --now "$aunit" >/dev/null 2>&1 || return 1
  wait_for 120 sh -c "! docker ps -a --format '{{.Names}}' | grep -qx $actr" &&
    echo "stopped and disabled: $(systemctl is-active "$aunit"), result $(unit_prop Result), container removed"
}
agent_failures=$failures
mkdir -p "$arepo"
check docker_engine_up engine_up
check agent_image_imported make_agent_image
check agent_key_sealed seal_agent_key
check agent_service_created agent_created "tidy the docs"
check agent_unit_active agent_active
check agent_dynamic_user agent_dynamic_user
check agent_container_running agent_in_ps
check agent_secret_in_container agent_secret_matches
check agent_secret_read_only agent_secret_read_only
check agent_secret_not_in_inspect agent_secret_not_in_inspect
check agent_secret_not_in_journal agent_secret_not_in_journal
check agent_replaced_and_restarted agent_replaced
check agent_stop_removes_container agent_stops
if [ "$failures" -gt "$agent_failures" ]; then
  echo "--- $aunit (status, journal; the key's value masked) ---"
  { cat "/etc/systemd/system/$aunit"; systemctl status --no-pager -n 0 "$aunit"; journalctl -u "$aunit" --no-pager -n 40 -o short-monotonic; } 2>&1 | sed "s/$avalue/<key>/g" | cut -c1-300
  echo "---"
fi

# 8. Install onto the third disk with encryption tpm2, from the signed image the host placed in the
#    guest (signed with the key the sysext ships), then open the encrypted ROOT the way crypttab
#    would: through the TPM, and with the recovery key; the key is in no log or state file.
install_tpm2() {
  local out t0=$SECONDS live=/run/piccolo/live/images
  # Where a live medium's images are (the default installerImageDirs; images come from nowhere else).
  mkdir -p "$live" && cp "$inst_img" "$inst_img.sha256" "$inst_img.asc" "$live/" || return 1
  out=$(timeout 1800 piccoloctl install run "$inst_disk" --image "$live/$(basename "$inst_img")" --encryption tpm2 --yes 2>/tmp/install.err) ||
    { echo "$out"; tail -5 /tmp/install.err; return 1; }
  (umask 077 && printf %s "$(echo "$out" | grep -Eo '^ *[cbdefghijklnrtuv]{8}(-[cbdefghijklnrtuv]{8}){7} *$' | tr -d ' ')" >"$rk_file")
  [ "$(wc -c <"$rk_file")" = 71 ] || { echo "no recovery key in piccoloctl's output: $out"; return 1; }
  if ! { blockdev --rereadpt "$inst_disk" && udevadm settle && test -b "$inst_root"; }; then echo "no $inst_root after the install"; return 1; fi
  # For the fresh-TPM boot.
  dd if="$rk_file" of="$blob_disk" bs=4096 seek=512 conv=sync,fsync status=none
  echo "installed in $((SECONDS - t0)) s: $(sgdisk -p "$inst_disk" | grep -Ec '^ +[0-9]+ ') partitions, ROOT $(blockdev --getsize64 "$inst_root") bytes on a $(blockdev --getsize64 "$inst_disk")-byte disk"
}
usr_a_written() {
  local info first count want got
  info=$(zcat "$inst_img" >/tmp/src.img && sgdisk -i 3 /tmp/src.img)
  first=$(echo "$info" | sed -n 's/^First sector: \([0-9]*\).*/\1/p')
  count=$(echo "$info" | sed -n 's/^Partition size: \([0-9]*\).*/\1/p')
  want=$(dd if=/tmp/src.img bs=512 skip="$first" count="$count" status=none | sha256sum | cut -c1-64)
  got=$(dd if="${inst_disk}3" bs=512 count="$count" status=none | sha256sum | cut -c1-64)
  rm -f /tmp/src.img
  [ -n "$count" ] && [ "$want" = "$got" ] && echo "USR-A on ${inst_disk}3 ($count sectors) has the image's SHA-256 ${got:0:12}…"
}
luks_tpm2_token() {
  local d
  d=$(cryptsetup luksDump "$inst_root") || return 1
  echo "$d" | grep -q "systemd-tpm2" && echo "$d" | grep -Eq "pcrs:[[:space:]]*7\b" &&
    echo "LUKS2 $(cryptsetup luksUUID "$inst_root"): systemd-tpm2 token, $(echo "$d" | grep -Eo "[a-z0-9-]*pcrs:[[:space:]]*7\b" | head -1 | tr -s ' ')"
}
recovery_key_not_logged() {
  local k
  k=$(cat "$rk_file")
  journalctl --sync 2>/dev/null || true
  [ -n "$k" ] && ! journalctl --no-pager -o cat | grep -qF "$k" && ! grep -rqF "$k" /var/lib/piccolod && ! grep -qF "$k" /tmp/install.err &&
    echo "not in the journal ($(journalctl --no-pager -o cat | wc -l) lines), the state folder ($(find /var/lib/piccolod -type f | wc -l) files) nor the progress output"
}
install_failures=$failures
check install_tpm2 install_tpm2
if [ "$failures" -eq "$install_failures" ]; then
  check install_usr_a_written usr_a_written
  check install_luks_tpm2_pcr7 luks_tpm2_token
  check root_unlocks_with_tpm unlock_root - tpm2-device=auto,headless=true
  check root_unlocks_with_recovery_key unlock_root "$rk_file" headless=true
  check recovery_key_not_logged recovery_key_not_logged
fi
if [ "$failures" -gt "$install_failures" ]; then
  echo "--- install (piccoloctl's progress output, last 20 lines) ---"
  tail -20 /tmp/install.err | cut -c1-300
  echo "---"
fi

# 5. Network try mode on a dummy interface (the guest's own link stays as it is): a confirmed static
# address is applied live by systemd-networkd; an unconfirmed change is applied, then reverted on
# time, both in the .network file and in the live addresses.
net_apply() { curl -fsS --cacert "$cert" -H "authorization: Bearer $ADMIN_TOKEN" --max-time 60 -H 'content-type: application/json' -d "{\"interfaces\":[{\"name\":\"pdummy0\",\"mode\":\"ADDRESSING_MODE_STATIC\",\"addresses\":[\"$1\"]}],\"confirmTimeoutSeconds\":$2}" https://127.0.0.1:8080/api/v1/network/config:apply | sed -n 's/.*"id":"\([^"]*\)".*/\1/p'; }
has_addr() { ip -4 -o addr show dev pdummy0 2>/dev/null | grep -q " $1/"; }
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
