#!/usr/bin/env bash
# Installs Airlock's Python runtime: a venv with pandas, numpy and pyarrow, plus the shim
# that speaks the data protocol to the Postgres backend.
#
#   scripts/setup-python-runtime.sh [PREFIX]      (default /opt/airlock/runtimes/python)
#
# Layout:
#   PREFIX/venv/                    venv on Debian's /usr/bin/python3
#   PREFIX/venv/.airlock-requirements.sha256   stamp: hash of the installed requirements
#   PREFIX/shim/airlock_runtime.py  the shim
#   PREFIX/shim/airlock_warm.py     the warm path's pre-initialised interpreter (airlockd
#                                   starts it; each call is cloned from it, then sandboxed)
#
# The runtime is bind-mounted read-only into each sandbox and run by an unprivileged uid,
# so everything ends up root-owned, world-readable and traversable, and all bytecode is
# compiled here: inside the sandbox Python cannot write __pycache__.
#
# Idempotent: run it again after changing requirements.txt or the shim.
set -euo pipefail

PREFIX="${1:-/opt/airlock/runtimes/python}"
SYSTEM_PYTHON=/usr/bin/python3
SRC_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../runtimes/python" && pwd)"
REQUIREMENTS="$SRC_DIR/requirements.txt"
SHIM="$SRC_DIR/airlock_runtime.py"
WARM="$SRC_DIR/airlock_warm.py"
VENV="$PREFIX/venv"
STAMP="$VENV/.airlock-requirements.sha256"

say() { printf 'setup-python-runtime: %s\n' "$*"; }
die() { printf 'setup-python-runtime: error: %s\n' "$*" >&2; exit 1; }

# Files we create must be readable by the sandbox uid whatever the caller's umask.
umask 022

[[ -f "$REQUIREMENTS" ]] || die "missing $REQUIREMENTS"
[[ -f "$SHIM" ]] || die "missing $SHIM"
[[ -f "$WARM" ]] || die "missing $WARM"
[[ "$PREFIX" = /* ]] || die "PREFIX must be an absolute path, got '$PREFIX'"

IS_ROOT=0
if [[ "$(id -u)" -eq 0 ]]; then
    IS_ROOT=1
else
    say "not running as root: files stay owned by $(id -un); sandboxes expect root-owned files"
fi

# Step 1: Debian's interpreter, not whatever python3 is first on PATH (pyenv and friends
# live in home directories the sandbox does not mount).
[[ -x "$SYSTEM_PYTHON" ]] || die "$SYSTEM_PYTHON not found; install Debian's python3"
say "interpreter: $SYSTEM_PYTHON ($("$SYSTEM_PYTHON" -c 'import sys; print(sys.version.split()[0])'))"

# Step 2: the venv module. Debian ships ensurepip separately in python3-venv.
if ! "$SYSTEM_PYTHON" -m venv --help >/dev/null 2>&1 \
    || ! "$SYSTEM_PYTHON" -c 'import ensurepip' >/dev/null 2>&1; then
    [[ "$IS_ROOT" -eq 1 ]] || die "python3-venv is missing; install it as root (apt-get install python3-venv)"
    say "installing python3-venv"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv
    fi
fi

# Step 3: the venv. Recreated when missing, broken, or built on another interpreter.
venv_ok() {
    [[ -x "$VENV/bin/python3" ]] || return 1
    grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null || return 1
    "$VENV/bin/python3" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null
}
mkdir -p "$PREFIX"
if venv_ok; then
    say "venv: $VENV exists"
else
    if [[ -e "$VENV" ]]; then
        say "venv: $VENV is broken or uses another interpreter; recreating it"
        rm -rf "$VENV"
    fi
    "$SYSTEM_PYTHON" -m venv "$VENV"
    say "venv: created $VENV"
fi

# Step 4: packages, only when requirements.txt changed since the last install. Wheels
# only: nothing is compiled on this machine.
WANT_HASH="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_HASH" ]]; then
    say "packages: up to date (stamp $STAMP matches requirements.txt)"
else
    say "packages: installing from $REQUIREMENTS"
    "$VENV/bin/python3" -m pip install --no-input --disable-pip-version-check \
        --require-virtualenv --only-binary=:all: -r "$REQUIREMENTS"
    "$VENV/bin/python3" -m pip check --disable-pip-version-check
    printf '%s\n' "$WANT_HASH" >"$STAMP"
    say "packages: installed; stamp written to $STAMP"
fi

# Step 5: the shim.
mkdir -p "$PREFIX/shim"
install -m 0644 "$SHIM" "$PREFIX/shim/airlock_runtime.py"
install -m 0644 "$WARM" "$PREFIX/shim/airlock_warm.py"
say "shim: installed $PREFIX/shim/airlock_runtime.py and airlock_warm.py"

# Step 6: bytecode ahead of time. The sandbox mounts the runtime read-only and runs the
# shim with -B, so any module without a .pyc here is compiled again on every run.
# (The shim itself runs as __main__ and is never loaded from bytecode.)
"$VENV/bin/python3" -m compileall -q -j 0 "$VENV/lib" "$PREFIX/shim" >/dev/null \
    || die "compileall failed"
say "bytecode: compiled $VENV/lib and $PREFIX/shim"

# Step 7: ownership and permissions: root-owned, nothing writable by others, everything
# readable and traversable by the sandbox uid, including the directories above PREFIX.
if [[ "$IS_ROOT" -eq 1 ]]; then
    chown -R root:root "$PREFIX"
fi
chmod -R u+rwX,go+rX,go-w "$PREFIX"
dir="$PREFIX"
while [[ "$dir" != "/" ]]; do
    if [[ "$(( 0$(stat -c %a "$dir") & 011 ))" -ne 011 ]]; then
        chmod go+x "$dir" 2>/dev/null || say "warning: could not make $dir traversable"
    fi
    dir="$(dirname "$dir")"
done
if [[ "$IS_ROOT" -eq 1 ]]; then
    say "permissions: $PREFIX is root-owned, world-readable, not writable by others"
else
    say "permissions: $PREFIX is world-readable, not writable by others"
fi

# Step 8: smoke test, the way a sandbox runs it: isolated mode, no bytecode writes.
"$VENV/bin/python3" -I -B -c '
import numpy, pandas, pyarrow
print(f"setup-python-runtime: check: pandas {pandas.__version__}, numpy {numpy.__version__}, pyarrow {pyarrow.__version__}")
'
say "done: run the shim as $VENV/bin/python3 -I -B $PREFIX/shim/airlock_runtime.py"
