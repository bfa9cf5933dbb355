#!/bin/sh
# Install parrot-edge from this USB stick on a classroom computer with no internet. As root:
#
#   sh install.sh                                  the AI server, and the classroom chat on tty1
#   sh install.sh --lan-subnet 192.168.1.0/24      also answer devices on the school's network (API key)
#
# Nothing is changed until every file on the stick matches SHA256SUMS, and no file is there that
# SHA256SUMS does not list. Then: the system users parrot-edge (the server) and parrot-edge-kiosk (the
# classroom chat), a Python environment built from the wheels on the stick (never the network), the models,
# the settings in /etc/parrot-edge (only those not there yet), the systemd units, and `parrot-edge doctor`
# as the last word. Running it again, or a newer stick's install.sh, upgrades and keeps the settings and the
# models. The new environment is built beside the running one (/opt/parrot-edge-releases/…) and
# /opt/parrot-edge is switched to it only once it is complete: a failed upgrade leaves the class running.
set -eu
umask 022  # the services read what is installed here; a stricter umask of root's would lock them out

usage() {
    cat <<'EOF'
Usage: sh install.sh [options]
  --lan-subnet CIDR   also serve devices on this network (e.g. 192.168.1.0/24), with an API key;
                      "off" goes back to this computer only
  --no-kiosk          no classroom chat on tty1 (a server for the LAN only)
  --python PATH       the Python (3.11 or newer) to build the environment with (default: python3)
  --prefix DIR        install everything under DIR, for tests; implies --no-systemd
  --no-systemd        no system user, no systemctl: install the files only
EOF
}

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

BUNDLE=$(cd "$(dirname "$0")" && pwd -P)
PREFIX=
SYSTEMD=yes
KIOSK=yes
LAN_SUBNET=
PYTHON=python3

while [ $# -gt 0 ]; do
    case $1 in
        --lan-subnet) [ $# -ge 2 ] || die "--lan-subnet needs a network, e.g. 192.168.1.0/24"; LAN_SUBNET=$2; shift ;;
        --no-kiosk) KIOSK=no ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; shift ;;
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

VENV=$PREFIX/opt/parrot-edge  # a link to the release in use
RELEASES=$PREFIX/opt/parrot-edge-releases
CONFIG_DIR=$PREFIX/etc/parrot-edge
CONFIG=$CONFIG_DIR/config.toml
KIOSK_ENV=$CONFIG_DIR/kiosk.env
API_KEY_FILE=$CONFIG_DIR/api-key
DATA_DIR=$PREFIX/var/lib/parrot-edge
UNIT_DIR=$PREFIX/etc/systemd/system
COMMAND_LINK=$PREFIX/usr/local/bin/parrot-edge

bundle_info() { sed -n "s/^$1=//p" "$BUNDLE/bundle-info.txt"; }

# -- 1. the stick: exactly the files it was built with, unchanged

verify_bundle() {
    say "Checking every file on the stick against SHA256SUMS…"
    cd "$BUNDLE"
    [ -f SHA256SUMS ] || die "SHA256SUMS is missing: this is not a complete parrot-edge stick. Nothing was installed."
    if ! sha256sum --check --strict --quiet SHA256SUMS; then
        die "the files above are damaged or were changed since the stick was made. Nothing was installed." \
            "Make the stick again from the original."
    fi
    # pip installs any wheel it finds in wheels/, so a file added to the stick is refused as well.
    unlisted=$(find . ! -type d ! -path ./SHA256SUMS | sed 's|^\./||' | while IFS= read -r file; do
        cut -c 67- SHA256SUMS | grep -Fqx -- "$file" || say "  $file"
    done)
    [ -z "$unlisted" ] || die "these files are not part of the stick as it was made:
$unlisted
Nothing was installed. Delete them (or make the stick again) and run install.sh again."
}

# -- 2. this computer: root, the stick's architecture, a Python it has wheels for

