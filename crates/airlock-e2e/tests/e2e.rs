//! End-to-end tests: SQL through a real cluster, the real `airlockd`, real sandboxes and
//! the real Python runtime. One cluster and one daemon serve every case; cases that need
//! a setting of their own start their own.

use std::{
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use airlock_e2e::{
    airlock_cli_bin, eventually, postgres_user, printed_folder, Cluster, Daemon, DaemonSettings,
};
use airlock_protocol::audit::{AuditOutcome, Record as AuditRecord};
use libtest_mimic::{Arguments, Failed, Trial};
use postgres::{error::SqlState, Client, Row};

/// Wall-clock limit of the shared daemon, seconds.
const WALL_LIMIT: u32 = 4;
const FIRST_UID: u32 = 62000;
/// CPU-time limit of the shared daemon, seconds.
const CPU_LIMIT: u64 = 2;
/// Memory limit of the shared daemon, MiB.
const MEMORY_LIMIT: u64 = 256;
/// Process limit of the shared daemon.
const PIDS_LIMIT: u64 = 64;
const WORKERS: u32 = 8;

struct Env {
    daemon: Daemon,
    cluster: Cluster,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get().expect("set up in main")
}

type TestResult = Result<(), Failed>;

impl From<postgres::Error> for PgErr {
    fn from(e: postgres::Error) -> Self {
        PgErr(e)
    }
}

fn ensure(cond: bool, msg: impl Into<String>) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

/// A client error whose Display shows the server's message, code and detail.
#[derive(Debug)]
struct PgErr(postgres::Error);

impl std::fmt::Display for PgErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.as_db_error() {
            Some(db) => write!(
                f,
                "{} (SQLSTATE {}) detail: {:?} hint: {:?}",
                db.message(),
                db.code().code(),
                db.detail(),
                db.hint()
            ),
            None => write!(f, "{}", self.0),
        }
    }
}

/// Runs a Python script through the real SQL entry point.
fn py(
    client: &mut Client,
    script: &str,
    input: Option<&str>,
    columns: &str,
) -> Result<Vec<Row>, PgErr> {
    let sql =
        format!("SELECT * FROM airlock.execute_external_script('python', $1, $2) AS r({columns})");
    client
        .query(sql.as_str(), &[&script, &input])
        .map_err(PgErr)
}

/// The server's error from a failed call, or a test failure saying it succeeded.
fn expect_err<T>(result: Result<Vec<Row>, T>) -> Result<postgres::error::DbError, Failed>
where
    T: Into<PgErr>,
{
    match result {
        Ok(rows) => Err(format!("expected an error, got {} rows", rows.len()).into()),
        Err(e) => match e.into().0.as_db_error() {
            Some(db) => Ok(db.clone()),
            None => Err("expected a server error, got a client error".into()),
        },
    }
}

fn expect_code(db: &postgres::error::DbError, code: &SqlState) -> TestResult {
    ensure(
        db.code() == code,
        format!(
            "expected SQLSTATE {}, got {}: {}",
            code.code(),
            db.code().code(),
            db.message()
        ),
    )
}

fn expect_contains(haystack: &str, needle: &str) -> TestResult {
    ensure(
        haystack.contains(needle),
        format!("expected {needle:?} in {haystack:?}"),
    )
}

fn analyst() -> Client {
    env().cluster.connect("analyst").0
}

fn superuser() -> Client {
    env().cluster.connect("postgres").0
}

fn setup_roles(cluster: &Cluster) {
    let (mut c, _) = cluster.connect("postgres");
    c.batch_execute(
        "CREATE ROLE analyst LOGIN;
         GRANT airlock_script_executor TO analyst;
         CREATE ROLE outsider LOGIN;
         CREATE TABLE measurements (id int8, k int4, x float8, s text, b bool, small int2, f4 float4);
         INSERT INTO measurements VALUES
            (1, 10, 1.5, 'one', true, 1, 0.5),
            (2, 20, NULL, 'zwei ü', false, NULL, NULL),
            (3, NULL, -2.25, NULL, NULL, 3, 1.25),
            (9223372036854775807, -2147483648, 1e300, '', true, -32768, 3.5);
         GRANT SELECT ON measurements TO analyst;
         CREATE TABLE secret (v int);
         INSERT INTO secret VALUES (42);
         CREATE TABLE owned_rows (owner name, v int);
         INSERT INTO owned_rows VALUES ('analyst', 1), ('analyst', 2), ('someone_else', 3);
         ALTER TABLE owned_rows ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON owned_rows USING (owner = current_user);
         GRANT SELECT ON owned_rows TO analyst;
         CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
         CREATE FUNCTION analysts_rows() RETURNS SETOF int LANGUAGE sql SECURITY DEFINER AS $f$
             SELECT v FROM airlock.execute_external_script('python', 'OutputDataSet = InputDataSet',
                 'SELECT v FROM owned_rows ORDER BY v') AS r(v int) $f$;
         ALTER FUNCTION analysts_rows() OWNER TO analyst;
         REVOKE ALL ON FUNCTION analysts_rows() FROM PUBLIC;
         GRANT EXECUTE ON FUNCTION analysts_rows() TO outsider;
         CREATE DOMAIN required_text AS text NOT NULL;",
    )
    .expect("setting up roles and tables");
}

// ---------------------------------------------------------------------------- cases

fn happy_path_with_several_types() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "OutputDataSet = InputDataSet.assign(z = InputDataSet.id * 2)",
        Some("SELECT id, k, x, s, b, small, f4 FROM measurements WHERE id < 100 ORDER BY id"),
        "id int8, k int4, x float8, s text, b bool, small int2, f4 float4, z int8",
    )?;
    ensure(rows.len() == 3, format!("3 rows, got {}", rows.len()))?;
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    ensure(ids == [1, 2, 3], format!("ids {ids:?}"))?;
    ensure(rows[0].get::<_, Option<i32>>(1) == Some(10), "k of row 1")?;
    ensure(
        rows[2].get::<_, Option<i32>>(1).is_none(),
        "NULL int4 stays NULL",
    )?;
    ensure(rows[0].get::<_, Option<f64>>(2) == Some(1.5), "x of row 1")?;
    ensure(
        rows[1].get::<_, Option<f64>>(2).is_none(),
        "NULL float8 comes back NULL",
    )?;
    ensure(
        rows[1].get::<_, Option<String>>(3).as_deref() == Some("zwei ü"),
        "non-ASCII text",
    )?;
    ensure(
        rows[2].get::<_, Option<String>>(3).is_none(),
        "NULL text stays NULL",
    )?;
    ensure(rows[0].get::<_, Option<bool>>(4) == Some(true), "bool")?;
    ensure(rows[2].get::<_, Option<bool>>(4).is_none(), "NULL bool")?;
    ensure(rows[1].get::<_, Option<i16>>(5).is_none(), "NULL int2")?;
    ensure(rows[2].get::<_, Option<i16>>(5) == Some(3), "int2")?;
    ensure(rows[2].get::<_, Option<f32>>(6) == Some(1.25), "float4")?;
    let z: Vec<i64> = rows.iter().map(|r| r.get(7)).collect();
    ensure(z == [2, 4, 6], format!("z {z:?}"))?;
    Ok(())
}

fn extremes_round_trip() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "OutputDataSet = InputDataSet",
        Some("SELECT id, k, x, s, small FROM measurements WHERE id > 100"),
        "id int8, k int4, x float8, s text, small int2",
    )?;
    ensure(rows.len() == 1, "one row")?;
    ensure(rows[0].get::<_, i64>(0) == i64::MAX, "int8 max kept")?;
    ensure(rows[0].get::<_, i32>(1) == i32::MIN, "int4 min kept")?;
    ensure(rows[0].get::<_, f64>(2) == 1e300, "float8 kept")?;
    ensure(
        rows[0].get::<_, String>(3).is_empty(),
        "empty string is not NULL",
    )?;
    ensure(rows[0].get::<_, i16>(4) == i16::MIN, "int2 min kept")?;
    Ok(())
}

