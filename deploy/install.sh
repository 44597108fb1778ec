#!/usr/bin/env bash
# Install somad as a systemd service on Debian / Raspberry Pi OS (64-bit), from the checkout this
# script lives in. Idempotent: run it again to upgrade. See deploy/README.md.
#
#   sudo deploy/install.sh [--config EXAMPLE] [--instance NAME] [--enable]
#   sudo deploy/install.sh --uninstall [--purge]
#
# What it does: a system user `somad` (also in group dialout, for serial ports); /etc/somad
# (root:somad 0750) with an example config, never overwriting one that is there; a virtualenv
# in /opt/somad/venv holding torch (CPU) and somad; the units somad.service and somad@.service
# in /etc/systemd/system; /usr/local/bin/somad. /var/lib/somad is made by systemd
# (StateDirectory=). Nothing is enabled or started unless --enable.
set -euo pipefail

TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
SERVICE_USER="somad"
UNITS=(somad.service somad@.service)

usage() {
    cat <<'EOF'
usage: install.sh [options]            install or upgrade
       install.sh --uninstall [--purge] remove (keeps /etc/somad and /var/lib/somad unless --purge)

options:
  --config EXAMPLE   example from configs/ to install as the config when none exists
                     (default: simulate; e.g. pi-serial)
  --instance NAME    install /etc/somad/NAME.yaml for the template unit somad@NAME
                     (state in /var/lib/somad/NAME) instead of /etc/somad/somad.yaml
  --enable           enable (and, under a running systemd, start or restart) the service
  --no-deps          install somad alone: no torch, no dependencies (tests, or a venv you fill)
  --wheelhouse DIR   install offline from the wheels in DIR (somad's own wheel is built from
                     the checkout when DIR has none)
  --python PY        interpreter for the virtualenv (default: python3; needs >= 3.11)
  --root DIR         install under DIR instead of / (tests, staging); systemd is not touched
  --uninstall        remove the venv, the units and /usr/local/bin/somad
  --purge            with --uninstall: also remove /etc/somad, /var/lib/somad and the user
  -h, --help         this text

environment: SOMAD_PIP_ARGS  extra arguments for every pip call (e.g. a proxy or index)
EOF
}

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }
usage_error() { say "$*"; usage >&2; exit 2; }

# ----------------------------------------------------------------------------- arguments

ROOT=""
MODE="install"
PURGE=0
ENABLE=0
WITH_DEPS=1
WHEELHOUSE=""
EXAMPLE="simulate"
INSTANCE=""
PYTHON="python3"
CHANGED=0  # set when the program, the units or the config changed: running services restart

parse_args() {
    while [ $# -gt 0 ]; do
        case "$1" in
            --config) [ $# -ge 2 ] || usage_error "--config needs a value"; EXAMPLE=$2; shift ;;
            --instance) [ $# -ge 2 ] || usage_error "--instance needs a value"; INSTANCE=$2; shift ;;
            --enable) ENABLE=1 ;;
            --no-deps) WITH_DEPS=0 ;;
            --wheelhouse) [ $# -ge 2 ] || usage_error "--wheelhouse needs a value"; WHEELHOUSE=$2; shift ;;
            --python) [ $# -ge 2 ] || usage_error "--python needs a value"; PYTHON=$2; shift ;;
            --root) [ $# -ge 2 ] || usage_error "--root needs a value"; ROOT=$2; shift ;;
            --uninstall) MODE="uninstall" ;;
            --purge) PURGE=1 ;;
            -h | --help) usage; exit 0 ;;
            *) usage_error "unknown option: $1" ;;
        esac
        shift
    done
    if [ "$PURGE" = 1 ] && [ "$MODE" != "uninstall" ]; then
        usage_error "--purge only goes with --uninstall"
    fi
    if [ -n "$INSTANCE" ] && ! [[ "$INSTANCE" =~ ^[A-Za-z0-9_.-]{1,64}$ ]]; then
        usage_error "--instance: expected letters, digits, '_', '.', '-' (at most 64), got '$INSTANCE'"
    fi
    if [ -n "$ROOT" ]; then
        [ -d "$ROOT" ] || die "--root $ROOT: no such directory"
        ROOT=$(cd "$ROOT" && pwd)
    fi
    if [ -n "$WHEELHOUSE" ]; then
        [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: no such directory"
        WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
    fi
}

# ----------------------------------------------------------------------------- paths

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)  # the checkout: deploy/..

set_paths() {
    OPT=$ROOT/opt/somad
    VENV=$OPT/venv
    EXAMPLES=$OPT/share/configs
    ETC=$ROOT/etc/somad
    UNIT_DIR=$ROOT/etc/systemd/system
    STATE=$ROOT/var/lib/somad
    BIN_LINK=$ROOT/usr/local/bin/somad
    PASSWD=$ROOT/etc/passwd
    GROUP=$ROOT/etc/group
}