check_machine() {
    if [ "$SYSTEMD" = yes ] && [ "$(id -u)" -ne 0 ]; then
        die "run it as root: sudo sh $0"
    fi
    platform=$(bundle_info platform)
    [ "$(uname -m)" = "$platform" ] || die "this stick is for $platform computers; this one is $(uname -m)."
    glibc=$(getconf GNU_LIBC_VERSION | cut -d ' ' -f 2)
    printf '%s\n%s\n' "$(bundle_info glibc)" "$glibc" | sort -V -C \
        || die "this computer's C library is glibc $glibc; the stick needs $(bundle_info glibc) or newer." \
               "Make the stick on a computer whose glibc is not newer than $glibc."
    command -v "$PYTHON" >/dev/null || die "$PYTHON not found: parrot-edge needs Python 3.11 or newer."
    "$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "$PYTHON is not Python 3.11 or newer with its venv module; choose another with --python."
    python_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    case " $(bundle_info pythons) " in
        *" $python_version "*) ;;
        *) die "the stick has wheels for Python $(bundle_info pythons), not $python_version (this computer's)." \
               "Make a stick with: parrot-edge bundle --python $python_version …" ;;
    esac
    case $LAN_SUBNET in
        "" | off) ;;
        *) "$PYTHON" -c 'import ipaddress, sys; ipaddress.ip_network(sys.argv[1], strict=False)' "$LAN_SUBNET" \
               2>/dev/null || die "--lan-subnet $LAN_SUBNET is not a network like 192.168.1.0/24" ;;
    esac
}

# -- 3. the program: a fresh Python environment from the stick's wheels

stop_services() {
    kiosk_was_running=no
    [ "$SYSTEMD" = yes ] || return 0
    if systemctl is-active --quiet parrot-edge-kiosk.service; then kiosk_was_running=yes; fi
    systemctl stop parrot-edge-kiosk.service parrot-edge.service 2>/dev/null || true
}

create_user() {
    [ "$SYSTEMD" = yes ] || return 0
    make_user parrot-edge /var/lib/parrot-edge "parrot-edge AI server"
    make_user parrot-edge-kiosk /var/lib/parrot-edge-kiosk "parrot-edge classroom chat"
}

make_user() {
    getent passwd "$1" >/dev/null && return 0
    say "Creating the system user $1…"
    useradd --system --user-group --home-dir "$2" --no-create-home --shell /usr/sbin/nologin --comment "$3" "$1"
}

build_release() {
    release=$RELEASES/$(bundle_info version)-$(date +%Y%m%d%H%M%S)-$$
    say "Installing parrot-edge $(bundle_info version) into $release (from the stick's wheels)…"
    mkdir -p "$RELEASES"
    # A new environment every time, so it holds exactly the stick's packages, for this computer's Python.
    # The interpreter is copied in, not linked: llama.cpp looks for its CPU backends beside the running
    # program, and that directory is then ours (see link_cpu_backends). It is built under its final name
    # (a venv does not survive being moved); only switch_release makes it the one in use.
    "$PYTHON" -m venv --copies --without-pip "$release"
    pip_wheel=$(find "$BUNDLE/wheels" -name 'pip-*.whl' | head -n 1)
    [ -n "$pip_wheel" ] || { rm -rf "$release"; die "the stick has no pip wheel"; }
    # pip runs straight from its wheel (the target needs no pip of its own) and sees nothing but the
    # stick: no index, no configuration files, no PIP_* variables. It installs itself too, for
    # `parrot-edge models pull --from` later.
    if ! PIP_CONFIG_FILE=/dev/null "$release/bin/python" "$pip_wheel/pip" --isolated install --quiet --no-index \
        --only-binary :all: --find-links "$BUNDLE/wheels" --no-warn-script-location \
        pip "parrot-edge[server,kiosk]==$(bundle_info version)" || ! link_cpu_backends "$release"; then
        rm -rf "$release"
        die "building the new environment failed (see above); the installed parrot-edge was not touched."
    fi
    cp "$BUNDLE/README.txt" "$BUNDLE/uninstall.sh" "$release/"
}

