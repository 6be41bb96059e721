#!/usr/bin/env bash
# Runs every test: formatting and lints, then builds and installs this tree (so the
# cluster loads this tree's extension), then unit tests, the sandbox tests, the Python
# shim tests and the end-to-end tests against a real cluster and daemon.
# Needs root and what install.sh installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --release --locked --workspace --all-targets -- -D warnings

step "build and install this tree"
scripts/build-install.sh

step "python shim tests"
/opt/airlock/runtimes/python/venv/bin/python3 -m unittest discover -s runtimes/python -p 'test_*.py'

step "rust tests (unit, sandbox, end to end)"
export AIRLOCKD_BIN="$PWD/target/release/airlockd"
cargo test --release --locked --workspace --exclude airlock