# A live system (not --root) whose init is systemd: only then daemon-reload, start, stop.
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

systemctl_() {
    if [ -n "$ROOT" ]; then systemctl --root="$ROOT" "$@"; else systemctl "$@"; fi
}

# ----------------------------------------------------------------------------- checks

check_platform() {
    if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
        die "run as root (sudo), or pass --root DIR to install under DIR"
    fi
    if ! grep -qs '^name = "somad"' "$SRC/pyproject.toml"; then
        die "$SRC is not a somad checkout (no pyproject.toml naming somad)"
    fi
    [ -n "$(package_version)" ] || die "no version = \"...\" in $SRC/pyproject.toml"
    [ -n "$(torch_pin)" ] || die "no \"torch==...\" dependency in $SRC/pyproject.toml"
    if [ ! -f "$SRC/configs/$EXAMPLE.yaml" ]; then
        die "--config $EXAMPLE: no $SRC/configs/$EXAMPLE.yaml (examples: $(example_names))"
    fi
    if [ "$WITH_DEPS" = 1 ]; then
        case "$(uname -m)" in
            aarch64 | arm64 | x86_64) ;;
            *) die "torch has no wheels for $(uname -m): use a 64-bit OS (Raspberry Pi OS 64-bit on a Pi 3, 4 or 5)" ;;
        esac
    fi
    command -v useradd >/dev/null || die "useradd not found (package passwd)"
    command -v systemctl >/dev/null || die "systemctl not found: this installer is for systemd systems"
    if ! command -v "$PYTHON" >/dev/null; then
        apt_install python3 python3-venv
    fi
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
        || die "$PYTHON is $("$PYTHON" -V 2>&1); somad needs Python >= 3.11 (Debian 12 / Raspberry Pi OS bookworm or later)"
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        apt_install python3-venv
    fi
}

apt_install() {
    if [ -n "$ROOT" ] || ! command -v apt-get >/dev/null; then
        die "missing: $* (install them first)"
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Version of the somad package in the checkout, and its torch pin, from pyproject.toml.
package_version() {
    sed -n 's/^version = "\(.*\)"$/\1/p' "$SRC/pyproject.toml" | head -n 1
}

torch_pin() {
    sed -n 's/^ *"\(torch==[^"]*\)",$/\1/p' "$SRC/pyproject.toml" | head -n 1
}

# Numeric id of a group in the target root's /etc/group (chown must not consult the host).
group_id() {
    awk -F: -v g="$1" '$1 == g { print $3; found = 1 } END { exit !found }' "$GROUP"
}

# ----------------------------------------------------------------------------- install steps

ensure_user() {
    local root_args=()
    [ -n "$ROOT" ] && root_args=(--root "$ROOT")
    if ! grep -q "^$SERVICE_USER:" "$PASSWD" 2>/dev/null; then
        say "creating system user $SERVICE_USER"
        useradd "${root_args[@]}" --system --user-group --home-dir /var/lib/somad --no-create-home \
            --shell /usr/sbin/nologin --comment "somad streaming anomaly daemon" "$SERVICE_USER" \
            2> >(grep -v "missing or non-executable shell" >&2)
    fi
    # dialout owns the serial ports (the units also add it with SupplementaryGroups=); being a
    # member lets `sudo -u somad somad check` open them too.
    if grep -q '^dialout:' "$GROUP" && ! id_in_group "$SERVICE_USER" dialout; then
        usermod "${root_args[@]}" --append --groups dialout "$SERVICE_USER"
    fi
}

id_in_group() {
    awk -F: -v u="$1" -v g="$2" '$1 == g { n = split($4, m, ","); for (i = 1; i <= n; i++) if (m[i] == u) found = 1 } END { exit !found }' "$GROUP"
}

make_directories() {
    local gid
    gid=$(group_id "$SERVICE_USER") || die "group $SERVICE_USER missing from $GROUP"
    install -d -m 0755 "$OPT" "$OPT/share" "$UNIT_DIR" "$(dirname "$BIN_LINK")"
    # Configs may hold secrets (password_file:): readable by root and the service only.
    install -d -m 0750 -o 0 -g "$gid" "$ETC"
}

make_venv() {
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        return 0
    fi
    # Missing, or broken by an OS upgrade that replaced its Python: build it afresh.
    say "creating virtualenv $VENV"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
}

pip_() {
    # SOMAD_PIP_ARGS is split on spaces on purpose: it holds several arguments.
    # shellcheck disable=SC2086
    "$VENV/bin/python" -m pip --disable-pip-version-check --no-input -q "$@" ${SOMAD_PIP_ARGS:-}
}

# Index arguments: the wheelhouse alone when offline, else the default index.
index_args() {
    if [ -n "$WHEELHOUSE" ]; then printf '%s\n' --no-index --find-links "$WHEELHOUSE"; fi
}

install_torch() {
    local have pin
    pin=$(torch_pin)
    have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)
    if [ "${have%%+*}" = "${pin#torch==}" ]; then
        return 0
    fi
    say "installing $pin (CPU)"
    local idx
    mapfile -t idx < <(index_args)
    if [ -n "$WHEELHOUSE" ]; then
        pip_ install "${idx[@]}" "$pin"
    elif [ "$(uname -m)" = x86_64 ]; then
        # PyPI's x86_64 wheels pull in CUDA (gigabytes): take PyTorch's CPU index.
        pip_ install "$pin" --index-url "$TORCH_CPU_INDEX"
    else
        # aarch64 wheels on PyPI are CPU-only.
        pip_ install "$pin" --only-binary=:all:
    fi
}