fn script_sees_proper_dtypes() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "import pandas as pd\n\
         OutputDataSet = pd.DataFrame({'col': list(InputDataSet.columns), 'dtype': [str(t) for t in InputDataSet.dtypes]})",
        Some("SELECT id, x, s, b FROM measurements WHERE id = 1"),
        "col text, dtype text",
    )?;
    let got: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want = [
        ("id", "int64"),
        ("x", "float64"),
        ("s", "string"),
        ("b", "bool"),
    ];
    ensure(
        got.iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .eq(want.iter().copied()),
        format!("dtypes {got:?}"),
    )
}

fn sp_alias_and_named_arguments() -> TestResult {
    let mut c = analyst();
    let rows = c.query(
        "SELECT * FROM airlock.sp_execute_external_script(
            language => 'python',
            script => 'OutputDataSet = MyIn.assign(y = MyIn.id + 1)',
            input_data_1 => 'SELECT id FROM measurements WHERE id < 3 ORDER BY id',
            input_data_1_name => 'MyIn',
            output_data_1_name => 'OutputDataSet') AS r(id int8, y int8)",
        &[],
    )?;
    let y: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
    ensure(y == [2, 3], format!("y {y:?}"))
}

fn no_input_query() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "import pandas as pd\nassert InputDataSet.shape == (0, 0)\nOutputDataSet = pd.DataFrame({'n': [1, 2, 3]})",
        None,
        "n int4",
    )?;
    ensure(rows.len() == 3, "three rows")
}

fn zero_row_input_keeps_columns() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'cols': [','.join(InputDataSet.columns)], 'n': [len(InputDataSet)]})",
        Some("SELECT id, x FROM measurements WHERE false"),
        "cols text, n int8",
    )?;
    ensure(rows[0].get::<_, String>(0) == "id,x", "columns kept")?;
    ensure(rows[0].get::<_, i64>(1) == 0, "zero rows")
}

fn many_batches() -> TestResult {
    let mut c = analyst();
    c.batch_execute("SET airlock.batch_rows = 1000")?;
    let rows = c.query(
        "SELECT * FROM airlock.execute_external_script('python',
            'OutputDataSet = InputDataSet.assign(sq = InputDataSet.i * InputDataSet.i)',
            'SELECT i::int8 AS i FROM generate_series(1, 25000) AS i') AS r(i int8, sq int8)",
        &[],
    )?;
    ensure(
        rows.len() == 25000,
        format!("25000 rows, got {}", rows.len()),
    )?;
    let sum: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
    ensure(
        sum == (1..=25000i64).map(|i| i * i).sum::<i64>(),
        "sum of squares",
    )
}

fn permission_denied_without_role() -> TestResult {
    let (mut c, _) = env().cluster.connect("outsider");
    let e = expect_err(py(&mut c, "OutputDataSet = None", None, "a int"))?;
    expect_code(&e, &SqlState::INSUFFICIENT_PRIVILEGE)?;
    expect_contains(e.message(), "outsider")?;
    expect_contains(e.hint().unwrap_or(""), "GRANT airlock_script_executor")
}

fn security_definer_runs_as_its_owner() -> TestResult {
    // outsider may not run scripts, but may call a SECURITY DEFINER function of
    // analyst's: the call runs as analyst, and its input query sees analyst's rows.
    let (mut c, _) = env().cluster.connect("outsider");
    let rows = c.query("SELECT * FROM analysts_rows()", &[])?;
    let v: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    ensure(v == [1, 2], format!("got {v:?}"))
}

fn language_grant_alone_allows_that_language() -> TestResult {
    let (mut su, _) = env().cluster.connect("postgres");
    su.batch_execute(
        "CREATE ROLE python_only LOGIN; GRANT airlock_python_executor TO python_only;",
    )?;
    let (mut c, _) = env().cluster.connect("python_only");
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    ensure(rows.len() == 1, "python_only runs Python")?;
    su.batch_execute("REVOKE airlock_python_executor FROM python_only")?;
    let (mut c, _) = env().cluster.connect("python_only");
    let e = expect_err(py(&mut c, "x = 1", None, "a int"))?;
    expect_code(&e, &SqlState::INSUFFICIENT_PRIVILEGE)?;
    expect_contains(e.message(), "permission denied to run python scripts")?;
    expect_contains(e.hint().unwrap_or(""), "GRANT airlock_python_executor")
}

/// A script reporting its worker uid and when it ran, after `sleep` seconds.
fn uid_and_times(sleep: f64) -> String {
    format!(
        "import os, time, pandas as pd\nt0 = time.time()\ntime.sleep({sleep})\n\
         OutputDataSet = pd.DataFrame({{'uid': [os.getuid()], 't0': [t0], 't1': [time.time()]}})"
    )
}

/// Runs `f` against a daemon (with `count` workers from `first_uid` and the given queue
/// timeout) and a cluster of its own, for cases that change the pool or the daemon
/// itself; stops both afterwards whatever `f` returned.
fn with_own_daemon(
    first_uid: u32,
    count: u32,
    queue_timeout_seconds: f64,
    f: impl FnOnce(&Daemon, &Cluster) -> TestResult,
) -> TestResult {
    let daemon = Daemon::start(DaemonSettings {
        first_uid,
        count,
        wall_clock_seconds: 60.0,
        cpu_seconds: 60,
        memory_mib: 256,
        pids: 64,
        queue_timeout_seconds,
    });
    let cluster = Cluster::start(&daemon.socket, true);
    let result = f(&daemon, &cluster);
    cluster.stop();
    daemon.stop();
    result
}

fn worker_pool_maps_callers_onto_workers() -> TestResult {
    // A daemon and cluster of their own: these calls fill the whole pool.
    with_own_daemon(63000, 20, 30.0, |_, cluster| {
        let (mut su, _) = cluster.connect("postgres");
        for i in 0..21 {
            su.batch_execute(&format!(
                "CREATE ROLE r{i} LOGIN; GRANT airlock_python_executor TO r{i};"
            ))?;
        }
        // 21 callers at once, 20 workers: everyone runs, the 21st after waiting.
        let mut handles = Vec::new();
        for i in 0..21 {
            let mut c = cluster.connect(&format!("r{i}")).0;
            handles.push(thread::spawn(move || {
                py(
                    &mut c,
                    &uid_and_times(2.0),
                    None,
                    "uid int8, t0 float8, t1 float8",
                )
                .map(|rows| {
                    (
                        i,
                        rows[0].get::<_, i64>(0),
                        rows[0].get::<_, f64>(1),
                        rows[0].get::<_, f64>(2),
                    )
                })
            }));
        }
        let mut runs = Vec::new();
        for h in handles {
            runs.push(h.join().map_err(|_| "a caller thread panicked")??);
        }
        let uids: std::collections::BTreeSet<i64> = runs.iter().map(|r| r.1).collect();
        ensure(
            uids.len() == 20,
            format!("21 callers used {} workers", uids.len()),
        )?;
        // Different callers never share a worker at the same time.
        for a in &runs {
            for b in &runs {
                let overlap = a.2 < b.3 && b.2 < a.3;
                ensure(
                    a.0 == b.0 || !overlap || a.1 != b.1,
                    format!("r{} and r{} ran at the same time as uid {}", a.0, b.0, a.1),
                )?;
            }
        }
        // One caller's concurrent calls share its worker.
        let mut handles = Vec::new();
        for _ in 0..2 {
            let mut c = cluster.connect("r0").0;
            handles.push(thread::spawn(move || {
                py(
                    &mut c,
                    &uid_and_times(1.0),
                    None,
                    "uid int8, t0 float8, t1 float8",
                )
                .map(|rows| rows[0].get::<_, i64>(0))
            }));
        }
        let mine: Vec<i64> = handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| Failed::from("thread panicked"))?
                    .map_err(Failed::from)
            })
            .collect::<Result<_, _>>()?;
        ensure(
            mine[0] == mine[1],
            format!("r0's concurrent calls ran as {mine:?}"),
        )
    })
}

