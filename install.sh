#!/usr/bin/env bash
# Takes a fresh Debian 12 machine (as root) to an installed Airlock:
#   - Debian packages: build tools, PostgreSQL 15 and its server headers, python3-venv
#   - cargo-pgrx 0.18.1 and its PostgreSQL 15 configuration
#   - airlockd and airlock in /usr/local/bin, the extension in PostgreSQL's directories
#   - the Python runtime (pandas, numpy, pyarrow) in /opt/airlock/runtimes/python
#   - the R runtime (Debian's R, bit64, hms; the bridge and shim) in /opt/airlock/runtimes/r
# Idempotent. `./install.sh --no-apt` skips the package installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

say() { printf 'install: %s\n' "$*"; }

if [[ $(id -u) -ne 0 ]]; then
    echo "install: must run as root" >&2
    exit 1
fi

if [[ "${1:-}" != "--no-apt" ]]; then
    say "installing Debian packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq build-essential pkg-config libssl-dev libclang-dev \
        postgresql-15 postgresql-server-dev-15 sudo python3 python3-venv >/dev/null
    # R and the two packages the R runtime's type mapping uses (integer64, hms); without
    # recommends, which would pull in hundreds of R packages.
    apt-get install -y -qq --no-install-recommends r-base-core r-cran-bit64 r-cran-hms >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1'; then
    say "installing cargo-pgrx 0.18.1 (takes a few minutes)"
    cargo install --locked cargo-pgrx --version 0.18.1
fi
if ! grep -qs 'pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg15 /usr/bin/pg_config
fi

scripts/build-install.sh
say "done: airlock and airlockd are in /usr/local/bin"