# somad's wheel for the checkout's version: from the wheelhouse if it has one, else built from
# a clean copy of the checkout (the build then leaves nothing behind in the checkout).
somad_wheel_dir() {
    local version=$1 build_dir=$2
    if [ -n "$WHEELHOUSE" ] && compgen -G "$WHEELHOUSE/somad-$version-*.whl" >/dev/null; then
        echo "$WHEELHOUSE"
        return 0
    fi
    mkdir -p "$build_dir/src" "$build_dir/wheels"
    cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/somad" "$SRC/adapters" "$build_dir/src/"
    find "$build_dir/src" -name __pycache__ -prune -exec rm -rf {} +
    find "$build_dir/src" -name 'recurrence-*.so' -delete  # kernels built in the checkout: this device's are built below
    local idx
    mapfile -t idx < <(index_args)
    say "building somad $version from $SRC"
    pip_ wheel "${idx[@]}" --no-deps --wheel-dir "$build_dir/wheels" "$build_dir/src" >/dev/null
    echo "$build_dir/wheels"
}

install_somad() {
    local version build_dir wheels wheel digest idx stamp=$VENV/.somad-wheel.sha256
    version=$(package_version)
    build_dir=$(mktemp -d)
    # shellcheck disable=SC2064  # expand now: build_dir is local
    trap "rm -rf '$build_dir'" EXIT
    wheels=$(somad_wheel_dir "$version" "$build_dir")
    # The wheel by its file name, never "somad" from an index: a same-named package there
    # must not win.
    wheel=$(compgen -G "$wheels/somad-$version-*.whl" | head -n 1)
    if [ "$WITH_DEPS" = 1 ]; then
        install_torch
        mapfile -t idx < <(index_args)
        pip_ install "${idx[@]}" "$wheel"  # and its dependencies
    fi
    # Replace the package whenever its wheel differs from the one installed last (a newer
    # checkout may keep the version number); the same wheel again changes nothing.
    digest=$(sha256sum "$wheel" | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ] || ! "$VENV/bin/python" -I -c 'import somad' 2>/dev/null; then
        say "installing somad $version into $VENV"
        pip_ install --no-index --no-deps --force-reinstall "$wheel"
        echo "$digest" >"$stamp"
        CHANGED=1
    fi
    # The learner's native kernel, built now into the package: the service's file system is
    # read-only (ProtectSystem=strict). Without a compiler the service runs the torch path.
    "$VENV/bin/python" -I -m somad.native >/dev/null 2>&1 \
        || say "note: no native kernel built (no C compiler?): somad will learn with its slower torch path"
    rm -rf "$build_dir"
    trap - EXIT
    ln -sfn /opt/somad/venv/bin/somad "$BIN_LINK"
}

example_names() {
    find "$SRC/configs" -maxdepth 1 -name '*.yaml' -printf '%f\n' | sed 's/\.yaml$//' | sort | paste -sd ' ' -
}