fn a_crashed_daemon_leaves_nothing_running_and_is_swept_at_restart() -> TestResult {
    with_own_daemon(63200, 2, 5.0, |daemon, cluster| {
        let (mut c, notices) = cluster.connect("postgres");
        let call = thread::spawn(move || {
            py(
                &mut c,
                "import os, subprocess, time\nprint(os.getcwd(), flush=True)\nsubprocess.Popen(['sleep', '600'])\ntime.sleep(600)",
                None,
                "a int",
            )
        });
        let uuid = printed_folder(&notices, Duration::from_secs(5))
            .ok_or("the call never started")?
            .trim_start_matches("/sessions/")
            .to_owned();
        let folder = daemon.sessions_dir().join(&uuid);
        let group = format!("call-{uuid}");
        ensure(
            folder.exists(),
            "the session folder exists while the call runs",
        )?;

        // kill -9: the daemon cannot clean up; its spawner sees the socket close and
        // kills every sandbox, and the caller gets an error instead of hanging.
        let started = Instant::now();
        daemon.crash();
        let e = expect_err(call.join().map_err(|_| "caller panicked")?)?;
        ensure(
            started.elapsed() < Duration::from_secs(5),
            format!(
                "the call took {:?} to fail after the crash",
                started.elapsed()
            ),
        )?;
        expect_code(&e, &SqlState::CONNECTION_FAILURE)?;
        ensure(
            eventually(Duration::from_secs(5), || {
                !std::fs::read_dir("/proc").is_ok_and(|d| {
                    d.flatten().any(|p| {
                        std::fs::read_to_string(p.path().join("cgroup"))
                            .is_ok_and(|c| c.contains(&group))
                    })
                })
            }),
            format!("a process of {group} survived the daemon's crash"),
        )?;
        ensure(
            folder.exists(),
            "nothing removed the folder before the restart (the sweep is what is tested)",
        )?;

        // The restart sweeps what the crash left, and says so.
        daemon.restart();
        ensure(
            !folder.exists(),
            format!("{} survived the restart", folder.display()),
        )?;
        ensure(
            find_dir("/sys/fs/cgroup".as_ref(), &group, 8).is_none(),
            format!("cgroup {group} survived the restart"),
        )?;
        let log = daemon.log();
        expect_contains(&log, "removing session folder left by an earlier run")?;
        expect_contains(&log, "removed a call cgroup left by an earlier run")?;
        // And it works again.
        let (mut c, _) = cluster.connect("postgres");
        let rows = py(
            &mut c,
            "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
            None,
            "a int",
        )?;
        ensure(rows.len() == 1, "a call after the restart works")
    })
}

fn monitoring_views_show_own_sessions_and_stats() -> TestResult {
    let (mut su, _) = env().cluster.connect("postgres");
    su.batch_execute(
        "CREATE ROLE watcher LOGIN; GRANT pg_monitor TO watcher;
         CREATE ROLE viewer_a LOGIN; GRANT airlock_python_executor TO viewer_a;
         CREATE ROLE viewer_b LOGIN; GRANT airlock_python_executor TO viewer_b;",
    )?;
    // viewer_a runs a call that lasts a while and reports its folder.
    let (mut a, notices) = env().cluster.connect("viewer_a");
    let running = thread::spawn(move || {
        py(
            &mut a,
            "import os, time, pandas as pd\nprint(os.getcwd(), flush=True)\ntime.sleep(2)\nOutputDataSet = pd.DataFrame({'a': [1, 2]})",
            Some("SELECT 1 AS x UNION ALL SELECT 2 UNION ALL SELECT 3"),
            "a int",
        )
        .map(|rows| rows.len())
    });
    let uuid = printed_folder(&notices, Duration::from_secs(5))
        .ok_or("viewer_a's call never started")?
        .trim_start_matches("/sessions/")
        .to_owned();
    let sql =
        "SELECT session_id::text, role, state, worker_uid, language FROM airlock.active_sessions";
    type SessionRow = (String, String, String, i64, String);
    let seen = |user: &str| -> Result<Vec<SessionRow>, Failed> {
        let (mut c, _) = env().cluster.connect(user);
        Ok(c.query(sql, &[])?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    };
    let mine = seen("viewer_a")?;
    let row = mine
        .iter()
        .find(|r| r.0 == uuid)
        .ok_or_else(|| format!("viewer_a does not see its own call {uuid}: {mine:?}"))?;
    ensure(
        row.1 == "viewer_a" && row.2 == "running" && row.4 == "python",
        format!("{row:?}"),
    )?;
    ensure(
        (FIRST_UID as i64..(FIRST_UID + WORKERS) as i64).contains(&row.3),
        format!("worker uid {}", row.3),
    )?;
    ensure(
        mine.iter().all(|r| r.1 == "viewer_a"),
        format!("viewer_a sees others: {mine:?}"),
    )?;
    let other = seen("viewer_b")?;
    ensure(
        !other.iter().any(|r| r.0 == uuid),
        "viewer_b sees viewer_a's call",
    )?;
    let monitor = seen("watcher")?;
    ensure(
        monitor.iter().any(|r| r.0 == uuid),
        "a pg_monitor member does not see every call",
    )?;
    let (mut outsider, _) = env().cluster.connect("outsider");
    let direct = outsider.query("SELECT session_id FROM airlock.daemon_sessions()", &[])?;
    ensure(
        direct.is_empty(),
        "the function behind the view shows others' calls",
    )?;
    ensure(
        running.join().map_err(|_| "viewer_a panicked")?? == 2,
        "viewer_a's call",
    )?;

    // The counters include that call, with its rows; viewer_b sees only its own.
    let (mut a, _) = env().cluster.connect("viewer_a");
    let e = expect_err(py(&mut a, "raise ValueError('x')", None, "a int"))?;
    expect_code(&e, &SqlState::EXTERNAL_ROUTINE_EXCEPTION)?;
    type StatsRow = (String, i64, i64, i64, i64, i64);
    let stats = |c: &mut Client| -> Result<Vec<StatsRow>, Failed> {
        Ok(c.query(
            "SELECT role, calls, ok, script_errors, rows_in, rows_out FROM airlock.execution_stats WHERE language = 'python'",
            &[],
        )?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect())
    };
    let want = ("viewer_a".to_string(), 2, 1, 1, 3, 2);
    ensure(
        eventually(Duration::from_secs(5), || {
            stats(&mut a).is_ok_and(|s| s == [want.clone()])
        }),
        format!("viewer_a's stats: {:?}", stats(&mut a)?),
    )?;
    let (mut b, _) = env().cluster.connect("viewer_b");
    ensure(
        stats(&mut b)?.is_empty(),
        "viewer_b sees viewer_a's counters",
    )?;
    let (mut w, _) = env().cluster.connect("watcher");
    ensure(
        stats(&mut w)?.iter().any(|r| r.0 == "viewer_a"),
        "pg_monitor sees every role's counters",
    )
}

fn busy_pool_fails_after_the_queue_timeout() -> TestResult {
    with_own_daemon(63100, 1, 1.0, |_, cluster| {
        let (mut su, _) = cluster.connect("postgres");
        su.batch_execute("CREATE ROLE holder LOGIN; GRANT airlock_script_executor TO holder; CREATE ROLE waiter LOGIN; GRANT airlock_script_executor TO waiter;")?;
        let mut h = cluster.connect("holder").0;
        let holder = thread::spawn(move || {
            py(
                &mut h,
                &uid_and_times(3.0),
                None,
                "uid int8, t0 float8, t1 float8",
            )
            .map(|_| ())
        });
        thread::sleep(Duration::from_millis(800));
        let mut w = cluster.connect("waiter").0;
        let started = Instant::now();
        let e = expect_err(py(&mut w, "x = 1", None, "a int"))?;
        let waited = started.elapsed();
        holder.join().map_err(|_| "holder panicked")??;
        expect_code(&e, &SqlState::CONFIGURATION_LIMIT_EXCEEDED)?;
        expect_contains(e.message(), "all 1 worker identities are busy")?;
        expect_contains(e.message(), "workers.count")?;
        ensure(
            waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
            format!("waited {waited:?} for a 1 s queue timeout"),
        )
    })
}

fn superuser_needs_no_grant() -> TestResult {
    let mut c = superuser();
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [7]})",
        None,
        "a int4",
    )?;
    ensure(rows[0].get::<_, i32>(0) == 7, "value")
}

fn input_query_runs_as_caller() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "OutputDataSet = InputDataSet",
        Some("SELECT v FROM secret"),
        "v int4",
    ))?;
    expect_code(&e, &SqlState::INSUFFICIENT_PRIVILEGE)?;
    expect_contains(e.message(), "secret")
}

fn row_level_security_applies() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "OutputDataSet = InputDataSet",
        Some("SELECT v FROM owned_rows ORDER BY v"),
        "v int4",
    )?;
    let v: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    ensure(v == [1, 2], format!("RLS should leave [1, 2], got {v:?}"))
}

