#!/usr/bin/env bash
# Builds Airlock from this tree and installs it: the binaries, the extension, and the
# Python and R runtimes. Needs what install.sh installs. Used by install.sh and by the tests,
# so tests always run against the tree's own code.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf 'build-install: %s\n' "$*"; }

say "building airlockd, airlock and the sandbox library for warm starts (release)"
cargo build --release --locked -p airlockd -p airlock-cli -p airlock-sandbox
install -m 0755 target/release/airlockd target/release/airlock /usr/local/bin/
# The Python zygote loads it to build each call's sandbox (warm starts); airlockd finds
# it next to its own executable (target/release for tests) or here.
install -d -m 0755 /usr/local/lib/airlock
install -m 0644 target/release/libairlock_sandbox.so /usr/local/lib/airlock/

say "installing the extension into PostgreSQL 15"
(cd crates/airlock-ext && cargo pgrx install --release --pg-config /usr/bin/pg_config >/dev/null)

scripts/setup-python-runtime.sh
scripts/setup-r-runtime.sh
