#!/usr/bin/env bash
# Install biod on Raspberry Pi OS (bookworm) or NVIDIA Jetson (Ubuntu/JetPack) as a systemd service.
#   sudo deploy/install.sh            # from a checkout of biod
# Idempotent: re-running upgrades the package and keeps /etc/biod and /var/lib/biod untouched.
set -euo pipefail
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
"$PREFIX/venv/bin/pip" install -q "$SRC"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"

install -d -m 0750 -g biod /etc/biod /etc/biod/credentials
if [ ! -f /etc/biod/biod.yaml ]; then
    install -m 0640 -g biod "$SRC/deploy/biod.example.yaml" /etc/biod/biod.yaml
    echo "biod: wrote /etc/biod/biod.yaml - edit hub.id, ecg.port and mqtt.* before starting"
fi
for cred in mqtt_password template_key; do
    if [ ! -f "/etc/biod/credentials/$cred" ]; then
        if [ "$cred" = template_key ]; then head -c 32 /dev/urandom | base64 > "/etc/biod/credentials/$cred"; else : > "/etc/biod/credentials/$cred"; fi
        chmod 0600 "/etc/biod/credentials/$cred"
    fi
done

install -m 0644 "$SRC/deploy/99-biod.rules" /etc/udev/rules.d/99-biod.rules
udevadm control --reload-rules && udevadm trigger --subsystem-match=tty || true

install -m 0644 "$SRC/deploy/biod.service" /etc/systemd/system/biod.service
systemctl daemon-reload
"$PREFIX/venv/bin/biod" check-config /etc/biod/biod.yaml || echo "biod: fix /etc/biod/biod.yaml, then: systemctl enable --now biod"
echo "biod: installed. Next: edit /etc/biod/biod.yaml, put the MQTT password in /etc/biod/credentials/mqtt_password,"
echo "      then 'sudo systemctl enable --now biod' and 'journalctl -u biod -f'. Check with '$PREFIX/venv/bin/biod doctor'."