fn python_exception_is_an_error_with_traceback() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(&mut c, "x = 1\ny = x / 0\n", None, "a int"))?;
    expect_code(&e, &SqlState::EXTERNAL_ROUTINE_EXCEPTION)?;
    expect_contains(e.message(), "ZeroDivisionError: division by zero")?;
    let detail = e.detail().unwrap_or("");
    expect_contains(detail, "<script>")?;
    expect_contains(detail, "line 2")?;
    ensure(
        !detail.contains("airlock_runtime"),
        format!("shim frames leak into {detail:?}"),
    )
}

fn missing_output_data_set() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(&mut c, "x = 1", None, "a int"))?;
    expect_code(&e, &SqlState::EXTERNAL_ROUTINE_EXCEPTION)?;
    expect_contains(e.message(), "did not set OutputDataSet")
}

fn output_not_a_data_frame() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(&mut c, "OutputDataSet = [1, 2]", None, "a int"))?;
    expect_code(&e, &SqlState::EXTERNAL_ROUTINE_EXCEPTION)?;
    expect_contains(
        e.message(),
        "OutputDataSet is a list, not a pandas DataFrame",
    )
}

fn column_count_mismatch() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1], 'b': [2]})",
        None,
        "a int8, b int8, c int8",
    ))?;
    expect_code(&e, &SqlState::DATATYPE_MISMATCH)?;
    expect_contains(
        e.message(),
        "has 2 columns, the column definition list declares 3",
    )
}

fn column_type_mismatch_names_column_and_types() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1], 's': [1.5]})",
        None,
        "a int8, s int4",
    ))?;
    expect_code(&e, &SqlState::DATATYPE_MISMATCH)?;
    expect_contains(e.message(), "column 2 (\"s\")")?;
    expect_contains(e.message(), "is float64")?;
    expect_contains(e.message(), "says integer")?;
    // Text into a non-text column goes through the type's input function, whose error
    // says where the value was.
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1, 2], 's': ['7', 'x']})",
        None,
        "a int8, s int4",
    ))?;
    expect_code(&e, &SqlState::INVALID_TEXT_REPRESENTATION)?;
    expect_contains(e.message(), "\"x\"")?;
    expect_contains(
        e.detail().unwrap_or_default(),
        "In row 2 of the script's output, column 2 (\"s\", integer)",
    )
}

fn value_out_of_range_for_declared_type() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1, 3000000000]})",
        None,
        "a int4",
    ))?;
    expect_code(&e, &SqlState::NUMERIC_VALUE_OUT_OF_RANGE)?;
    expect_contains(e.message(), "3000000000 in row 2")
}

fn unsupported_input_type_is_named() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "OutputDataSet = InputDataSet",
        Some("SELECT 1 AS a, point(1, 2) AS t"),
        "t text",
    ))?;
    expect_code(&e, &SqlState::FEATURE_NOT_SUPPORTED)?;
    expect_contains(e.message(), "column 2 (\"t\")")?;
    expect_contains(e.message(), "type point")?;
    // And on the way out: never a silent text fallback.
    let e = expect_err(py(
        &mut c,
        "OutputDataSet = pd.DataFrame({'p': ['(1,2)']})",
        None,
        "p point",
    ))?;
    expect_code(&e, &SqlState::FEATURE_NOT_SUPPORTED)?;
    expect_contains(e.message(), "column 1 (\"p\")")?;
    expect_contains(e.message(), "type point")
}

fn duplicate_input_columns_are_refused() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "OutputDataSet = InputDataSet",
        Some("SELECT 1 AS a, 2 AS a"),
        "a int",
    ))?;
    expect_code(&e, &SqlState::DUPLICATE_COLUMN)?;
    expect_contains(e.message(), "\"a\" (columns 1 and 2)")
}

fn domains_are_checked_on_output() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1, -1]})",
        None,
        "a posint",
    ))?;
    expect_code(&e, &SqlState::CHECK_VIOLATION)?;
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'s': ['x', None]})",
        None,
        "s required_text",
    ))?;
    expect_code(&e, &SqlState::NOT_NULL_VIOLATION)?;
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [5], 's': ['ok']})",
        None,
        "a posint, s required_text",
    )?;
    ensure(rows.len() == 1, "valid domain values pass")
}

fn float4_overflow_is_an_error() -> TestResult {
    let mut c = analyst();
    let e = expect_err(py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'f': [1.0, 1e300]})",
        None,
        "f float4",
    ))?;
    expect_code(&e, &SqlState::NUMERIC_VALUE_OUT_OF_RANGE)?;
    expect_contains(e.message(), "out of range for real")
}

/// A script that bypasses the shim and writes raw bytes to the data socket, then waits.
fn hostile(raw_frames_python: &str) -> String {
    format!(
        "import os, time, struct\n\
         def frame(kind, payload):\n\
         \x20   return struct.pack('<I', len(payload) + 1) + bytes([kind]) + payload\n\
         {raw_frames_python}\n\
         time.sleep(30)\n"
    )
}

fn hostile_runtime_cannot_hurt_the_backend() -> TestResult {
    let mut c = analyst();
    let cases: [(&str, &str); 4] = [
        (
            "os.write(3, struct.pack('<I', 2**31) + b'\\x02')",
            "exceeds the limit of 268435456 bytes",
        ),
        (
            "os.write(3, frame(1, b'{not json'))",
            "malformed control message",
        ),
        ("os.write(3, frame(2, b'\\xff' * 64))", "bad output batch"),
        (
            // A Null column claims a billion rows for a few hundred bytes.
            "import pyarrow as pa\n\
             b = pa.RecordBatch.from_arrays([pa.nulls(10**9)], names=['a'])\n\
             sink = pa.BufferOutputStream()\n\
             w = pa.ipc.new_stream(sink, b.schema); w.write_batch(b); w.close()\n\
             os.write(3, frame(2, sink.getvalue().to_pybytes()))",
            "an output batch of 1000000000 rows exceeds the limit",
        ),
    ];
    for (raw, want) in cases {
        let started = Instant::now();
        let e = expect_err(py(&mut c, &hostile(raw), None, "a int4"))?;
        expect_code(&e, &SqlState::PROTOCOL_VIOLATION)?;
        expect_contains(e.message(), want)?;
        ensure(
            started.elapsed() < Duration::from_secs(3),
            format!("{want}: took {:?}", started.elapsed()),
        )?;
    }
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int4",
    )?;
    ensure(rows.len() == 1, "the backend is fine afterwards")
}

fn fds_from_the_runtime_are_not_accepted() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    // The script hands its stdin (fd 0) along with a well-formed print frame; the kernel
    // must drop the fd, and the frame must still arrive.
    let script = hostile(
        "import socket, json\n\
         s = socket.socket(fileno=os.dup(3))\n\
         socket.send_fds(s, [frame(1, json.dumps({'type': 'print', 'text': 'fd sent'}).encode())], [0])\n\
         s.close()\n\
         os.write(3, frame(1, b'{not json'))",
    );
    let e = expect_err(py(&mut c, &script, None, "a int4"))?;
    expect_code(&e, &SqlState::PROTOCOL_VIOLATION)?;
    let got = notices.lock().map(|n| n.clone()).unwrap_or_default();
    ensure(
        got.iter().any(|n| n == "fd sent"),
        format!("notices {got:?}"),
    )
}

fn session_folder_is_removed_after_an_error() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let e = expect_err(py(
        &mut c,
        "import os\nopen('left.txt', 'w').write('x')\nprint(os.getcwd(), flush=True)\nraise ValueError('boom')",
        None,
        "a int",
    ))?;
    expect_code(&e, &SqlState::EXTERNAL_ROUTINE_EXCEPTION)?;
    session_folder_gone(&notices)
}

