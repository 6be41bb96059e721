"""Measures Airlock, PL/Python and PL/R on a running private cluster; see bench/run.sh.

Timing comes from pgbench's per-transaction log (microseconds, measured by the client
around each transaction); memory from /proc/<backend pid>/status of a psql session
found through pg_stat_activity. Standard library only.
"""

import argparse
import json
import datetime
import glob
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROWS = int(os.environ.get("BENCH_ROWS", "1000000"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
CALLS = int(os.environ.get("BENCH_CALLS", "50"))
# The paced latency measures: one client starting calls at this mean rate (pgbench -R,
# a Poisson schedule) for this long. Back to back, a trivial call's latency is bounded
# by the CPU every call takes on this machine (the sandbox's clone, exit and refill);
# paced, it is the latency a client sees while the machine keeps up.
PACED_RATE = float(os.environ.get("BENCH_PACED_RATE", "10"))
PACED_SECONDS = int(os.environ.get("BENCH_PACED_SECONDS", "20"))
CONC_SECONDS = int(os.environ.get("BENCH_CONC_SECONDS", "20"))

SYSTEMS = ["airlock", "plpython", "plr"]
TITLES = {"airlock": "Airlock", "plpython": "PL/Python", "plr": "PL/R"}
COLS = "id int8, k int4, x float8, y float8, s text"


def py_preamble(site):
    # plpython3u uses Debian's libpython3.11; pandas comes from the Airlock runtime's
    # venv (built on the same Python), so both sides run the same pandas and numpy.
    return (
        "import sys\n"
        f"if {site!r} not in sys.path: sys.path.append({site!r})\n"
        "import pandas as pd, numpy as np\n"
    )


MAKE_ROWS = (
    "n = {n}\n"
    "a = np.arange(n, dtype='int64')\n"
    "df = pd.DataFrame({{'id': a, 'k': (a % 1000).astype('int32'), 'x': np.random.random(n),"
    " 'y': np.random.random(n), 's': pd.Series(a).astype(str).str.zfill(16)}})\n"
)
GROUPBY = "df.assign(p=df.x * df.y).groupby('k', as_index=False)['p'].sum()"


def setup_sql(site):
    pre = py_preamble(site)
    n = ROWS
    return f"""
CREATE TABLE t AS
  SELECT g::int8 AS id, (g % 1000)::int4 AS k, random() AS x, random() AS y,
         substr(md5(g::text), 1, 16) AS s
  FROM generate_series(1, {n}) g;
VACUUM ANALYZE t;
CREATE TYPE one AS (a int8);
CREATE TYPE kp AS (k int4, p float8);

CREATE FUNCTION py_trivial() RETURNS SETOF one LANGUAGE plpython3u AS $py$
{pre}df = pd.DataFrame({{'a': [1]}})
return df.itertuples(index=False, name=None)
$py$;
CREATE FUNCTION py_roundtrip() RETURNS SETOF t LANGUAGE plpython3u AS $py$
{pre}rows = plpy.execute('SELECT * FROM t')
df = pd.DataFrame.from_records(list(rows), columns=rows.colnames())
del rows
return df.itertuples(index=False, name=None)
$py$;
CREATE FUNCTION py_in() RETURNS SETOF kp LANGUAGE plpython3u AS $py$
{pre}rows = plpy.execute('SELECT * FROM t')
df = pd.DataFrame.from_records(list(rows), columns=rows.colnames())
del rows
return {GROUPBY}.itertuples(index=False, name=None)
$py$;
CREATE FUNCTION py_out() RETURNS SETOF t LANGUAGE plpython3u AS $py$
{pre}{MAKE_ROWS.format(n=n)}return df.itertuples(index=False, name=None)
$py$;

CREATE FUNCTION r_trivial() RETURNS SETOF one LANGUAGE plr AS $r$
data.frame(a = 1L)
$r$;
CREATE FUNCTION r_roundtrip() RETURNS SETOF t LANGUAGE plr AS $r$
options(scipen = 100)  # int8 read as R doubles would otherwise come back as '1e+05'
pg.spi.exec('SELECT * FROM t')
$r$;
CREATE FUNCTION r_in() RETURNS SETOF kp LANGUAGE plr AS $r$
d <- pg.spi.exec('SELECT * FROM t')
s <- tapply(d$x * d$y, d$k, sum)
data.frame(k = as.integer(names(s)), p = as.numeric(s))
$r$;
CREATE FUNCTION r_out() RETURNS SETOF t LANGUAGE plr AS $r$
n <- {n}L
i <- seq_len(n)
data.frame(id = i, k = i %% 1000L, x = runif(n), y = runif(n),
           s = sprintf('%016d', i), stringsAsFactors = FALSE)
$r$;
"""


def q(s):
    """A SQL string literal."""
    return "'" + s.replace("'", "''") + "'"


def airlock_call(script, input_sql, coldef):
    inp = q(input_sql) if input_sql else "NULL"
    return (
        f"SELECT * FROM airlock.execute_external_script('python', {q(script)}, {inp}) "
        f"AS r({coldef})"
    )


def queries():
    """The query of each (measure, system), as a single line."""
    trivial = {
        "airlock": airlock_call("OutputDataSet = pd.DataFrame({'a': [1]})", None, "a int8"),
        "plpython": "SELECT * FROM py_trivial()",
        "plr": "SELECT * FROM r_trivial()",
    }
    roundtrip = {
        "airlock": airlock_call("OutputDataSet = InputDataSet", "SELECT * FROM t", COLS),
        "plpython": "SELECT * FROM py_roundtrip()",
        "plr": "SELECT * FROM r_roundtrip()",
    }
    data_in = {
        "airlock": airlock_call(
            "df = InputDataSet\nOutputDataSet = " + GROUPBY, "SELECT * FROM t", "k int4, p float8"
        ),
        "plpython": "SELECT * FROM py_in()",
        "plr": "SELECT * FROM r_in()",
    }
    data_out = {
        "airlock": airlock_call(MAKE_ROWS.format(n=ROWS) + "OutputDataSet = df", None, COLS),
        "plpython": "SELECT * FROM py_out()",
        "plr": "SELECT * FROM r_out()",
    }
    return trivial, roundtrip, data_in, data_out


class Bench:
    def __init__(self, args):
        self.args = args
        self.psql = os.path.join(args.pg_bin, "psql")
        self.pgbench = os.path.join(args.pg_bin, "pgbench")
        self.tmp = tempfile.mkdtemp(prefix="bench-", dir=args.work)
        self.counter = 0

    # -- helpers -------------------------------------------------------------------

    def sql(self, text, check=True):
        r = subprocess.run(
            [self.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", "-"],
            input=text + ";\n",
            capture_output=True,
            text=True,
        )
        if check and r.returncode != 0:
            raise RuntimeError(f"psql failed: {r.stderr.strip()}\nquery: {text[:300]}")
        return r.stdout.strip()

    def pgbench_run(self, name, script, extra, expect_rows=None):
        """Runs pgbench with `script`; returns (latencies in ms per client in order, stdout)."""
        self.counter += 1
        path = os.path.join(self.tmp, f"{self.counter}-{name}.sql")
        body = script.strip().rstrip(";")
        if expect_rows is not None:
            # Fails the transaction (and the run) when the row count is not the expected one.
            body = (
                f"SELECT count(*) AS n FROM ({body}) q \\gset\n"
                f"\\if :n != {expect_rows}\nSELECT 1/0;\n\\endif\n"
            )
        else:
            body += ";\n"
        with open(path, "w") as f:
            f.write(body)
        prefix = os.path.join(self.tmp, f"{self.counter}-{name}-log")
        cmd = [self.pgbench, "-n", "-f", path, "-l", f"--log-prefix={prefix}"] + extra
        r = subprocess.run(cmd, capture_output=True, text=True)
        out = r.stdout + r.stderr
        if r.returncode != 0 and "failed" not in out:
            raise RuntimeError(f"pgbench {name} failed:\n{out}")
        lat = {}
        for fn in sorted(glob.glob(prefix + ".*")):
            with open(fn) as f:
                for line in f:
                    parts = line.split()
                    client, elapsed_us = int(parts[0]), int(parts[2])
                    lat.setdefault(client, []).append(elapsed_us / 1000.0)
        return lat, out, r.returncode

    # -- measures ------------------------------------------------------------------

    def latency(self, name, query, new_session):
        """p50/p99 of CALLS trivial calls, one client; the first call of a kept session
        is a warm-up and dropped."""
        extra = ["-c", "1", "-t", str(CALLS if new_session else CALLS + 1)]
        if new_session:
            extra.append("-C")
        lat, _, rc = self.pgbench_run(name, query, extra)
        if rc != 0:
            raise RuntimeError(f"{name}: pgbench exited {rc}")
        xs = lat[0] if new_session else lat[0][1:]
        return pctl(xs, 50), pctl(xs, 99)

    def paced(self, name, query, new_session):
        """p50/p99 and count of one client's calls started PACED_RATE times a second on
        average for PACED_SECONDS. pgbench counts each call's latency from its scheduled
        start, so a call delayed by the one before it counts that delay too. The first
        second of a kept session is a warm-up and dropped."""
        extra = ["-c", "1", "-R", f"{PACED_RATE:g}", "-T", str(PACED_SECONDS)]
        if new_session:
            extra.append("-C")
        lat, _, rc = self.pgbench_run(name, query, extra)
        if rc != 0:
            raise RuntimeError(f"{name}: pgbench exited {rc}")
        # A kept session's first call loads the language (PL/Python's takes ~300 ms) and
        # delays those scheduled behind it: the first second of calls is a warm-up.
        xs = lat[0] if new_session else lat[0][math.ceil(PACED_RATE) :]
        return pctl(xs, 50), pctl(xs, 99), len(xs)

    def throughput(self, name, query, expect):
        """Median seconds of REPS runs in one session, counting the rows."""
        lat, _, rc = self.pgbench_run(name, query, ["-c", "1", "-t", str(REPS)], expect)
        if rc != 0:
            raise RuntimeError(f"{name}: pgbench exited {rc} (wrong row count or error)")
        return statistics.median(lat[0]) / 1000.0

    def backend_memory(self, name, statements):
        """Runs `statements` in one psql session; returns the backend's /proc status
        fields (kB) after each statement."""
        app = f"bench_{name}_{os.getpid()}_{self.counter}"
        self.counter += 1
        err = open(os.path.join(self.tmp, f"{app}.err"), "w+")
        p = subprocess.Popen(
            [self.psql, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            text=True,
            env=dict(os.environ, PGAPPNAME=app),
        )
        snaps = []
        pid = None
        try:
            for i, st in enumerate(statements):
                mark = f"mark_{app}_{i}"
                p.stdin.write(f"SELECT count(*) FROM ({st}) q;\nSELECT '{mark}';\n")
                p.stdin.flush()
                while True:
                    if p.poll() is not None:
                        err.seek(0)
                        raise RuntimeError(f"{name}: psql exited: {err.read()}")
                    got = self.sql(
                        "SELECT pid FROM pg_stat_activity WHERE application_name = "
                        f"{q(app)} AND state = 'idle' AND query LIKE {q('%' + mark + '%')}"
                    )
                    if got:
                        pid = int(got)
                        break
                    time.sleep(0.05)
                snaps.append(proc_status(pid))
        finally:
            p.stdin.close()
            p.wait()
            err.close()
        return snaps

    def concurrency(self, query):
        lat, out, rc = self.pgbench_run(
            "conc", query, ["-c", "20", "-j", "2", "-T", str(CONC_SECONDS)]
        )
        xs = [x for v in lat.values() for x in v]
        failed = 0
        m = re.search(r"number of failed transactions: (\d+)", out)
        if m:
            failed = int(m.group(1))
        aborted = "aborted" in out
        m = re.search(r"tps = ([\d.]+)", out)
        rate = float(m.group(1)) if m else len(xs) / CONC_SECONDS
        return rate, pctl(xs, 50), pctl(xs, 99), failed, aborted, rc

    def lossless(self, query):
        got = self.sql(
            f"SELECT count(*) FROM ({query}) r JOIN t USING (id) "
            "WHERE r.k = t.k AND r.x = t.x AND r.y = t.y AND r.s = t.s"
        )
        return int(got) == ROWS


def pctl(xs, p):
    """Nearest-rank percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon"):
                out[k] = int(v.split()[0])
    return out


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--pg-bin", required=True)
    ap.add_argument("--py-prefix", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--command", required=True)
    # JSON from crates/airlock-sandbox/examples/overhead.rs.
    ap.add_argument("--overhead", default="")
    args = ap.parse_args()
    site = glob.glob(os.path.join(args.py_prefix, "venv/lib/python3*/site-packages"))[0]
    b = Bench(args)
    started = time.time()
    log(f"creating {ROWS} rows and the peer functions")
    b.sql(setup_sql(site))
    trivial, roundtrip, data_in, data_out = queries()
    res = {}  # (measure, system) -> value
    notes = []

    def attempt(key, fn):
        try:
            res[key] = fn()
        except Exception as e:  # a failed measure is reported, the run goes on
            log(f"{key}: FAILED: {e}")
            notes.append(f"{TITLES[key[1]]}, {key[0]}: failed: {str(e).splitlines()[0][:200]}")

    log("trivial calls")
    res[("connect", "baseline")] = b.latency("select1-new", "SELECT 1", True)
    for s in SYSTEMS:
        attempt(("trivial_new", s), lambda: b.latency(f"{s}-trivial-new", trivial[s], True))
        attempt(("trivial_same", s), lambda: b.latency(f"{s}-trivial-same", trivial[s], False))
        attempt(("paced_same", s), lambda: b.paced(f"{s}-paced-same", trivial[s], False))
    # The peers' first call in a session takes longer than the pacing interval.
    attempt(("paced_new", "airlock"), lambda: b.paced("airlock-paced-new", trivial["airlock"], True))

    for measure, qs, expect in (
        ("roundtrip", roundtrip, ROWS),
        ("in", data_in, 1000),
        ("out", data_out, ROWS),
    ):
        for s in SYSTEMS:
            log(f"{measure}: {s}")
            attempt((measure, s), lambda: b.throughput(f"{s}-{measure}", qs[s], expect))

    log("lossless round trip")
    for s in SYSTEMS:
        attempt(("lossless", s), lambda: b.lossless(roundtrip[s]))

    log("backend memory")
    for s in SYSTEMS:
        attempt(("peak_mem", s), lambda: b.backend_memory(f"{s}-rt", ["SELECT 1", roundtrip[s]]))
        attempt(
            ("added_mem", s),
            lambda: [b.backend_memory(f"{s}-triv", ["SELECT 1", trivial[s]]) for _ in range(3)],
        )

    if CONC_SECONDS > 0:
        log(f"20 clients for {CONC_SECONDS} s")
        attempt(("conc", "airlock"), lambda: b.concurrency(trivial["airlock"]))

    elapsed = time.time() - started
    table = render(res, notes, args, elapsed)
    print(table)
    with open(args.results, "w") as f:
        f.write(table)


def render(res, notes, args, elapsed):
    def get(m, s):
        return res.get((m, s))

    def cell_lat(v):
        return "–" if v is None else f"{v[0]:.1f} / {v[1]:.1f} ms"

    def cell_rate(v):
        return "–" if v is None else f"{ROWS / v / 1e6:.3f} M rows/s ({v:.2f} s)"

    def ratio(a, p, invert=False):
        if a is None or p is None:
            return "–"
        return f"{(p / a if invert else a / p):.2f}×"

    def peak(v):
        return None if v is None else v[1]["VmHWM"] / 1024

    def added(v):
        if v is None:
            return None
        return statistics.median((r[1]["VmRSS"] - r[0]["VmRSS"]) / 1024 for r in v)

    NR = f"{ROWS / 1e6:g}M"
    rows = []
    paced = f"one client at {PACED_RATE:g} calls/s (pgbench -R, {PACED_SECONDS} s)"
    for m, title, target in (
        ("trivial_new", "trivial 1-row pandas call, new session per call, back to back, p50 / p99", "≤ 5 / ≤ 15 ms"),
        ("trivial_same", "trivial 1-row pandas call, same session, back to back, p50 / p99", "≤ 5 / ≤ 15 ms"),
        ("paced_new", f"trivial call, new session per call, {paced}, p50 / p99", "≤ 5 / ≤ 15 ms"),
        ("paced_same", f"trivial call, same session, {paced}, p50 / p99", "≤ 5 / ≤ 15 ms"),
    ):
        a = get(m, "airlock")
        cells = [cell_lat(get(m, s)) for s in SYSTEMS]
        if m == "paced_new":
            cells[1:] = ["– (a call takes longer than the interval)"] * 2
        rows.append(
            [title]
            + cells
            + [
                ratio(a and a[0], get(m, "plpython") and get(m, "plpython")[0]),
                ratio(a and a[0], get(m, "plr") and get(m, "plr")[0]),
                target,
            ]
        )
    for m, title, target in (
        ("roundtrip", f"round trip: {NR} rows in → DataFrame → same rows out", "≥ 10× PL/Python"),
        ("in", f"data in only: {NR} rows in, groupby sum of x*y by k", "≥ 5× PL/Python"),
        ("out", f"data out only: script makes {NR} rows", "≥ 5× PL/Python"),
    ):
        a = get(m, "airlock")
        # ratio of throughputs = peer seconds / Airlock seconds
        rows.append(
            [title]
            + [cell_rate(get(m, s)) for s in SYSTEMS]
            + [ratio(a, get(m, "plpython"), True), ratio(a, get(m, "plr"), True), target]
        )
    ll = ["–" if get("lossless", s) is None else ("yes" if get("lossless", s) else "no") for s in SYSTEMS]
    rows.append(["round trip lossless (every value equal)"] + ll + ["", "", "lossless"])
    pk = {s: peak(get("peak_mem", s)) for s in SYSTEMS}
    rows.append(
        [f"peak backend memory (VmHWM), {NR}-row round trip"]
        + ["–" if pk[s] is None else f"{pk[s]:.0f} MiB" for s in SYSTEMS]
        + [ratio(pk["airlock"], pk["plpython"]), ratio(pk["airlock"], pk["plr"]), "≤ 120 MiB"]
    )
    ad = {s: added(get("added_mem", s)) for s in SYSTEMS}
    rows.append(
        ["backend VmRSS added by one trivial call (fresh session)"]
        + ["–" if ad[s] is None else f"{ad[s]:+.1f} MiB" for s in SYSTEMS]
        + ["", "", "≤ 5 MiB"]
    )
    c = get("conc", "airlock")
    if c is not None:
        rate, p50, p99, failed, aborted, rc = c
        rows.append(
            [f"20 clients, trivial calls, {CONC_SECONDS} s (pgbench -c 20 -j 2)"]
            + [
                f"{rate:.1f} calls/s, p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
                f"{failed} failed{', clients aborted' if aborted or rc else ''}",
                "",
                "",
                "",
                "",
                "≥ 100 calls/s, 0 errors",
            ]
        )
    if args.overhead:
        o = json.loads(args.overhead)
        rows.append(
            [
                f"sandbox overhead over a bare process (/usr/bin/true, median of {o['runs']})",
                f"+{o['overhead_ms']:.2f} ms ({o['sandboxed_ms']:.2f} vs {o['bare_ms']:.2f} ms)",
                "none (in the backend)",
                "none (in the backend)",
                "",
                "",
                "≤ 2 ms",
            ]
        )
    base = res.get(("connect", "baseline"))
    head = ["measure", "Airlock", "PL/Python", "PL/R", "Airlock vs PL/Python", "Airlock vs PL/R", "target"]
    lines = [
        "# Benchmark results",
        "",
        "Written by `bench/run.sh` (overwritten on each run); see the script's header and",
        "`bench/bench.py` for how each figure is measured.",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- command: `{args.command}` (BENCH_ROWS={ROWS} BENCH_REPS={REPS} "
        f"BENCH_CALLS={CALLS} BENCH_CONC_SECONDS={CONC_SECONDS} "
        f"BENCH_PACED_RATE={PACED_RATE:g} BENCH_PACED_SECONDS={PACED_SECONDS})",
        f"- machine: {os.cpu_count()} CPUs, {platform.platform()}; run took {elapsed:.0f} s",
        f"- table t: {ROWS} rows of (id int8, k int4, x float8, y float8, s text of 16 chars)",
        "- latency: pgbench per-transaction log, one client; p99 is nearest-rank "
        f"(over {CALLS} calls it is the slowest); ratios are Airlock ÷ peer for latency "
        "and memory (lower is better for Airlock), Airlock ÷ peer throughput for rows/s "
        "(higher is better)",
        "- throughput: median of the runs in one session, each `SELECT count(*) FROM (…)`",
        "- memory: /proc/<backend pid>/status of the session's backend (the sandbox's own "
        "memory is not in the backend, by design)",
    ]
    if base is not None:
        lines.append(
            f"- reference: `SELECT 1` with a new connection per call (pgbench -C): "
            f"p50 {base[0]:.2f} ms / p99 {base[1]:.2f} ms (pgbench 15 times the transaction "
            "after the connection is made, so \"new session\" is the first call's cost in a "
            "fresh backend without the connection itself)"
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if notes:
        lines += ["", "Failures:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
