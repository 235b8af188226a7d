#!/usr/bin/env bash
# Install biod on Raspberry Pi OS (bookworm) or NVIDIA Jetson (Ubuntu/JetPack) as a systemd service.
#   sudo deploy/install.sh            # from a checkout of biod
# Idempotent: re-running upgrades the package and keeps the config, the templates and the credentials'
# contents (it re-applies their owner and mode).
set -euo pipefail
trap 'echo "install.sh: failed at line $LINENO: $BASH_COMMAND - fix the cause above and run it again (it is idempotent)" >&2' ERR
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root (sudo)" >&2; exit 1; }
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=/opt/biod

echo "biod: installing system packages (python3-venv, bluez, mosquitto-clients)"
apt-get update -qq
apt-get install -y -qq python3 python3-venv python3-dev bluez mosquitto-clients >/dev/null

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || { echo "install.sh: Python >= 3.10 is required (Raspberry Pi OS bookworm or JetPack 6)" >&2; exit 1; }

id biod >/dev/null 2>&1 || useradd --system --home-dir /var/lib/biod --shell /usr/sbin/nologin biod
usermod -aG dialout,bluetooth biod

echo "biod: creating the virtual environment in $PREFIX/venv"
install -d -m 0755 "$PREFIX"
[ -x "$PREFIX/venv/bin/python" ] || python3 -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
# Built from a clean copy of the tree: pip builds in the source folder, and setuptools' build/
# there would keep files deleted upstream (and leave root-owned build/ and egg-info behind).
STAGE=$(mktemp -d)
tar -C "$SRC" --exclude=./build --exclude='./*.egg-info' --exclude=./.venv --exclude=./.git -cf - . | tar -C "$STAGE" -xf -
"$PREFIX/venv/bin/pip" install -q "$STAGE"
rm -rf "$STAGE"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"

install -d -m 0750 -g biod /etc/biod /etc/biod/credentials
# the service's StateDirectory=, made now so that `sudo biod calibrate` works before its first start
install -d -m 0700 -o biod -g biod /var/lib/biod
if [ ! -f /etc/biod/biod.yaml ]; then
    install -m 0640 -g biod "$SRC/deploy/biod.example.yaml" /etc/biod/biod.yaml
    echo "biod: wrote /etc/biod/biod.yaml - edit hub.id, ecg.port and mqtt.* before starting"
fi
# Credentials: the service gets them from systemd (LoadCredential=); group biod may read them so
# that the admin commands below (run as user biod) can open the encrypted template store too.
for cred in mqtt_password template_key; do
    if [ ! -f "/etc/biod/credentials/$cred" ]; then
        if [ "$cred" = template_key ]; then head -c 32 /dev/urandom | base64 > "/etc/biod/credentials/$cred"; else : > "/etc/biod/credentials/$cred"; fi
    fi
    chown root:biod "/etc/biod/credentials/$cred"
    chmod 0640 "/etc/biod/credentials/$cred"
done

# `biod` on the PATH for the household's admin: runs as the service user with the service's
# config and credentials, so `sudo biod calibrate --name NAME` enrols into the store the
# service reads (the raw entry point stays /opt/biod/venv/bin/biod).
cat > /usr/local/bin/biod <<'WRAPPER'
#!/bin/sh
# Installed by biod's deploy/install.sh: the biod CLI as the service user, with its config.
[ "$(id -u)" -eq 0 ] || { echo "biod: run with sudo (it acts as the biod service user)" >&2; exit 1; }
umask 077
# Relative paths (check-config biod.yaml, record --out recs) mean the caller's folder; only where
# the biod user cannot enter it does the command run in its own state folder, and says so.
if ! /usr/sbin/runuser -u biod -- test -x "$PWD"; then
    echo "biod: the biod user cannot enter $PWD: running in /var/lib/biod (give absolute paths)" >&2
    cd /var/lib/biod
fi
exec /usr/sbin/runuser -u biod -- env BIOD_CONFIG=/etc/biod/biod.yaml CREDENTIALS_DIRECTORY=/etc/biod/credentials \
    /opt/biod/venv/bin/biod "$@"
WRAPPER
chmod 0755 /usr/local/bin/biod

install -m 0644 "$SRC/deploy/99-biod.rules" /etc/udev/rules.d/99-biod.rules
udevadm control --reload-rules && udevadm trigger --subsystem-match=tty || true

install -m 0644 "$SRC/deploy/biod.service" /etc/systemd/system/biod.service
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
else  # a chroot or an SD-card image being prepared: systemd reads the unit at the next boot
    echo "biod: systemd is not running here; the unit takes effect at the next boot"
fi
/usr/local/bin/biod check-config /etc/biod/biod.yaml || echo "biod: fix /etc/biod/biod.yaml, then: systemctl enable --now biod"
# A template store written before the key existed is refused with a key (a plain file could be
# swapped in): encrypt the household's own store once, here, where it is known to be theirs.
if grep -qs '"encrypted":false' /var/lib/biod/identity/templates.json; then
    /usr/local/bin/biod people encrypt || echo "biod: could not encrypt the template store: run 'sudo biod people encrypt'"
fi
# An upgrade: a running daemon kept the old code until the next reboot (daemon-reload and
# 'enable --now' do not restart it); try-restart restarts it only if it is running.
if [ -d /run/systemd/system ] && systemctl is-active --quiet biod; then
    systemctl try-restart biod && echo "biod: restarted the running service on the new version"
fi
echo "biod: installed. Next: edit /etc/biod/biod.yaml, put the MQTT password in /etc/biod/credentials/mqtt_password,"
echo "      then 'sudo systemctl enable --now biod' and 'journalctl -u biod -f'. Check with 'sudo biod doctor'."