/// The backend returns as soon as the runtime says done; a script that says done itself
/// and then keeps its process alive is killed shortly after, leaving nothing behind.
fn a_runtime_lingering_after_done_is_killed() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let t0 = Instant::now();
    let rows = py(
        &mut c,
        "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(0.3)\n\
         done = b'\\x01{\"type\": \"done\", \"rows\": 0}'\n\
         os.write(3, len(done).to_bytes(4, 'little') + done)\ntime.sleep(600)",
        None,
        "a int",
    )?;
    ensure(
        rows.is_empty() && t0.elapsed() < Duration::from_secs(WALL_LIMIT as u64),
        format!("{} rows after {:?}", rows.len(), t0.elapsed()),
    )?;
    // Gone after the grace period (2 s), well before the wall-clock limit would act.
    call_leftovers_gone(
        &notices,
        Duration::from_secs(2),
        Duration::from_secs(WALL_LIMIT as u64 - 1),
    )
}

/// The session folder the script printed as its first NOTICE no longer exists on the
/// host, and neither does the call's cgroup (which cannot be removed while any process
/// of the call is left in it).
fn session_folder_gone(notices: &airlock_e2e::Notices) -> TestResult {
    call_leftovers_gone(notices, Duration::ZERO, Duration::from_secs(2))
}

/// As [`session_folder_gone`], waiting up to `print_wait` for the folder's NOTICE and up
/// to `folder_wait` for the folder to go.
fn call_leftovers_gone(
    notices: &airlock_e2e::Notices,
    print_wait: Duration,
    folder_wait: Duration,
) -> TestResult {
    let cwd = printed_folder(notices, print_wait)
        .ok_or("the script's print of its folder never arrived")?;
    let uuid = cwd.trim_start_matches("/sessions/");
    let host = env().daemon.sessions_dir().join(uuid);
    ensure(
        eventually(folder_wait, || !host.exists()),
        format!("{} still exists", host.display()),
    )?;
    let group = format!("call-{uuid}");
    ensure(
        eventually(Duration::from_secs(5), || {
            find_dir("/sys/fs/cgroup".as_ref(), &group, 8).is_none()
        }),
        format!("cgroup {group} (and so possibly its processes) is left"),
    )
}

/// A directory named `name` at most `depth` levels below `root`.
fn find_dir(root: &std::path::Path, name: &str, depth: usize) -> Option<std::path::PathBuf> {
    let entries = std::fs::read_dir(root).ok()?;
    for e in entries.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if !ft.is_dir() {
            continue;
        }
        if e.file_name() == name {
            return Some(e.path());
        }
        if depth > 0 {
            if let Some(p) = find_dir(&e.path(), name, depth - 1) {
                return Some(p);
            }
        }
    }
    None
}

/// Preamble of every escape attempt: `err(f)` runs f and names the errno it failed with
/// ('ok' if it did not fail), `sc(nr, ...)` makes a raw system call the same way, and
/// `run(...)` gives a program's exit status.
const ESCAPE_PRELUDE: &str = r#"import os, errno, socket, ctypes, subprocess, signal, pandas as pd
libc = ctypes.CDLL(None, use_errno=True)
def err(f):
    try:
        f(); return 'ok'
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def sc(nr, *a):
    r = libc.syscall(nr, *a)
    return 'ok' if r >= 0 else errno.errorcode.get(ctypes.get_errno())
def run(*prog):
    p = subprocess.run(prog, capture_output=True, text=True, timeout=5, stdin=subprocess.DEVNULL)
    return p.returncode
def dns():
    try:
        socket.getaddrinfo('example.com', 80)
        return 'resolved'
    except socket.gaierror as e:
        return 'gaierror'
"#;

/// One escape attempt from inside a real sandbox, through SQL: `expr` is a Python
/// expression whose value must be `want`.
fn escape(expr: &str, want: &str) -> TestResult {
    let mut c = analyst();
    let script = format!(
        "{ESCAPE_PRELUDE}result = {expr}\nOutputDataSet = pd.DataFrame({{'r': [str(result)]}})"
    );
    let rows = py(&mut c, &script, None, "r text")?;
    let got: String = rows[0].get(0);
    ensure(got == want, format!("{expr}: got {got:?}, want {want:?}"))
}

/// The escape suite: (name, Python expression, the exact failure it must give).
fn escape_cases(cluster: &Cluster, daemon: &Daemon) -> Vec<(String, String, String)> {
    let pgdata = cluster.dir.path().join("pgdata");
    let pgdata = pgdata.display();
    let state = daemon.state_dir.display();
    let prefix = airlock_e2e::python_prefix();
    let port = cluster.port;
    let sock = cluster.socket_file();
    let sock = sock.display();
    let cases: Vec<(&str, String, &str)> = vec![
        ("read_etc_shadow", "err(lambda: open('/etc/shadow').read())".into(), "ENOENT"),
        ("read_data_directory", format!("err(lambda: os.listdir('{pgdata}'))"), "ENOENT"),
        ("read_postgresql_conf", format!("err(lambda: open('{pgdata}/postgresql.conf').read())"), "ENOENT"),
        ("read_pg_hba_conf", format!("err(lambda: open('{pgdata}/pg_hba.conf').read())"), "ENOENT"),
        ("read_daemon_state", format!("err(lambda: os.listdir('{state}'))"), "ENOENT"),
        ("write_root", "err(lambda: open('/x', 'w'))".into(), "EROFS"),
        ("write_usr", "err(lambda: open('/usr/bin/x', 'w'))".into(), "EROFS"),
        ("write_etc_passwd", "err(lambda: open('/etc/passwd', 'a'))".into(), "EROFS"),
        ("write_site_packages", format!("err(lambda: open('{prefix}/venv/lib/python3.11/site-packages/evil.py', 'w'))"), "EROFS"),
        ("list_parent_of_session_folder", "err(lambda: os.listdir('/sessions'))".into(), "EACCES"),
        ("list_root", "err(lambda: os.listdir('/'))".into(), "EACCES"),
        ("proc_1_root_is_the_sandbox", "os.readlink('/proc/1/root')".into(), "/"),
        ("mountinfo_hides_host_paths", format!("any(p in open('/proc/self/mountinfo').read() for p in ('{state}', '{pgdata}', '/work', '/root'))"), "False"),
        ("write_sys", "err(lambda: open('/sys/kernel/x', 'w'))".into(), "ENOENT"),
        ("open_dev_mem", "err(lambda: open('/dev/mem', 'rb'))".into(), "ENOENT"),
        ("open_dev_kmsg", "err(lambda: open('/dev/kmsg', 'rb'))".into(), "ENOENT"),
        ("tcp_to_localhost", format!("err(lambda: socket.create_connection(('127.0.0.1', {port}), 1))"), "EPERM"),
        ("tcp_to_ipv6_localhost", format!("err(lambda: socket.create_connection(('::1', {port}), 1))"), "EPERM"),
        ("udp_to_localhost", format!("err(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {port})))"), "EPERM"),
        ("tcp_to_outside_address", "err(lambda: socket.create_connection(('192.0.2.1', 80), 1))".into(), "EPERM"),
        ("dns_lookup", "dns()".into(), "gaierror"),
        ("raw_socket", "err(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, 1))".into(), "EPERM"),
        ("packet_socket", "err(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))".into(), "EPERM"),
        ("netlink_socket", "err(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))".into(), "EPERM"),
        ("cluster_unix_socket", format!("err(lambda: socket.socket(socket.AF_UNIX).connect('{sock}'))"), "ENOENT"),
        ("see_other_processes", "','.join(p for p in os.listdir('/proc') if p.isdigit())".into(), "1"),
        ("kill_everything", "err(lambda: os.kill(-1, signal.SIGKILL))".into(), "ESRCH"),
        ("ptrace_attach", "sc(101, 16, 1, 0, 0)".into(), "EPERM"),
        ("run_su", "run('su', '-c', 'id')".into(), "1"),
        ("run_sudo", "run('sudo', 'id')".into(), "1"),
        ("run_mount", "run('mount', '-t', 'tmpfs', 'x', '/tmp')".into(), "32"),
        ("run_passwd", "run('passwd')".into(), "10"),
        ("unshare_user_namespace", "sc(272, 0x10000000)".into(), "EPERM"),
        ("mount_syscall", "sc(165, 0, 0, 0, 0, 0)".into(), "EPERM"),
        ("chroot", "sc(161, 0)".into(), "EPERM"),
        ("setns", "sc(308, 0, 0)".into(), "EPERM"),
        ("keyctl", "sc(250, 0, 0, 0, 0)".into(), "EPERM"),
        ("bpf", "sc(321, 0, 0, 0)".into(), "EPERM"),
        ("perf_event_open", "sc(298, 0, 0, 0, 0, 0)".into(), "EPERM"),
        ("userfaultfd", "sc(323, 0)".into(), "EPERM"),
        ("io_uring_setup", "sc(425, 1, 0)".into(), "EPERM"),
        ("secrets_in_environment", "','.join(sorted(os.environ))".into(), "HOME,LANG,LC_ALL,LOGNAME,PATH,TMPDIR,USER"),
        ("fill_session_folder", "err(lambda: [open(f'f{i}', 'wb').write(b'x' * (1 << 24)) for i in range(10**4)])".into(), "ENOSPC"),
        ("fill_tmp", "err(lambda: [open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 24)) for i in range(10**4)])".into(), "ENOSPC"),
        ("exhaust_fds", "err(lambda: [open('/dev/null') for i in range(10**5)])".into(), "EMFILE"),
    ];
    cases
        .into_iter()
        .map(|(n, e, w)| (format!("escape_{n}"), e, w.to_string()))
        .collect()
}

