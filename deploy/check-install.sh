#!/usr/bin/env bash
# Run deploy/install.sh for real on a fresh Debian bookworm (the base of Raspberry Pi OS bookworm)
# made with debootstrap, and check what a household would then do with the hub.
#
#   sudo deploy/check-install.sh [ROOTFS]     # default ROOTFS: /var/tmp/biod-install-check
#
# Needs root, debootstrap and network access to deb.debian.org and PyPI. Everything is installed
# inside ROOTFS (kept afterwards for inspection; delete it by hand); the host only lends it
# /proc, /sys and /dev by bind mounts, unmounted at the end.
# systemd does not run in a chroot, so the unit is checked with `systemd-analyze verify` and the
# daemon is run the way the unit runs it (as user biod, the unit's environment), not started by
# systemd; udev rules are installed but not triggered. Prints one PASS/FAIL line per check and
# exits non-zero if any check failed. The results are written down in docs/deploy-check.md.
set -uo pipefail
[ "$(id -u)" -eq 0 ] || { echo "check-install.sh: run as root (sudo)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "check-install.sh: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${1:-/var/tmp/biod-install-check}
FAILED=0
# The host's environment (its pip index, certificates, PATH) must not leak into the fresh system.
chroot() { command env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    /usr/sbin/chroot "$@"; }

pass() { echo "PASS  $*"; }
fail() { echo "FAIL  $1"; FAILED=1; [ -z "${2-}" ] || echo "$2" | tail -n 30 | sed 's/^/      /'; }  # fail what [output]
check() {  # check "description" command...  (run inside the chroot)
    local what=$1; shift
    if out=$(chroot "$ROOT" "$@" 2>&1); then pass "$what"; else fail "$what" "$out"; fi
}
expect() {  # expect "description" "wanted output (grep -E)" command...
    local what=$1 want=$2; shift 2
    out=$(chroot "$ROOT" "$@" 2>&1)
    if echo "$out" | grep -Eq -- "$want"; then pass "$what"; else fail "$what (wanted /$want/)" "$out"; fi
}
install_biod() {  # install_biod "description" LOG: install.sh inside the chroot, timed, output in LOG
    local t0; t0=$(date +%s)
    if chroot "$ROOT" bash /root/biod/deploy/install.sh >"$2" 2>&1; then pass "$1 ($(( $(date +%s) - t0 )) s)"
    else fail "$1" "$(cat "$2")"; fi
}

if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
    echo "check-install: debootstrap bookworm into $ROOT"
    debootstrap --variant=minbase --include=ca-certificates,systemd,sudo bookworm "$ROOT" http://deb.debian.org/debian \
        >"$ROOT.debootstrap.log" 2>&1 || { echo "debootstrap failed: $ROOT.debootstrap.log" >&2; exit 1; }
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
grep -qw localhost "$ROOT/etc/hosts" 2>/dev/null || echo "127.0.0.1 localhost" >> "$ROOT/etc/hosts"
grep -qw "$(hostname)" "$ROOT/etc/hosts" || echo "127.0.1.1 $(hostname)" >> "$ROOT/etc/hosts"  # sudo looks it up
# A host behind a TLS-intercepting proxy trusts its CA locally; the fresh system must too, or
# it cannot reach PyPI. (A Pi on a home network needs nothing of the kind.)
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null 2>&1
fi
for fs in proc sys dev dev/pts; do mountpoint -q "$ROOT/$fs" || mount --bind "/$fs" "$ROOT/$fs"; done
trap 'for fs in dev/pts dev sys proc; do umount -l "$ROOT/$fs" 2>/dev/null; done' EXIT

# The checkout as a household gets it: the committed files only.
rm -rf "$ROOT/root/biod" && mkdir -p "$ROOT/root/biod"
(cd "$SRC" && git archive HEAD) | tar -x -C "$ROOT/root/biod"

echo "check-install: first install"
install_biod "install.sh on a fresh bookworm" "$ROOT/install1.log"

check "service user biod exists, in groups dialout and bluetooth" sh -c 'id -nG biod | grep -qw dialout && id -nG biod | grep -qw bluetooth'
expect "/etc/biod is 750 root:biod" '^750 root:biod$' stat -c '%a %U:%G' /etc/biod
expect "config is 640 root:biod" '^640 root:biod$' stat -c '%a %U:%G' /etc/biod/biod.yaml
expect "credentials are 640 root:biod" '^640 root:biod 640 root:biod$' sh -c 'echo $(stat -c "%a %U:%G" /etc/biod/credentials/mqtt_password /etc/biod/credentials/template_key)'
expect "state directory /var/lib/biod is 700 biod:biod" '^700 biod:biod$' stat -c '%a %U:%G' /var/lib/biod
expect "template key is 32 random bytes, base64" '^32$' sh -c 'base64 -d /etc/biod/credentials/template_key | wc -c'
check "udev rule installed" test -s /etc/udev/rules.d/99-biod.rules
check "systemd-analyze verify biod.service" systemd-analyze verify /etc/systemd/system/biod.service
expect "sudo biod --version (wrapper, as user biod)" '^biod [0-9]' sudo biod --version
expect "the wrapper refuses to run without sudo" 'run with sudo' runuser -u nobody -- /usr/local/bin/biod --version
expect "check-config says the MQTT password file is still empty (install.sh leaves it to the owner)" \
    'mqtt_password is empty; write the broker password' sudo biod check-config /etc/biod/biod.yaml
check "the owner writes the MQTT password, as install.sh asks" sh -c 'printf "s3cret\n" > /etc/biod/credentials/mqtt_password'
check "sudo biod check-config (the shipped example)" sudo biod check-config /etc/biod/biod.yaml
check "a relative path is the caller's folder (cd /etc/biod; sudo biod check-config biod.yaml)" sh -c 'cd /etc/biod && sudo biod check-config biod.yaml'
expect "from a folder the biod user cannot enter, the wrapper says where it runs" 'cannot enter /root: running in /var/lib/biod' sh -c 'cd /root && sudo biod --version'
expect "check-config names the file and line of an unknown key" 'bad.yaml:[0-9]+: hub.colour: unknown key' sh -c 'sed "s/^hub:/hub:\n  colour: blue/" /etc/biod/biod.yaml > /tmp/bad.yaml && chmod 644 /tmp/bad.yaml && sudo biod check-config /tmp/bad.yaml'
expect "sudo biod people list on an empty store" 'nobody is enrolled' sudo biod people list
expect "sudo biod doctor reports the missing serial box with a fix" 'serial' sudo biod doctor
check "the daemon never imports TensorFlow (not installed on the hub)" sh -c '! /opt/biod/venv/bin/python -c "import tensorflow" 2>/dev/null'

# The installed package end to end, as the unit runs it (user biod, umask 077, the unit's
# environment): the demo needs the embedded broker, which a hub does not install by default.
chroot "$ROOT" /opt/biod/venv/bin/pip install -q amqtt >/dev/null 2>&1
demo=$(chroot "$ROOT" sh -c 'cd /var/lib/biod && runuser -u biod -- sh -c "umask 077; HOME=/var/lib/biod timeout 900 /opt/biod/venv/bin/biod demo --speed 8 --log-level warning"' 2>&1)
right=$(echo "$demo" | grep -cE ' -> .* correct$')
if [ "$right" -eq 4 ] && echo "$demo" | grep -q 'daemon exit code 0'; then
    pass "the installed package runs the demo end to end as user biod (4/4 right)"
else
    fail "the installed package runs the demo end to end as user biod ($right/4 right)" "$demo"
fi

# Enrolment as the household does it (`sudo biod calibrate`), with the service's config but the
# emulated box (ECG-ID recording replayed 4x) in place of the serial device: the template store
# must be the encrypted one, owned by biod, mode 0600, and list the person.
sed -e 's/^  source: serial .*/  source: emulator\n  emulator: {recording: ecgid-p25-r1, speed: 4}/' \
    -e 's/^  port: .*//' "$ROOT/etc/biod/biod.yaml" > "$ROOT/etc/biod/emulated.yaml"
chroot "$ROOT" sh -c 'chown root:biod /etc/biod/emulated.yaml && chmod 0640 /etc/biod/emulated.yaml'
check "sudo biod calibrate --name alice (emulated box, rest only)" sudo biod calibrate --name alice -c /etc/biod/emulated.yaml --seconds 40 --no-walk
expect "template store is 600 biod:biod" '^600 biod:biod$' sh -c 'stat -c "%a %U:%G" /var/lib/biod/identity/templates.json'
check "template store is encrypted (no plaintext name or embedding in it)" sh -c 'test -s /var/lib/biod/identity/templates.json && ! grep -q alice /var/lib/biod/identity/templates.json'
expect "sudo biod people list shows alice" 'alice' sudo biod people list -c /etc/biod/emulated.yaml

echo "check-install: second install (idempotent: keeps config, key and templates)"
key_before=$(cat "$ROOT/etc/biod/credentials/template_key")
echo "# edited by the household" >> "$ROOT/etc/biod/biod.yaml"
install_biod "install.sh again" "$ROOT/install2.log"
[ "$(cat "$ROOT/etc/biod/credentials/template_key")" = "$key_before" ] && pass "template key kept" || fail "template key kept"
grep -q "edited by the household" "$ROOT/etc/biod/biod.yaml" && pass "edited config kept" || fail "edited config kept"
expect "enrolled persons kept (sudo biod people list)" 'alice' sudo biod people list -c /etc/biod/emulated.yaml

[ $FAILED -eq 0 ] && echo "check-install: all checks passed" || echo "check-install: some checks FAILED"
exit $FAILED