install_configs() {
    local example=$SRC/configs/$EXAMPLE.yaml gid target name
    rm -rf "$EXAMPLES"
    install -d -m 0755 "$EXAMPLES"
    install -m 0644 "$SRC"/configs/*.yaml "$EXAMPLES/"
    gid=$(group_id "$SERVICE_USER")
    name=${INSTANCE:-somad}
    target=$ETC/$name.yaml
    if [ -e "$target" ]; then
        say "keeping existing $target"
        return 0
    fi
    say "installing $target from configs/$EXAMPLE.yaml"
    # State goes where the unit's StateDirectory= is: systemd passes it as $STATE_DIRECTORY.
    # The default after :- is the same place, for `somad check` run from a shell.
    local state_line="state_dir: \${STATE_DIRECTORY:-/var/lib/somad${INSTANCE:+/$INSTANCE}}  # systemd StateDirectory= (set by install.sh)"
    # An instance may write only below its own state directory (ProtectSystem=strict): move
    # the example's other paths there too (a sink's file, say).
    local move_paths="s|/var/lib/somad/|/var/lib/somad/${INSTANCE:+$INSTANCE/}|g"
    if grep -q '^state_dir:' "$example"; then
        sed -e "$move_paths" -e "s|^state_dir:.*|$state_line|" "$example" >"$target.tmp"
    else
        { printf '%s\n' "$state_line"; sed -e "$move_paths" "$example"; } >"$target.tmp"
    fi
    chown "0:$gid" "$target.tmp"
    chmod 0640 "$target.tmp"
    CHANGED=1
    mv "$target.tmp" "$target"
}

install_units() {
    local unit
    for unit in "${UNITS[@]}"; do
        if ! cmp -s "$SRC/systemd/$unit" "$UNIT_DIR/$unit"; then
            install -m 0644 "$SRC/systemd/$unit" "$UNIT_DIR/$unit"
            CHANGED=1
        fi
    done
    if systemd_running && [ "$CHANGED" = 1 ]; then
        systemctl daemon-reload
    fi
}

# The unit this install is for: somad.service, or somad@NAME.service with --instance NAME.
unit_name() {
    if [ -n "$INSTANCE" ]; then echo "somad@$INSTANCE.service"; else echo somad.service; fi
}

enable_service() {
    local unit
    unit=$(unit_name)
    if systemd_running && [ "$CHANGED" = 1 ]; then
        # An upgrade: what runs restarts on the new program (it resumes from its checkpoints).
        systemctl try-restart somad.service 'somad@*.service'
    fi
    if [ "$ENABLE" = 1 ]; then
        systemctl_ enable "$unit" 2>&1 | sed 's/^/install.sh: /' >&2
        if systemd_running && ! systemctl is-active --quiet "$unit"; then
            say "starting $unit"
            systemctl start "$unit"
        fi
    fi
}

do_install() {
    check_platform
    ensure_user
    make_directories
    make_venv
    install_somad
    install_configs
    install_units
    enable_service
    say "done: $("$VENV/bin/python" -I -c 'import importlib.metadata as m; print("somad", m.version("somad"))')" \
        "in $VENV; config in $ETC; units in $UNIT_DIR"
    if [ "$ENABLE" = 0 ]; then
        say "nothing enabled; to start now and at boot: systemctl enable --now $(unit_name)"
    fi
}

# ----------------------------------------------------------------------------- uninstall

# Units of ours that are enabled: somad.service and every somad@NAME.service with a link.
enabled_units() {
    find "$UNIT_DIR" -mindepth 2 -maxdepth 2 \( -name somad.service -o -name 'somad@?*.service' \) \
        -printf '%f\n' 2>/dev/null | sort -u
}

do_uninstall() {
    if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
        die "run as root (sudo), or pass --root DIR"
    fi
    local unit units
    mapfile -t units < <(enabled_units)
    if systemd_running; then
        systemctl stop somad.service 'somad@*.service' || true
    fi
    for unit in "${units[@]}"; do
        systemctl_ disable "$unit" 2>&1 | sed 's/^/install.sh: /' >&2
    done
    for unit in "${UNITS[@]}"; do
        rm -f "$UNIT_DIR/$unit"
    done
    if systemd_running; then
        systemctl daemon-reload
    fi
    if [ "$(readlink "$BIN_LINK" 2>/dev/null)" = /opt/somad/venv/bin/somad ]; then
        rm -f "$BIN_LINK"
    fi
    rm -rf "$OPT"
    if [ "$PURGE" = 1 ]; then
        say "purging $ETC, $STATE and user $SERVICE_USER"
        rm -rf "$ETC" "$STATE" "$ROOT/var/lib/private/somad"
        local root_args=()
        [ -n "$ROOT" ] && root_args=(--root "$ROOT")
        if grep -q "^$SERVICE_USER:" "$PASSWD" 2>/dev/null; then
            userdel "${root_args[@]}" "$SERVICE_USER"
        fi
        # userdel leaves the group behind where login.defs lacks USERGROUPS_ENAB.
        if grep -q "^$SERVICE_USER:" "$GROUP" 2>/dev/null; then
            groupdel "${root_args[@]}" "$SERVICE_USER"
        fi
    else
        say "kept $ETC and $STATE (remove them with --uninstall --purge)"
    fi
    say "uninstalled"
}

main() {
    parse_args "$@"
    set_paths
    if [ "$MODE" = uninstall ]; then do_uninstall; else do_install; fi
}

main "$@"