fn another_sessions_folder_is_invisible() -> TestResult {
    // Call A keeps its session folder alive with a file in it; call B, running at the
    // same time, looks for it by name.
    let (mut a, notices) = env().cluster.connect("analyst");
    let holder = thread::spawn(move || {
        py(
            &mut a,
            "import os, time, pandas as pd\nopen('secret.txt', 'w').write('mine')\nprint(os.getcwd(), flush=True)\ntime.sleep(2.5)\nOutputDataSet = pd.DataFrame({'a': [1]})",
            None,
            "a int",
        )
        .map(|_| ())
    });
    let a_cwd = printed_folder(&notices, Duration::from_secs(3))
        .ok_or("call A never printed its folder")?;
    let result = escape(
        &format!(
            "(err(lambda: os.listdir('{a_cwd}')), err(lambda: open('{a_cwd}/secret.txt').read()))"
        ),
        "('ENOENT', 'ENOENT')",
    );
    holder.join().map_err(|_| "call A panicked")??;
    result
}

fn nothing_survives_between_calls() -> TestResult {
    let mut c = analyst();
    py(
        &mut c,
        "import pandas as pd\nopen('/tmp/left_in_tmp', 'w').write('x')\nopen('left_in_session', 'w').write('x')\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    let rows = py(
        &mut c,
        "import os, pandas as pd\nOutputDataSet = pd.DataFrame({'a': [os.path.exists('/tmp/left_in_tmp') or os.path.exists('left_in_session')]})",
        None,
        "a bool",
    )?;
    ensure(
        !rows[0].get::<_, bool>(0),
        "a file written in one call is visible in the next",
    )
}

fn a_gigabyte_of_output_is_cut_and_the_call_ends() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let started = Instant::now();
    py(
        &mut c,
        "import sys, pandas as pd\nchunk = ('x' * 1023 + '\\n') * 1024\nfor i in range(1024):\n    sys.stdout.write(chunk)\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    let got = notices.lock().map(|n| n.clone()).unwrap_or_default();
    let shown: usize = got.iter().map(|n| n.len()).sum();
    ensure(shown <= 1 << 20, format!("{shown} bytes of NOTICEs"))?;
    ensure(
        got.iter().any(|n| n.contains("not shown")),
        "no truncation note",
    )?;
    ensure(
        started.elapsed() < Duration::from_secs(WALL_LIMIT as u64),
        format!("took {:?}", started.elapsed()),
    )
}

fn unknown_language() -> TestResult {
    let mut c = analyst();
    let e = expect_err(c.query(
        "SELECT * FROM airlock.execute_external_script('cobol', 'x') AS r(a int)",
        &[],
    ))?;
    expect_code(&e, &SqlState::INVALID_PARAMETER_VALUE)?;
    expect_contains(e.message(), "cobol")
}

fn prints_become_notices() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    py(
        &mut c,
        "import sys, pandas as pd\nprint('hello from the sandbox')\nprint('to stderr', file=sys.stderr)\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    let got = notices.lock().map(|n| n.clone()).unwrap_or_default();
    ensure(
        got.iter().any(|n| n == "hello from the sandbox"),
        format!("notices {got:?}"),
    )?;
    ensure(
        got.iter().any(|n| n == "to stderr"),
        format!("notices {got:?}"),
    )
}

fn print_flood_is_cut_with_a_note() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    c.batch_execute("SET airlock.max_print_bytes = 1000")?;
    py(
        &mut c,
        "import pandas as pd\nfor i in range(2000): print('line', i)\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    let got = notices.lock().map(|n| n.clone()).unwrap_or_default();
    let shown: usize = got
        .iter()
        .filter(|n| n.starts_with("line"))
        .map(|n| n.len())
        .sum();
    ensure(
        shown <= 1000,
        format!("{shown} bytes shown past a 1000-byte limit"),
    )?;
    ensure(
        got.iter().any(|n| n.contains("not shown")),
        format!("no truncation note in {:?}", got.last()),
    )
}

fn script_runs_as_a_worker_uid() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "import os, pandas as pd\nOutputDataSet = pd.DataFrame({'uid': [os.getuid()], 'euid': [os.geteuid()], 'gid': [os.getgid()]})",
        None,
        "uid int8, euid int8, gid int8",
    )?;
    let uid: i64 = rows[0].get(0);
    let pg = postgres_user().uid.as_raw() as i64;
    ensure(
        uid != 0 && uid != pg,
        format!("uid {uid} must be neither 0 nor postgres ({pg})"),
    )?;
    ensure(
        (FIRST_UID as i64..(FIRST_UID + WORKERS) as i64).contains(&uid),
        format!("uid {uid} outside the worker range"),
    )?;
    ensure(rows[0].get::<_, i64>(1) == uid, "euid == uid")?;
    ensure(
        rows[0].get::<_, i64>(2) == FIRST_UID as i64,
        "gid is the workers' group",
    )
}

fn session_folder_is_private_and_removed() -> TestResult {
    let mut c = analyst();
    let rows = py(
        &mut c,
        "import os, pandas as pd\nst = os.stat('.')\nopen('scratch.txt', 'w').write('x')\n\
         OutputDataSet = pd.DataFrame({'cwd': [os.getcwd()], 'mode': [st.st_mode & 0o777], 'owner': [st.st_uid == os.getuid()], 'home': [os.environ['HOME']]})",
        None,
        "cwd text, mode int4, owner bool, home text",
    )?;
    let cwd: String = rows[0].get(0);
    let name = cwd.rsplit('/').next().unwrap_or("");
    ensure(
        name.len() == 36 && name.matches('-').count() == 4,
        format!("cwd {cwd} is not named by a UUID"),
    )?;
    ensure(rows[0].get::<_, i32>(1) == 0o700, "mode 0700")?;
    ensure(rows[0].get::<_, bool>(2), "owned by the worker")?;
    ensure(
        rows[0].get::<_, String>(3) == cwd,
        "HOME is the session folder",
    )?;
    let host = env().daemon.sessions_dir().join(name);
    ensure(
        eventually(Duration::from_secs(2), || !host.exists()),
        format!("{} still exists after the call", host.display()),
    )
}

fn no_network_to_the_cluster() -> TestResult {
    let cluster = &env().cluster;
    // With the seccomp filter on, creating an AF_INET socket already fails (EPERM); the
    // empty network namespace beneath it (ENETUNREACH) is proven by the sandbox tests.
    let script = format!(
        "import socket, errno, pandas as pd\n\
         def attempt(family, addr):\n\
         \x20   try:\n\
         \x20       s = socket.socket(family, socket.SOCK_STREAM)\n\
         \x20       s.connect(addr)\n\
         \x20       return 'connected'\n\
         \x20   except OSError as e:\n\
         \x20       return errno.errorcode.get(e.errno, str(e.errno))\n\
         OutputDataSet = pd.DataFrame({{'tcp': [attempt(socket.AF_INET, ('127.0.0.1', {port}))],\n\
         \x20                              'unix': [attempt(socket.AF_UNIX, '{sock}')]}})",
        port = cluster.port,
        sock = cluster.socket_file().display(),
    );
    let mut c = analyst();
    let rows = py(&mut c, &script, None, "tcp text, unix text")?;
    let tcp: String = rows[0].get(0);
    let unix: String = rows[0].get(1);
    ensure(
        tcp == "EPERM" || tcp == "ENETUNREACH",
        format!("TCP to the cluster's port gave {tcp}"),
    )?;
    ensure(
        unix == "ENOENT",
        format!("the cluster's Unix socket gave {unix}"),
    )
}

