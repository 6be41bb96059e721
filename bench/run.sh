#!/usr/bin/env bash
# Benchmark of Airlock against PL/Python (plpython3u) and PL/R (plr), on one private
# cluster, in one run, with the same 1,000,000 rows. Run as root from anywhere:
#
#   bench/run.sh            # prints a markdown table and writes bench/RESULTS.md
#
# Environment: BENCH_ROWS (default 1000000), BENCH_REPS (repetitions of the large
# measures, default 3), BENCH_CALLS (trivial calls per measure, default 50),
# BENCH_CONC_SECONDS (the 20-client run, default 20; 0 skips it), BENCH_PACED_RATE and
# BENCH_PACED_SECONDS (the paced latency measures: one client starting calls at this mean
# rate, default 10 a second, for this long, default 20 s), BENCH_WARM_POOL and
# BENCH_PREPARED (the daemon's [runtimes.python] warm_pool and prepared, default the
# daemon's defaults, 2 and 2; warm_pool 0 measures cold starts, prepared 0 builds every
# sandbox when its call arrives),
# BENCH_KEEP_LOG (a path: the daemon's debug log is copied there, with each call's
# session_folder_us, cgroup_us, spawn_us, run_us and session_removal_us), AIRLOCKD_BIN
# (default /usr/local/bin/airlockd).
#
# It installs postgresql-plpython3-15 and postgresql-15-plr from Debian when missing,
# starts a private airlockd (its own state_dir and socket) and a private PostgreSQL 15
# cluster (a temp dir, Unix socket only, run as the postgres OS user), measures, and
# stops and removes both on exit. The installed Airlock is used as it is.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PG_BIN=/usr/lib/postgresql/15/bin
AIRLOCKD="${AIRLOCKD_BIN:-/usr/local/bin/airlockd}"
PY_PREFIX="${AIRLOCK_PYTHON_PREFIX:-/opt/airlock/runtimes/python}"
PORT="${BENCH_PORT:-55432}"

if [[ $(id -u) -ne 0 ]]; then
    echo "bench/run.sh: run as root (it starts airlockd and installs Debian packages)" >&2
    exit 1
fi

# 1. The peers, from Debian.
missing=()
for p in postgresql-plpython3-15 postgresql-15-plr; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# 2. A private daemon and cluster, removed on exit.
WORK="$(mktemp -d /tmp/airlock-bench.XXXXXX)"
chmod 0755 "$WORK"
PGDATA="$WORK/pgdata"
RUN="$WORK/run"
DAEMON_PID=""
cleanup() {
    set +e
    if [[ -f "$PGDATA/postmaster.pid" ]]; then
        runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1
    fi
    if [[ -n "$DAEMON_PID" ]]; then
        kill -TERM "$DAEMON_PID" 2>/dev/null
        wait "$DAEMON_PID" 2>/dev/null
    fi
    if [[ -n "${BENCH_KEEP_LOG:-}" ]]; then
        cp "$WORK/airlockd.log" "$BENCH_KEEP_LOG"
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$PGDATA" "$RUN" "$WORK/state" "$WORK/log"
chown postgres:postgres "$PGDATA" "$RUN" "$WORK/log"
chmod 0700 "$PGDATA"
PG_UID="$(id -u postgres)"

cat >"$WORK/airlockd.toml" <<EOF
socket_path = "$WORK/airlockd.sock"
allowed_peer_uids = [$PG_UID]
state_dir = "$WORK/state"

[workers]
first_uid = 64000
count = 20
gid = 64000
queue_timeout_seconds = 120

[limits]
wall_clock_seconds = 300
cpu_seconds = 300
memory_mib = 4096
pids = 256
session_size_mib = 256
tmp_size_mib = 64

[runtimes.python]
prefix = "$PY_PREFIX"
warm_pool = ${BENCH_WARM_POOL:-2}
prepared = ${BENCH_PREPARED:-2}
EOF
RUST_LOG="${BENCH_KEEP_LOG:+airlockd=debug,}info" \
    "$AIRLOCKD" --config "$WORK/airlockd.toml" </dev/null >"$WORK/airlockd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 200); do
    [[ -S "$WORK/airlockd.sock" ]] && break
    kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/airlockd.log" >&2; exit 1; }
    sleep 0.05
done
[[ -S "$WORK/airlockd.sock" ]] || { echo "airlockd did not start" >&2; cat "$WORK/airlockd.log" >&2; exit 1; }
# Warm starts: measured once the pre-initialised interpreter is ready (or said why not).
if [[ "${BENCH_WARM_POOL:-2}" != 0 ]]; then
    for _ in $(seq 600); do
        grep -q "warm starts" "$WORK/airlockd.log" && break
        sleep 0.05
    done
    grep -h "warm starts" "$WORK/airlockd.log" | head -n1 | sed 's/^/airlockd: /' >&2 || true
fi

runuser -u postgres -- "$PG_BIN/initdb" -D "$PGDATA" -E UTF8 --locale=C.UTF-8 -U postgres -A trust >"$WORK/initdb.log" 2>&1 \
    || { cat "$WORK/initdb.log" >&2; exit 1; }
cat >>"$PGDATA/postgresql.conf" <<EOF
listen_addresses = ''
port = $PORT
unix_socket_directories = '$RUN'
shared_preload_libraries = 'airlock'
airlock.socket_path = '$WORK/airlockd.sock'
airlock.enabled = on
fsync = off
max_connections = 60
EOF
(cd / && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$PGDATA" -l "$WORK/log/postgres.log" -w -t 60 start >/dev/null) \
    || { cat "$WORK/log/postgres.log" >&2; exit 1; }

export PGHOST="$RUN" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres
"$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -c "CREATE EXTENSION airlock; CREATE EXTENSION plpython3u; CREATE EXTENSION plr;"

# 3-5. Data, measures, table.
CMD="bench/run.sh"
[[ -n "${AIRLOCKD_BIN:-}" ]] && CMD="AIRLOCKD_BIN=$AIRLOCKD_BIN $CMD"
[[ -n "${BENCH_WARM_POOL:-}" ]] && CMD="BENCH_WARM_POOL=$BENCH_WARM_POOL $CMD"
[[ -n "${BENCH_PREPARED:-}" ]] && CMD="BENCH_PREPARED=$BENCH_PREPARED $CMD"
# The sandbox alone: /usr/bin/true bare and in a full sandbox (no database involved).
(cd "$HERE/.." && cargo build --release --quiet -p airlock-sandbox --example overhead)
OVERHEAD="$("$HERE/../target/release/examples/overhead" 50)"
/usr/bin/python3 "$HERE/bench.py" --work "$WORK" --pg-bin "$PG_BIN" --py-prefix "$PY_PREFIX" \
    --results "$HERE/RESULTS.md" --command "$CMD" --overhead "$OVERHEAD"
