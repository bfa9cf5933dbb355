#!/bin/sh
# Remove what install.sh installed: the services, the program in /opt/parrot-edge and the parrot-edge
# command. The models (/var/lib/parrot-edge) and the settings (/etc/parrot-edge, and LAN mode's systemd
# drop-ins) stay, so installing again picks up where the classroom left off, unless --purge is given.
# As root:
#
#   sh /opt/parrot-edge/uninstall.sh [--purge]
set -eu

usage() {
    cat <<'EOF'
Usage: sh uninstall.sh [options]
  --purge        also delete the models, the settings and the system users parrot-edge(-kiosk)
  --prefix DIR   uninstall what install.sh --prefix DIR installed; implies --no-systemd
  --no-systemd   no systemctl, no userdel: remove the files only
EOF
}

say() { printf '%s\n' "$*"; }
die() { printf 'uninstall.sh: %s\n' "$*" >&2; exit 1; }

PREFIX=
SYSTEMD=yes
PURGE=no

while [ $# -gt 0 ]; do
    case $1 in
        --purge) PURGE=yes ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; SYSTEMD=no; shift ;;
        --no-systemd) SYSTEMD=no ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown option: $1" ;;
    esac
    shift
done
case $PREFIX in
    "" | /*) ;;
    *) PREFIX=$(pwd -P)/$PREFIX ;;
esac
if [ "$SYSTEMD" = yes ] && [ "$(id -u)" -ne 0 ]; then
    die "run it as root: sudo sh $0"
fi

VENV=$PREFIX/opt/parrot-edge
RELEASES=$PREFIX/opt/parrot-edge-releases
CONFIG_DIR=$PREFIX/etc/parrot-edge
DATA_DIR=$PREFIX/var/lib/parrot-edge
UNIT_DIR=$PREFIX/etc/systemd/system

if [ "$SYSTEMD" = yes ]; then
    say "Stopping the parrot-edge services…"
    systemctl disable --now --quiet parrot-edge-kiosk.service parrot-edge.service 2>/dev/null || true
fi
say "Removing the program ($VENV), the parrot-edge command and the systemd units…"
rm -rf "$VENV" "$RELEASES"
rm -f "$PREFIX/usr/local/bin/parrot-edge" "$UNIT_DIR/parrot-edge.service" "$UNIT_DIR/parrot-edge-kiosk.service"
if [ "$SYSTEMD" = yes ]; then
    systemctl daemon-reload
    # The kiosk had taken tty1 from the login prompt: give it back.
    systemctl start getty@tty1.service 2>/dev/null || true
fi

if [ "$PURGE" = yes ]; then
    say "Deleting the models ($DATA_DIR) and the settings ($CONFIG_DIR, LAN mode)…"
    rm -rf "$DATA_DIR" "$DATA_DIR-kiosk" "$CONFIG_DIR" "$UNIT_DIR/parrot-edge.service.d" \
        "$UNIT_DIR/parrot-edge-kiosk.service.d"
    for user in parrot-edge parrot-edge-kiosk; do
        if [ "$SYSTEMD" = yes ] && getent passwd "$user" >/dev/null; then userdel "$user"; fi
    done
    say "parrot-edge is gone."
else
    say "parrot-edge is removed. Kept: the models in $DATA_DIR and the settings in $CONFIG_DIR"
    say "(delete them too with: sh uninstall.sh --purge)."
fi