fn timeout_kills_the_sandbox_and_the_next_call_works() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let started = Instant::now();
    let e = expect_err(py(
        &mut c,
        "import os, subprocess, time\nprint(os.getcwd(), flush=True)\nsubprocess.Popen(['sleep', '600'])\ntime.sleep(600)",
        None,
        "a int",
    ))?;
    let took = started.elapsed();
    expect_code(&e, &SqlState::PROGRAM_LIMIT_EXCEEDED)?;
    expect_contains(e.message(), &format!("wall-clock limit of {WALL_LIMIT} s"))?;
    ensure(
        took < Duration::from_secs(WALL_LIMIT as u64 + 3),
        format!("timeout took {took:?}"),
    )?;
    session_folder_gone(&notices)?;
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    ensure(rows.len() == 1, "the next call works")
}

fn memory_bomb_hits_the_memory_limit() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let e = expect_err(py(
        &mut c,
        "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(0.5)\nhog = bytearray(1 << 30)",
        None,
        "a int",
    ))?;
    expect_code(&e, &SqlState::PROGRAM_LIMIT_EXCEEDED)?;
    expect_contains(
        e.message(),
        &format!("script exceeded its memory limit of {MEMORY_LIMIT} MiB"),
    )?;
    session_folder_gone(&notices)?;
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    ensure(rows.len() == 1, "the next call works")
}

fn cpu_spin_hits_the_cpu_limit() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let started = Instant::now();
    let e = expect_err(py(
        &mut c,
        "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(0.3)\nwhile True:\n    pass",
        None,
        "a int",
    ))?;
    expect_code(&e, &SqlState::PROGRAM_LIMIT_EXCEEDED)?;
    expect_contains(
        e.message(),
        &format!("script exceeded its CPU-time limit of {CPU_LIMIT} s"),
    )?;
    ensure(
        started.elapsed() < Duration::from_secs(WALL_LIMIT as u64),
        format!(
            "took {:?}, the wall clock must not be what stopped it",
            started.elapsed()
        ),
    )?;
    session_folder_gone(&notices)
}

fn fork_bomb_hits_the_pids_limit() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let e = expect_err(py(
        &mut c,
        "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(0.3)\nfor i in range(100000):\n    if os.fork() == 0:\n        time.sleep(60)\n        os._exit(0)",
        None,
        "a int",
    ))?;
    expect_code(&e, &SqlState::EXTERNAL_ROUTINE_EXCEPTION)?;
    expect_contains(e.message(), "BlockingIOError")?;
    session_folder_gone(&notices)?;
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    ensure(rows.len() == 1, "the next call works")
}

fn cancel_returns_promptly_and_kills_the_sandbox() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let canceller = thread::spawn(move || -> Result<(), postgres::Error> {
        thread::sleep(Duration::from_millis(1500));
        superuser().execute("SELECT pg_cancel_backend($1)", &[&pid])?;
        Ok(())
    });
    let started = Instant::now();
    let e = expect_err(py(
        &mut c,
        "import os, time\nprint(os.getcwd(), flush=True)\ntime.sleep(600)",
        None,
        "a int",
    ))?;
    let took = started.elapsed();
    canceller.join().map_err(|_| "canceller panicked")??;
    expect_code(&e, &SqlState::QUERY_CANCELED)?;
    ensure(
        took < Duration::from_secs(3),
        format!("cancel took {took:?}"),
    )?;
    session_folder_gone(&notices)?;
    let rows = py(
        &mut c,
        "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
        None,
        "a int",
    )?;
    ensure(rows.len() == 1, "the next call works")
}

fn statement_timeout_applies() -> TestResult {
    let mut c = analyst();
    c.batch_execute("SET statement_timeout = '1s'")?;
    let started = Instant::now();
    let e = expect_err(py(&mut c, "import time\ntime.sleep(600)", None, "a int"))?;
    expect_code(&e, &SqlState::QUERY_CANCELED)?;
    ensure(
        started.elapsed() < Duration::from_secs(3),
        format!("took {:?}", started.elapsed()),
    )
}

fn daemon_not_running_hints_how_to_start_it() -> TestResult {
    let mut c = superuser();
    c.batch_execute("SET airlock.socket_path = '/nonexistent/airlockd.sock'")?;
    let e = expect_err(py(&mut c, "x = 1", None, "a int"))?;
    expect_code(&e, &SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)?;
    expect_contains(e.message(), "/nonexistent/airlockd.sock")?;
    expect_contains(e.hint().unwrap_or(""), "airlockd")
}

fn socket_path_is_superuser_only() -> TestResult {
    let mut c = analyst();
    let err = c
        .batch_execute("SET airlock.socket_path = '/tmp/evil.sock'")
        .err()
        .ok_or("an analyst could point the extension at another socket")?;
    ensure(
        err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        format!("got {err}"),
    )
}

fn daemon_refuses_other_peers() -> TestResult {
    use std::io::{Read, Write};
    // This test process runs as root, which is not in allowed_peer_uids.
    let mut s = std::os::unix::net::UnixStream::connect(&env().daemon.socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let _ = s.write_all(b"\x05\x00\x00\x00\x01{}{}");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    ensure(n == 0, "the daemon answered a peer that is not allowed")?;
    ensure(
        eventually(Duration::from_secs(2), || {
            env().daemon.log().contains("refused peer")
        }),
        "the refusal is logged",
    )
}

fn switch_off_is_an_error_with_the_fix() -> TestResult {
    // A cluster of its own: the switch is server-wide.
    let cluster = Cluster::start(&env().daemon.socket, false);
    let result = (|| -> TestResult {
        let (mut c, _) = cluster.connect("postgres");
        let e = expect_err(py(&mut c, "x = 1", None, "a int"))?;
        expect_code(&e, &SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)?;
        expect_contains(e.message(), "disabled")?;
        expect_contains(
            e.hint().unwrap_or(""),
            "ALTER SYSTEM SET airlock.enabled = on",
        )?;
        // And the documented fix works.
        c.batch_execute("ALTER SYSTEM SET airlock.enabled = on")
            .map_err(PgErr)?;
        c.batch_execute("SELECT pg_reload_conf()").map_err(PgErr)?;
        let ok = eventually(Duration::from_secs(5), || {
            py(
                &mut c,
                "import pandas as pd\nOutputDataSet = pd.DataFrame({'a': [1]})",
                None,
                "a int",
            )
            .is_ok()
        });
        ensure(ok, "enabling the switch did not take effect")
    })();
    cluster.stop();
    result
}

// ---------------------------------------------------------------------------- audit

/// The daemon's audit records of `script`, once `n` of them are written.
fn audit_records(script_sha256: &str, n: usize) -> Result<Vec<(usize, AuditRecord)>, Failed> {
    let path = env().daemon.audit_log();
    let mut found = Vec::new();
    let complete = eventually(Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        found = text
            .lines()
            .enumerate()
            .filter_map(|(i, l)| serde_json::from_str::<AuditRecord>(l).ok().map(|r| (i, r)))
            .filter(|(_, r)| r.script_sha256 == script_sha256)
            .collect();
        found.len() >= n
    });
    ensure(
        complete,
        format!(
            "{} audit record(s) of script {script_sha256} after 15 s, expected {n}",
            found.len()
        ),
    )?;
    Ok(found)
}

/// Hex SHA-256 of a script, as the extension computes it.
fn script_sha256(c: &mut Client, script: &str) -> Result<String, PgErr> {
    Ok(c.query_one(
        "SELECT encode(sha256(convert_to($1, 'UTF8')), 'hex')",
        &[&script],
    )?
    .get(0))
}

/// Runs `airlock audit verify FILE`: (exit code, stdout).
fn audit_verify(file: &std::path::Path) -> Result<(i32, String), Failed> {
    let out = std::process::Command::new(airlock_cli_bin())
        .args(["audit", "verify"])
        .arg(file)
        .output()
        .map_err(|e| format!("running airlock audit verify: {e}"))?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    ))
}

