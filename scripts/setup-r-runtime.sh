#!/usr/bin/env bash
# Installs Airlock's R runtime: the Rust bridge (libairlock_r.so) and the R shim that
# speak the data protocol to the Postgres backend. R itself and its packages (bit64,
# hms) come from Debian (install.sh); the sandbox runs Debian's /usr/lib/R/bin/exec/R.
#
#   scripts/setup-r-runtime.sh [PREFIX]      (default /opt/airlock/runtimes/r)
#
# Layout:
#   PREFIX/lib/libairlock_r.so     the bridge (runtimes/r/bridge, release build)
#   PREFIX/shim/airlock_runtime.R  the shim
#
# The runtime is bind-mounted read-only into each sandbox and run by an unprivileged uid,
# so everything ends up root-owned, world-readable and traversable.
#
# Idempotent: run it again after changing the bridge or the shim.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PREFIX="${1:-/opt/airlock/runtimes/r}"
SHIM="runtimes/r/airlock_runtime.R"
R_BIN=/usr/lib/R/bin/exec/R

say() { printf 'setup-r-runtime: %s\n' "$*"; }
die() { printf 'setup-r-runtime: error: %s\n' "$*" >&2; exit 1; }

# Files we create must be readable by the sandbox uid whatever the caller's umask.
umask 022

[[ "$PREFIX" = /* ]] || die "PREFIX must be an absolute path, got '$PREFIX'"
[[ -f "$SHIM" ]] || die "missing $SHIM"
[[ -x "$R_BIN" ]] || die "$R_BIN not found; install Debian's r-base-core"
for pkg in bit64 hms; do
    R_HOME=/usr/lib/R "$R_BIN" --vanilla --no-echo -e "quit(status = !requireNamespace('$pkg', quietly = TRUE))" \
        || die "R package $pkg is missing; install r-cran-$pkg (apt-get install --no-install-recommends r-cran-$pkg)"
done

IS_ROOT=0
if [[ "$(id -u)" -eq 0 ]]; then
    IS_ROOT=1
else
    say "not running as root: files stay owned by $(id -un); sandboxes expect root-owned files"
fi

# Step 1: the bridge, in release mode, from this tree.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
say "building the bridge (release)"
cargo build --release --locked -p airlock-r
SO="$TARGET_DIR/release/libairlock_r.so"
[[ -f "$SO" ]] || die "build did not produce $SO"

# Step 2: install.
mkdir -p "$PREFIX/lib" "$PREFIX/shim"
install -m 0644 "$SO" "$PREFIX/lib/libairlock_r.so"
install -m 0644 "$SHIM" "$PREFIX/shim/airlock_runtime.R"
say "installed $PREFIX/lib/libairlock_r.so and $PREFIX/shim/airlock_runtime.R"

# Step 3: ownership and permissions: root-owned, nothing writable by others, everything
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

# Step 4: smoke test: R loads the installed bridge and the packages the shim uses.
R_HOME=/usr/lib/R "$R_BIN" --vanilla --no-echo -e "
invisible(dyn.load('$PREFIX/lib/libairlock_r.so'))
stopifnot(is.loaded('wrap__airlock_start'))
suppressPackageStartupMessages({ library(bit64); invisible(loadNamespace('hms')) })
cat('setup-r-runtime: check:', R.version.string, '\n')
"
say "done: the sandbox runs $R_BIN --vanilla --no-echo -f $PREFIX/shim/airlock_runtime.R"
