#!/usr/bin/env bash
# Install nika-supervisor on a systemd host, as root, from a checkout or an unpacked release:
#
#     sudo scripts/install.sh               # the supervisor only (vLLM in a venv of your own)
#     sudo scripts/install.sh --with-vllm   # ... plus vLLM itself (the [vllm] extra)
#     sudo systemctl enable --now nika-vllm
#
# What it does, each step safe to repeat:
#   1. a venv at PREFIX (default /opt/nika-supervisor) with this package installed in it
#      (re-running upgrades it in place);
#   2. the system user and group `nika` (home /var/lib/nika-vllm, no login), added to the
#      groups `video` and `render` where they exist (GPU device nodes);
#   3. /etc/nika/nika-vllm.yaml from etc/nika-vllm.yaml, only if there is none: an edited
#      config is never overwritten (the shipped one is also copied to PREFIX/share/);
#   4. /etc/systemd/system/nika-vllm.service (local changes belong in a drop-in:
#      `systemctl edit nika-vllm`), then `systemctl daemon-reload`.
# It does not enable or start the unit.
#
# Options:
#   --with-vllm        also install vLLM into the venv (pip extra [vllm])
#   --prefix DIR       venv location (default /opt/nika-supervisor; the unit is adjusted)
#   --python PYTHON    interpreter for the venv (default: python3; 3.11 or newer)
#   -h, --help         this text
# pip honours its usual environment (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_CACHE_DIR, ...).
set -euo pipefail

PREFIX=/opt/nika-supervisor
PYTHON=python3
WITH_VLLM=0
SERVICE_USER=nika
UNIT_NAME=nika-vllm.service
UNIT_DIR=/etc/systemd/system
CONFIG_DIR=/etc/nika
CONFIG=$CONFIG_DIR/nika-vllm.yaml
STATE_HOME=/var/lib/nika-vllm
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case $1 in
        --with-vllm) WITH_VLLM=1 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#--prefix=} ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift ;;
        --python=*) PYTHON=${1#--python=} ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift
done

[ "$(id -u)" -eq 0 ] || die "run as root (it creates a user and installs a systemd unit)"
case $PREFIX in /*) ;; *) die "--prefix must be an absolute path" ;; esac
for f in pyproject.toml nika_supervisor/__init__.py systemd/$UNIT_NAME etc/nika-vllm.yaml; do
    [ -e "$SRC/$f" ] || die "$SRC does not look like a nika-supervisor source tree (no $f)"
done
command -v "$PYTHON" >/dev/null || die "$PYTHON not found (use --python)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); nika-supervisor needs Python 3.11 or newer"
"$PYTHON" -c 'import ensurepip, venv' 2>/dev/null \
    || die "$PYTHON cannot create venvs (Debian/Ubuntu: apt install python3-venv)"

# 1. The venv and the package. pip builds in the source directory, so build from a copy: the
#    checkout stays as it was.
if [ ! -x "$PREFIX/bin/python" ]; then
    say "creating the venv $PREFIX"
    "$PYTHON" -m venv "$PREFIX"
fi
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=./.cache -cf - . | tar -C "$build" -xf -
spec=$build what=nika-supervisor
if [ "$WITH_VLLM" -eq 1 ]; then
    spec="$build[vllm]" what="nika-supervisor with vLLM"
fi
say "installing $what into $PREFIX"
# --force-reinstall --no-deps first: the version number may not have changed since the last
# install, and pip would then keep the old code. The second call brings the dependencies.
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
    --force-reinstall "$build"
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"
install -d -m 0755 "$PREFIX/share"
install -m 0644 "$SRC/README.md" "$PREFIX/README.md"
install -m 0644 "$SRC/etc/nika-vllm.yaml" "$PREFIX/share/nika-vllm.yaml.example"
"$PREFIX/bin/nika-supervisor" --help >/dev/null || die "$PREFIX/bin/nika-supervisor does not run"

# 2. The service user.
if getent passwd "$SERVICE_USER" >/dev/null; then
    say "user $SERVICE_USER exists"
else
    nologin=$(command -v nologin || echo /usr/sbin/nologin)
    say "creating the system user $SERVICE_USER"
    useradd --system --user-group --home-dir "$STATE_HOME" --no-create-home \
        --shell "$nologin" --comment "nika-supervisor (vLLM)" "$SERVICE_USER"
fi
for group in video render; do
    if getent group "$group" >/dev/null; then
        usermod -a -G "$group" "$SERVICE_USER"
        say "$SERVICE_USER is in group $group"
    fi
done

# 3. The configuration: never overwrite an edited one.
install -d -m 0755 "$CONFIG_DIR"
if [ -e "$CONFIG" ]; then
    say "kept the existing $CONFIG (the shipped one is $PREFIX/share/nika-vllm.yaml.example)"
else
    install -m 0640 -o root -g "$SERVICE_USER" "$SRC/etc/nika-vllm.yaml" "$CONFIG"
    say "installed $CONFIG: edit it (model, port, GPU settings), then start the unit"
fi
"$PREFIX/bin/nika-supervisor" check --config "$CONFIG" \
    || say "warning: $CONFIG does not validate yet (see above); the unit would exit 78"

# 4. The unit, pointing at this venv.
install -d -m 0755 "$UNIT_DIR"
sed "s|/opt/nika-supervisor/|$PREFIX/|g" "$SRC/systemd/$UNIT_NAME" > "$UNIT_DIR/.$UNIT_NAME.tmp"
chmod 0644 "$UNIT_DIR/.$UNIT_NAME.tmp"
mv -f "$UNIT_DIR/.$UNIT_NAME.tmp" "$UNIT_DIR/$UNIT_NAME"
say "installed $UNIT_DIR/$UNIT_NAME"
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "systemd reloaded. Next: systemctl enable --now ${UNIT_NAME%.service}"
    say "then: systemctl status ${UNIT_NAME%.service}; journalctl -u ${UNIT_NAME%.service} -f"
else
    say "systemd is not running here: run 'systemctl daemon-reload' on the target system"
fi
