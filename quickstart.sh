#!/usr/bin/env bash
# From a fresh Debian 12 machine (root) to a running local Airlock and a first query.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
./install.sh
uri=$(airlock local start | tail -n 1)
echo "connect with: psql \"$uri\""
psql "$uri" -X -f examples/first_query.sql