link_cpu_backends() {
    # The portable llama.cpp build has one CPU backend per processor generation (libggml-cpu-haswell.so,
    # …-sse42.so, …) and picks the best this CPU can run at start-up. It looks for them in the running
    # executable's directory: the copied python in <release>/bin. All but the AMX one (sapphirerapids): llama.cpp's
    # AMX kernels crash on quantised models (llama.cpp issue 20824), so such a Xeon takes the AVX-512 variant.
    site_packages=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("platlib"))')
    if ! ls "$site_packages"/bin/libggml-cpu-*.so >/dev/null 2>&1; then
        say "llama.cpp's CPU backends are missing from the installed llama-cpp-python"
        return 1
    fi
    for backend in "$site_packages"/bin/libggml-cpu-*.so; do
        case $backend in
            *-sapphirerapids.so) ;;
            *) ln -sf "$backend" "$1/bin/" ;;
        esac
    done
}

switch_release() {
    # /opt/parrot-edge names the release in use: replaced by a rename, so it is never missing or half made.
    if [ -d "$VENV" ] && [ ! -L "$VENV" ]; then  # an installation from before releases: moved aside, removed below
        mv "$VENV" "$RELEASES/previous-$$"
    fi
    ln -sfn "$release" "$VENV.new"
    mv -T "$VENV.new" "$VENV"
    # Every other release goes: the previous one, and any an interrupted install.sh left half built.
    for other in "$RELEASES"/*; do
        if [ "$other" != "$release" ]; then rm -rf "$other"; fi
    done
    mkdir -p "$(dirname "$COMMAND_LINK")"
    ln -sf "$VENV/bin/parrot-edge" "$COMMAND_LINK"
}

parrot_edge() { PARROT_EDGE_CONFIG=$CONFIG "$VENV/bin/parrot-edge" "$@"; }

# -- 4. settings: written once, never overwritten

install_config() {
    mkdir -p "$CONFIG_DIR"
    if [ -f "$CONFIG" ]; then
        say "Keeping the settings in $CONFIG."
    else
        say "Writing the settings to $CONFIG…"
        first_model=$(bundle_info models | cut -d ' ' -f 1)
        sed -e "s|@DATA_DIR@|$DATA_DIR|" -e "s|@MODEL@|$first_model|" "$BUNDLE/config.toml" >"$CONFIG.new"
        mv "$CONFIG.new" "$CONFIG"
    fi
    # The teacher PIN is a secret, so not in the world-readable settings: systemd reads this file (as root)
    # into the kiosk's environment.
    new_teacher_pin=
    if [ ! -f "$KIOSK_ENV" ]; then
        new_teacher_pin=$(printf '%06d' $(($(od -An -N4 -tu4 /dev/urandom) % 1000000)))
        (umask 077 && printf 'PARROT_EDGE_TEACHER_PIN=%s\n' "$new_teacher_pin" >"$KIOSK_ENV")
    fi
}

# -- 5. models: into the store, each checked against its manifest; an intact one is left alone

install_models() {
    mkdir -p "$DATA_DIR/models"
    # The store is root's: the server only reads it (earlier versions gave it to the server's user).
    if [ "$SYSTEMD" = yes ]; then chown -R root:root "$DATA_DIR"; fi
    for model in $(bundle_info models); do
        gguf=$(find "$BUNDLE/models/$model" -name '*.gguf' | head -n 1)
        installed=$DATA_DIR/models/$model/manifest.json
        if [ -f "$installed" ] && same_sha256 "$installed" "${gguf%.gguf}.json" \
            && parrot_edge models verify "$model" >/dev/null 2>&1; then
            say "Model $model: already installed and intact."
            continue
        fi
        if [ -f "$installed" ]; then
            say "Model $model: replacing the installed copy (damaged, or a different version)."
            parrot_edge models remove "$model" >/dev/null
        fi
        say "Model $model: copying into $DATA_DIR/models and checking its sha256…"
        parrot_edge models add "$gguf" >/dev/null
    done
}

same_sha256() {
    "$VENV/bin/python" -c 'import json, sys; sys.exit(len({json.load(open(p))["sha256"] for p in sys.argv[1:]}) != 1)' "$@"
}

# -- 6. systemd: units, LAN mode, enabled and (re)started

install_units() {
    mkdir -p "$UNIT_DIR"
    cp "$BUNDLE/systemd/parrot-edge.service" "$BUNDLE/systemd/parrot-edge-kiosk.service" "$UNIT_DIR/"
    case $LAN_SUBNET in
        "") ;;
        off) rm -f "$UNIT_DIR/parrot-edge.service.d/lan.conf" "$UNIT_DIR/parrot-edge-kiosk.service.d/lan.conf" ;;
        *) write_lan_mode ;;
    esac
}

write_lan_mode() {
    say "LAN mode: serving $LAN_SUBNET too, with the API key in $API_KEY_FILE."
    if [ ! -f "$API_KEY_FILE" ]; then
        # Root's alone from its first byte; systemd hands it to each service as a credential (LoadCredential=).
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$API_KEY_FILE")
    fi
    chmod 0600 "$API_KEY_FILE"  # a key of an earlier version was readable by the services' group
    case $LAN_SUBNET in
        *:*) any_address=:: ;;
        *) any_address=0.0.0.0 ;;
    esac
    mkdir -p "$UNIT_DIR/parrot-edge.service.d" "$UNIT_DIR/parrot-edge-kiosk.service.d"
    cat >"$UNIT_DIR/parrot-edge.service.d/lan.conf" <<EOF
# LAN mode, from install.sh --lan-subnet $LAN_SUBNET: the school's network may use the server, with the
# API key in /etc/parrot-edge/api-key. Undo with: install.sh --lan-subnet off
[Service]
LoadCredential=api-key:/etc/parrot-edge/api-key
Environment=PARROT_EDGE_HOST=$any_address PARROT_EDGE_API_KEY_FILE=%d/api-key
IPAddressAllow=$LAN_SUBNET
EOF
    cat >"$UNIT_DIR/parrot-edge-kiosk.service.d/lan.conf" <<'EOF'
# LAN mode: the server now wants the API key from every client, the classroom chat included.
[Service]
LoadCredential=api-key:/etc/parrot-edge/api-key
Environment=PARROT_EDGE_API_KEY_FILE=%d/api-key
EOF
}

start_services() {
    [ "$SYSTEMD" = yes ] || return 0
    if [ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ]; then
        say "Warning: this system does not run cgroup v2 alone, so systemd may not enforce IPAddressDeny=:"
        say "the server would then be kept off the network by its own settings only, not by the kernel."
    fi
    systemctl daemon-reload
    systemctl enable --quiet parrot-edge.service
    systemctl restart parrot-edge.service
    if [ "$KIOSK" = no ]; then
        systemctl disable --quiet parrot-edge-kiosk.service 2>/dev/null || true
        return 0
    fi
    systemctl enable --quiet parrot-edge-kiosk.service
    # Started now only if it was running: it takes over tty1, which may be where this script runs.
    if [ "$kiosk_was_running" = yes ]; then systemctl start parrot-edge-kiosk.service; fi
}

# -- 7. the last word

finish() {
    say ""
    cd /  # llama.cpp also loads backend libraries from the working directory: make it one only root writes
    if ! parrot_edge doctor; then
        die "parrot-edge is installed, but the check above found problems to fix first."
    fi
    say ""
    say "parrot-edge $(bundle_info version) is installed."
    if [ -n "$new_teacher_pin" ]; then
        say "The teacher PIN (to leave the classroom chat) is $new_teacher_pin; change it in $KIOSK_ENV."
    fi
    if [ "$SYSTEMD" = yes ] && [ "$KIOSK" = yes ]; then
        say "The classroom chat starts on the first screen (Ctrl+Alt+F1) when the computer restarts."
    fi
}

verify_bundle
check_machine
create_user
build_release
stop_services
switch_release
install_config
install_models
install_units
start_services
finish