fn audit_log_records_each_call_and_verify_finds_an_edit() -> TestResult {
    let (mut c, _) = env().cluster.connect("analyst");
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    // Unique scripts: the shared daemon's log also holds every other case's calls.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    );
    let ok = format!("# audit ok {nonce}\nOutputDataSet = InputDataSet.head(2)");
    let failing = format!("# audit error {nonce}\nraise ValueError('no')");
    let slow = format!("# audit timeout {nonce}\nimport time\ntime.sleep(600)");
    let rows = py(
        &mut c,
        &ok,
        Some("SELECT id FROM measurements WHERE id < 100"),
        "id int8",
    )?;
    ensure(rows.len() == 2, format!("2 rows, got {}", rows.len()))?;
    expect_err(py(&mut c, &failing, None, "a int"))?;
    let e = expect_err(py(&mut c, &slow, None, "a int"))?;
    expect_code(&e, &SqlState::PROGRAM_LIMIT_EXCEEDED)?;

    let ok_sha = script_sha256(&mut c, &ok)?;
    let (ok_line, ok_rec) = audit_records(&ok_sha, 1)?.remove(0);
    ensure(ok_rec.role == "analyst", format!("role {:?}", ok_rec.role))?;
    ensure(
        ok_rec.database == "postgres",
        format!("database {:?}", ok_rec.database),
    )?;
    ensure(
        ok_rec.language == "python",
        format!("language {:?}", ok_rec.language),
    )?;
    ensure(
        ok_rec.backend_pid == pid,
        format!("backend_pid {} != {pid}", ok_rec.backend_pid),
    )?;
    ensure(
        (FIRST_UID..FIRST_UID + WORKERS).contains(&ok_rec.worker_uid),
        format!("worker_uid {}", ok_rec.worker_uid),
    )?;
    ensure(!ok_rec.session_id.is_nil(), "a session id")?;
    ensure(
        ok_rec.rows_in == Some(3) && ok_rec.rows_out == Some(2),
        format!(
            "rows in/out {:?}/{:?}, expected 3/2",
            ok_rec.rows_in, ok_rec.rows_out
        ),
    )?;
    ensure(
        ok_rec.outcome == AuditOutcome::Ok,
        format!("outcome {:?}", ok_rec.outcome),
    )?;
    ensure(
        ok_rec.cpu_ms.is_some() && ok_rec.peak_memory_bytes.is_some_and(|b| b > 0),
        format!(
            "cgroup stats {:?} {:?}",
            ok_rec.cpu_ms, ok_rec.peak_memory_bytes
        ),
    )?;
    ensure(
        ok_rec.time.ends_with('Z') && ok_rec.time.len() == "2025-01-01T00:00:00.000Z".len(),
        format!("time {:?}", ok_rec.time),
    )?;

    let (_, err_rec) = audit_records(&script_sha256(&mut c, &failing)?, 1)?.remove(0);
    ensure(
        err_rec.outcome == AuditOutcome::ScriptError,
        format!("outcome {:?}", err_rec.outcome),
    )?;
    ensure(
        err_rec.rows_in == Some(0) && err_rec.rows_out == Some(0),
        format!("rows {:?}/{:?}", err_rec.rows_in, err_rec.rows_out),
    )?;
    let (_, slow_rec) = audit_records(&script_sha256(&mut c, &slow)?, 1)?.remove(0);
    ensure(
        slow_rec.outcome == AuditOutcome::Timeout,
        format!("outcome {:?}", slow_rec.outcome),
    )?;
    ensure(
        slow_rec.rows_out.is_none() && slow_rec.wall_ms >= WALL_LIMIT as u64 * 1000,
        format!(
            "rows_out {:?}, wall_ms {}",
            slow_rec.rows_out, slow_rec.wall_ms
        ),
    )?;

    let log = env().daemon.audit_log();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log)?.permissions().mode() & 0o777;
    ensure(mode == 0o600, format!("audit log mode {mode:o}"))?;
    let (code, out) = audit_verify(&log)?;
    ensure(
        code == 0 && out.starts_with("audit log OK: "),
        format!("verify exited {code}: {out}"),
    )?;

    // An edit of the ok call's rows_out is found and named. Records written later (ours
    // at least) follow it, so its changed hash breaks a link.
    let copy = env().daemon.dir.path().join("audit-edited.jsonl");
    let text = std::fs::read_to_string(&log)?;
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == ok_line {
                l.replace("\"rows_out\":2", "\"rows_out\":20")
            } else {
                l.to_owned()
            }
        })
        .collect();
    ensure(
        edited[ok_line] != text.lines().nth(ok_line).unwrap_or(""),
        "the edit took",
    )?;
    std::fs::write(&copy, edited.join("\n") + "\n")?;
    let (code, out) = audit_verify(&copy)?;
    let k = ok_line + 1;
    ensure(
        code == 1,
        format!("verify of the edited copy exited {code}: {out}"),
    )?;
    expect_contains(
        &out,
        &format!("audit log BROKEN at record {k} (line {k}): record {k} was modified"),
    )
}

fn main() {
    let args = Arguments::from_args();
    let daemon = Daemon::start(DaemonSettings {
        first_uid: FIRST_UID,
        count: WORKERS,
        wall_clock_seconds: WALL_LIMIT as f64,
        cpu_seconds: CPU_LIMIT,
        memory_mib: MEMORY_LIMIT,
        pids: PIDS_LIMIT,
        queue_timeout_seconds: 30.0,
    });
    let cluster = Cluster::start(&daemon.socket, true);
    setup_roles(&cluster);
    if ENV.set(Env { daemon, cluster }).is_err() {
        unreachable!("main runs once");
    }

    macro_rules! trials {
        ($($f:ident),* $(,)?) => {
            vec![$(Trial::test(stringify!($f), $f)),*]
        };
    }
    let trials = trials![
        happy_path_with_several_types,
        extremes_round_trip,
        script_sees_proper_dtypes,
        sp_alias_and_named_arguments,
        no_input_query,
        zero_row_input_keeps_columns,
        many_batches,
        permission_denied_without_role,
        superuser_needs_no_grant,
        security_definer_runs_as_its_owner,
        language_grant_alone_allows_that_language,
        worker_pool_maps_callers_onto_workers,
        busy_pool_fails_after_the_queue_timeout,
        monitoring_views_show_own_sessions_and_stats,
        a_crashed_daemon_leaves_nothing_running_and_is_swept_at_restart,
        input_query_runs_as_caller,
        row_level_security_applies,
        python_exception_is_an_error_with_traceback,
        missing_output_data_set,
        output_not_a_data_frame,
        column_count_mismatch,
        column_type_mismatch_names_column_and_types,
        value_out_of_range_for_declared_type,
        unsupported_input_type_is_named,
        duplicate_input_columns_are_refused,
        unknown_language,
        domains_are_checked_on_output,
        float4_overflow_is_an_error,
        hostile_runtime_cannot_hurt_the_backend,
        fds_from_the_runtime_are_not_accepted,
        session_folder_is_removed_after_an_error,
        a_runtime_lingering_after_done_is_killed,
        prints_become_notices,
        print_flood_is_cut_with_a_note,
        script_runs_as_a_worker_uid,
        session_folder_is_private_and_removed,
        no_network_to_the_cluster,
        timeout_kills_the_sandbox_and_the_next_call_works,
        cancel_returns_promptly_and_kills_the_sandbox,
        memory_bomb_hits_the_memory_limit,
        cpu_spin_hits_the_cpu_limit,
        fork_bomb_hits_the_pids_limit,
        nothing_survives_between_calls,
        another_sessions_folder_is_invisible,
        a_gigabyte_of_output_is_cut_and_the_call_ends,
        statement_timeout_applies,
        daemon_not_running_hints_how_to_start_it,
        socket_path_is_superuser_only,
        daemon_refuses_other_peers,
        switch_off_is_an_error_with_the_fix,
        audit_log_records_each_call_and_verify_finds_an_edit,
    ];
    let mut trials = trials;
    let env = env();
    for (name, expr, want) in escape_cases(&env.cluster, &env.daemon) {
        trials.push(Trial::test(name, move || escape(&expr, &want)));
    }
    let conclusion = libtest_mimic::run(&args, trials);
    airlock_e2e::stop_suite(&env.cluster, &env.daemon, conclusion.has_failed());
    conclusion.exit();
}
