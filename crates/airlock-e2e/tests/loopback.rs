//! Loopback queries end to end (issue 6): a script's `airlock.query` / `airlock_query`
//! runs in the calling session, as the calling role, in its transaction — through the
//! real SQL entry point, a real cluster, the real `airlockd` and real sandboxes, in
//! Python and in R.

use std::{
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use airlock_e2e::{describe, Cluster, Daemon, DaemonSettings};
use libtest_mimic::{Arguments, Failed, Trial};
use postgres::{error::SqlState, Client, Row};

const FIRST_UID: u32 = 62200;
const WORKERS: u32 = 4;

struct Env {
    daemon: Daemon,
    cluster: Cluster,
}

static ENV: OnceLock<Env> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get().expect("set up in main")
}

type TestResult = Result<(), Failed>;

fn ensure(cond: bool, msg: impl Into<String>) -> TestResult {
    if cond {
        Ok(())
    } else {
        Err(msg.into().into())
    }
}

fn connect(role: &str) -> Client {
    env().cluster.connect(role).0
}

fn call(
    c: &mut Client,
    lang: &str,
    script: &str,
    columns: &str,
) -> Result<Vec<Row>, postgres::Error> {
    c.query(
        format!("SELECT * FROM airlock.execute_external_script($1, $2) AS o({columns})").as_str(),
        &[&lang, &script],
    )
}

fn rows(c: &mut Client, lang: &str, script: &str, columns: &str) -> Result<Vec<Row>, Failed> {
    call(c, lang, script, columns).map_err(|e| format!("{lang}: {}", describe(&e)).into())
}

fn expect_error(r: Result<Vec<Row>, postgres::Error>, code: &SqlState, needle: &str) -> TestResult {
    match r {
        Ok(rows) => Err(format!("expected an error, got {} rows", rows.len()).into()),
        Err(e) => {
            let Some(db) = e.as_db_error() else {
                return Err(format!("expected a server error, got {e}").into());
            };
            let text = format!(
                "{} | {} | {}",
                db.message(),
                db.detail().unwrap_or_default(),
                db.hint().unwrap_or_default()
            );
            ensure(
                db.code() == code && text.contains(needle),
                format!(
                    "expected {} with {needle:?}, got {}: {text}",
                    code.code(),
                    db.code().code()
                ),
            )
        }
    }
}

/// (language, script) pairs doing the same thing in both languages.
fn both<'a>(py: &'a str, r: &'a str) -> [(&'static str, &'a str); 2] {
    [("python", py), ("r", r)]
}

fn reads_a_table_the_caller_may_read() -> TestResult {
    for (lang, script) in both(
        "d = airlock.query('SELECT id, amount, note FROM orders WHERE id <= $1 ORDER BY id', [2])\n\
         OutputDataSet = d.assign(kind=[str(d.amount.dtype)] * len(d))",
        "d <- airlock_query('SELECT id, amount, note FROM orders WHERE id <= $1 ORDER BY id', list(2L))\n\
         d$kind <- class(d$amount)\nOutputDataSet <- d",
    ) {
        let got = rows(&mut connect("analyst"), lang, script, "id int8, amount numeric, note text, kind text")?;
        let ids: Vec<i64> = got.iter().map(|r| r.get(0)).collect();
        let notes: Vec<Option<String>> = got.iter().map(|r| r.get(2)).collect();
        ensure(
            ids == [1, 2] && notes == [Some("first €".into()), None],
            format!("{lang}: {ids:?} {notes:?}"),
        )?;
        // The same lossless mapping as the input: numeric is Decimal / exact text.
        let kind: String = got[0].get(3);
        ensure(kind == "object" || kind == "character", format!("{lang}: numeric as {kind}"))?;
    }
    Ok(())
}

fn permission_denied_is_seen_in_the_script() -> TestResult {
    for (lang, script) in both(
        "try:\n    airlock.query('SELECT * FROM secret')\n    state = 'read it'\n\
         except airlock.QueryError as e:\n    state = e.sqlstate\n\
         OutputDataSet = pd.DataFrame({'state': [state]})",
        "state <- tryCatch({ airlock_query('SELECT * FROM secret'); 'read it' },\n\
             airlock_query_error = function(e) e$sqlstate)\n\
         OutputDataSet <- data.frame(state = state)",
    ) {
        let got = rows(&mut connect("analyst"), lang, script, "state text")?;
        let state: String = got[0].get(0);
        ensure(state == "42501", format!("{lang}: {state}"))?;
    }
    // Not caught: the call fails with the statement's own error.
    for (lang, script) in both(
        "airlock.query('SELECT * FROM secret')",
        "airlock_query('SELECT * FROM secret')",
    ) {
        expect_error(
            call(&mut connect("analyst"), lang, script, "x int"),
            &SqlState::INSUFFICIENT_PRIVILEGE,
            "permission denied for table secret",
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or_default()))?;
    }
    Ok(())
}

fn row_level_security_filters_results() -> TestResult {
    for (lang, script) in both(
        "OutputDataSet = airlock.query('SELECT v FROM owned_rows ORDER BY v')",
        "OutputDataSet <- airlock_query('SELECT v FROM owned_rows ORDER BY v')",
    ) {
        let got = rows(&mut connect("analyst"), lang, script, "v int")?;
        let v: Vec<i32> = got.iter().map(|r| r.get(0)).collect();
        ensure(v == [1, 2], format!("{lang}: {v:?}"))?;
    }
    Ok(())
}

fn writes_join_the_callers_transaction() -> TestResult {
    let mut c = connect("writer");
    for (lang, script) in both(
        "n = airlock.execute('INSERT INTO journal(note) VALUES ($1), ($2)', ['a', 'b'])\n\
         seen = airlock.query('SELECT count(*)::int4 AS n FROM journal').n[0]\n\
         OutputDataSet = pd.DataFrame({'inserted': [n], 'seen': [seen]})",
        "n <- airlock_execute('INSERT INTO journal(note) VALUES ($1), ($2)', list('a', 'b'))\n\
         seen <- airlock_query('SELECT count(*)::int4 AS n FROM journal')$n[1]\n\
         OutputDataSet <- data.frame(inserted = n, seen = seen)",
    ) {
        let mut tx = c.transaction().map_err(|e| describe(&e))?;
        let got = tx
            .query(
                "SELECT * FROM airlock.execute_external_script($1, $2) AS o(inserted int8, seen int8)",
                &[&lang, &script],
            )
            .map_err(|e| format!("{lang}: {}", describe(&e)))?;
        let (inserted, seen): (i64, i64) = (got[0].get(0), got[0].get(1));
        ensure(
            inserted == 2 && seen == 2,
            format!("{lang}: {inserted} {seen}"),
        )?;
        // The caller sees the script's writes in its transaction…
        let inside: i64 = tx
            .query_one("SELECT count(*) FROM journal", &[])
            .map_err(|e| describe(&e))?
            .get(0);
        ensure(inside == 2, format!("{lang}: {inside} rows inside"))?;
        // …and a ROLLBACK leaves nothing.
        tx.rollback().map_err(|e| describe(&e))?;
        let after: i64 = c
            .query_one("SELECT count(*) FROM journal", &[])
            .map_err(|e| describe(&e))?
            .get(0);
        ensure(after == 0, format!("{lang}: {after} rows after ROLLBACK"))?;
    }
    Ok(())
}

fn read_only_refuses_writes_clearly() -> TestResult {
    // analyst has the default, read_only; a write inside a function is refused too.
    for (lang, script) in both(
        "airlock.execute('SELECT write_journal()')",
        "airlock_execute('SELECT write_journal()')",
    ) {
        expect_error(
            call(&mut connect("analyst"), lang, script, "x int"),
            &SqlState::READ_ONLY_SQL_TRANSACTION,
            "airlock.loopback is read_only",
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or_default()))?;
    }
    // A failed statement is rolled back alone: the script goes on after catching it.
    let got = rows(
        &mut connect("writer"),
        "python",
        "try:\n    airlock.execute('INSERT INTO journal(note) VALUES (NULL)')\n\
         except airlock.QueryError as e:\n    first = e.sqlstate\n\
         airlock.execute(\"INSERT INTO journal(note) VALUES ('after')\")\n\
         OutputDataSet = airlock.query('SELECT note FROM journal').assign(first=first)",
        "note text, first text",
    )?;
    ensure(
        got.len() == 1
            && got[0].get::<_, String>(0) == "after"
            && got[0].get::<_, String>(1) == "23502",
        format!("{got:?}"),
    )?;
    connect("postgres")
        .execute("DELETE FROM journal", &[])
        .map_err(|e| describe(&e))?;
    // off: no loopback at all.
    let mut c = connect("postgres");
    c.batch_execute("SET airlock.loopback = off")
        .map_err(|e| describe(&e))?;
    expect_error(
        call(&mut c, "python", "airlock.query('SELECT 1')", "x int"),
        &SqlState::INSUFFICIENT_PRIVILEGE,
        "loopback queries are off",
    )?;
    // And only a superuser may change it.
    let e = connect("analyst").batch_execute("SET airlock.loopback = read_write");
    ensure(
        e.as_ref().err().and_then(|e| e.code()) == Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        format!("analyst changed airlock.loopback: {e:?}"),
    )
}

fn limits_are_errors_naming_them() -> TestResult {
    let mut c = connect("postgres");
    c.batch_execute("SET airlock.loopback_max_rows = 10; SET airlock.loopback_max_statements = 3")
        .map_err(|e| describe(&e))?;
    for (lang, script) in both(
        "airlock.query('SELECT g FROM generate_series(1, 11) g')",
        "airlock_query('SELECT g FROM generate_series(1, 11) g')",
    ) {
        expect_error(
            call(&mut c, lang, script, "x int"),
            &SqlState::PROGRAM_LIMIT_EXCEEDED,
            "airlock.loopback_max_rows (10)",
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or_default()))?;
        let ten = if lang == "python" {
            "OutputDataSet = airlock.query('SELECT g FROM generate_series(1, 10) g')"
        } else {
            "OutputDataSet <- airlock_query('SELECT g FROM generate_series(1, 10) g')"
        };
        let got = rows(&mut c, lang, ten, "g int")?;
        ensure(got.len() == 10, format!("{lang}: 10 rows pass"))?;
    }
    for (lang, script) in both(
        "for i in range(4):\n    airlock.execute('SELECT 1')",
        "for (i in 1:4) airlock_execute('SELECT 1')",
    ) {
        expect_error(
            call(&mut c, lang, script, "x int"),
            &SqlState::PROGRAM_LIMIT_EXCEEDED,
            "airlock.loopback_max_statements (3)",
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or_default()))?;
    }
    Ok(())
}

fn nesting_is_refused() -> TestResult {
    for (lang, script) in both(
        "airlock.query(\"SELECT * FROM airlock.execute_external_script('python', 'OutputDataSet = pd.DataFrame({\\\"a\\\": [1]})') AS o(a int)\")",
        "airlock_query(\"SELECT * FROM airlock.execute_external_script('r', 'OutputDataSet <- data.frame(a = 1L)') AS o(a int)\")",
    ) {
        expect_error(
            call(&mut connect("analyst"), lang, script, "x int"),
            &SqlState::FEATURE_NOT_SUPPORTED,
            "cannot run inside a script's loopback query",
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or_default()))?;
    }
    Ok(())
}

/// A cancel while a loopback statement runs ends the call promptly (it is never handed
/// to the script to catch), and the session works afterwards.
fn cancel_during_a_slow_loopback_query() -> TestResult {
    for (lang, script) in both(
        "try:\n    airlock.query('SELECT 1 AS x FROM pg_sleep(30)')\nexcept Exception:\n    pass\n\
         OutputDataSet = pd.DataFrame({'x': [1]})",
        "tryCatch(airlock_query('SELECT 1 AS x FROM pg_sleep(30)'), error = function(e) NULL)\n\
         OutputDataSet <- data.frame(x = 1L)",
    ) {
        let mut c = connect("analyst");
        let token = c.cancel_token();
        let canceller = thread::spawn(move || {
            thread::sleep(Duration::from_millis(1500));
            token.cancel_query(postgres::NoTls)
        });
        let t0 = Instant::now();
        let r = call(&mut c, lang, script, "x int");
        let took = t0.elapsed();
        canceller
            .join()
            .map_err(|_| "canceller panicked")?
            .map_err(|e| e.to_string())?;
        expect_error(r, &SqlState::QUERY_CANCELED, "canceling statement")
            .map_err(|e| format!("{lang}: {}", e.message().unwrap_or_default()))?;
        ensure(
            took < Duration::from_secs(6),
            format!("{lang}: took {took:?}"),
        )?;
        let got = rows(
            &mut c,
            "python",
            "OutputDataSet = pd.DataFrame({'x': [2]})",
            "x int",
        )?;
        ensure(got.len() == 1, "the session works after the cancel")?;
    }
    // statement_timeout too.
    let mut c = connect("analyst");
    c.batch_execute("SET statement_timeout = '1500ms'")
        .map_err(|e| describe(&e))?;
    expect_error(
        call(
            &mut c,
            "python",
            "airlock.query('SELECT 1 AS x FROM pg_sleep(30)')",
            "x int",
        ),
        &SqlState::QUERY_CANCELED,
        "statement timeout",
    )
}

/// No other path: the sandbox still has no network and no database socket, so the
/// relay is the only way to data (the escape suite in e2e.rs proves the rest).
fn the_relay_is_the_only_way_to_data() -> TestResult {
    let port = env().cluster.port;
    let script = format!(
        "import socket, os\n\
         def attempt(f):\n    try:\n        f()\n        return 'connected'\n    except OSError as e:\n        return type(e).__name__\n\
         tcp = attempt(lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2))\n\
         unix = attempt(lambda: socket.socket(socket.AF_UNIX).connect('{}'))\n\
         OutputDataSet = pd.DataFrame({{'tcp': [tcp], 'unix': [unix], 'me': [airlock.query('SELECT current_user::text AS u').u[0]]}})",
        env().cluster.socket_file().display()
    );
    let got = rows(
        &mut connect("analyst"),
        "python",
        &script,
        "tcp text, unix text, me text",
    )?;
    let (tcp, unix, me): (String, String, String) = (got[0].get(0), got[0].get(1), got[0].get(2));
    ensure(
        tcp != "connected" && unix != "connected" && me == "analyst",
        format!("tcp {tcp}, unix {unix}, me {me}"),
    )
}

/// Loopback statements from a chunked script while the input still streams in: the
/// answers and the input frames share one socket, and neither side may block the other.
fn loopback_in_every_chunk_while_input_streams() -> TestResult {
    for (lang, script) in both(
        "n = airlock.query('SELECT count(*)::int8 AS n FROM orders WHERE id <= $1', [len(InputDataSet)]).n[0]\n\
         OutputDataSet = pd.DataFrame({'chunk': [airlock_chunk], 'rows': [len(InputDataSet)], 'n': [n]})",
        "n <- airlock_query('SELECT count(*)::int8 AS n FROM orders WHERE id <= $1', list(nrow(InputDataSet)))$n\n\
         OutputDataSet <- data.frame(chunk = airlock_chunk, rows = nrow(InputDataSet), n = n)",
    ) {
        let got = connect("analyst")
            .query(
                "SELECT * FROM airlock.execute_external_script($1, $2, \
                 'SELECT g AS id, repeat(''x'', 500) AS pad FROM generate_series(1, 100000) g', \
                 rows_per_read => 20000) AS o(chunk int, rows int, n int8)",
                &[&lang, &script],
            )
            .map_err(|e| format!("{lang}: {}", describe(&e)))?;
        let chunks: Vec<(i32, i32, i64)> = got.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
        ensure(
            chunks.len() == 5 && chunks.iter().all(|&(_, rows, n)| rows == 20000 && n == 3),
            format!("{lang}: {chunks:?}"),
        )?;
    }
    Ok(())
}

/// read_only applies to the script's statements only: the caller's transaction can
/// still write afterwards, whether the script's statements succeeded or failed.
fn read_only_does_not_leak_into_the_callers_transaction() -> TestResult {
    // analyst has the default, read_only.
    let mut c = connect("analyst");
    for script in [
        "OutputDataSet = airlock.query('SELECT 1 AS a')",
        "try:\n    airlock.execute(\"INSERT INTO journal VALUES ('x')\")\n\
         except airlock.QueryError:\n    pass\nOutputDataSet = pd.DataFrame({'a': [1]})",
    ] {
        let mut tx = c.transaction().map_err(|e| describe(&e))?;
        tx.query(
            "SELECT * FROM airlock.execute_external_script('python', $1) AS o(a int)",
            &[&script],
        )
        .map_err(|e| describe(&e))?;
        let ro: String = tx
            .query_one("SHOW transaction_read_only", &[])
            .map_err(|e| describe(&e))?
            .get(0);
        ensure(
            ro == "off",
            format!("transaction_read_only is {ro} after the call"),
        )?;
        tx.execute("INSERT INTO journal VALUES ('by the caller')", &[])
            .map_err(|e| describe(&e))?;
        tx.rollback().map_err(|e| describe(&e))?;
    }
    Ok(())
}

/// search_path is the caller's: an unqualified name resolves as in the calling session.
fn search_path_is_the_callers() -> TestResult {
    let mut c = connect("analyst");
    c.batch_execute("SET search_path = analytics, public")
        .map_err(|e| describe(&e))?;
    for (lang, script) in both(
        "OutputDataSet = airlock.query('SELECT label FROM labels')",
        "OutputDataSet <- airlock_query('SELECT label FROM labels')",
    ) {
        let got = rows(&mut c, lang, script, "label text")?;
        let label: String = got[0].get(0);
        ensure(label == "from analytics", format!("{lang}: {label}"))?;
    }
    Ok(())
}

fn main() {
    let args = Arguments::from_args();
    let daemon = Daemon::start(DaemonSettings {
        first_uid: FIRST_UID,
        count: WORKERS,
        wall_clock_seconds: 30.0,
        cpu_seconds: 30,
        memory_mib: 1024,
        pids: 64,
        queue_timeout_seconds: 60.0,
    });
    let cluster = Cluster::start(&daemon.socket, true);
    connect_setup(&cluster);
    if ENV.set(Env { daemon, cluster }).is_err() {
        unreachable!("main runs once");
    }
    macro_rules! trials {
        ($($f:ident),* $(,)?) => {
            vec![$(Trial::test(stringify!($f), $f)),*]
        };
    }
    let trials = trials![
        reads_a_table_the_caller_may_read,
        permission_denied_is_seen_in_the_script,
        row_level_security_filters_results,
        writes_join_the_callers_transaction,
        read_only_refuses_writes_clearly,
        limits_are_errors_naming_them,
        nesting_is_refused,
        cancel_during_a_slow_loopback_query,
        the_relay_is_the_only_way_to_data,
        loopback_in_every_chunk_while_input_streams,
        search_path_is_the_callers,
        read_only_does_not_leak_into_the_callers_transaction,
    ];
    // The write tests share one table: run one test at a time.
    let mut args = args;
    args.test_threads = Some(1);
    let conclusion = libtest_mimic::run(&args, trials);
    let env = env();
    airlock_e2e::stop_suite(&env.cluster, &env.daemon, conclusion.has_failed());
    conclusion.exit();
}

fn connect_setup(cluster: &Cluster) {
    let mut c = cluster.connect("postgres").0;
    c.batch_execute(
        "CREATE ROLE analyst LOGIN;
         GRANT airlock_script_executor TO analyst;
         CREATE ROLE writer LOGIN;
         GRANT airlock_script_executor TO writer;
         ALTER ROLE writer SET airlock.loopback = read_write;
         CREATE TABLE orders (id int8, amount numeric, note text);
         INSERT INTO orders VALUES (1, 10.50, 'first €'), (2, 0.000001, NULL), (3, 7, 'third');
         GRANT SELECT ON orders TO analyst;
         CREATE TABLE secret (v int);
         CREATE TABLE owned_rows (owner name, v int);
         INSERT INTO owned_rows VALUES ('analyst', 1), ('analyst', 2), ('someone_else', 3);
         ALTER TABLE owned_rows ENABLE ROW LEVEL SECURITY;
         CREATE POLICY mine ON owned_rows USING (owner = current_user);
         GRANT SELECT ON owned_rows TO analyst;
         CREATE TABLE journal (note text NOT NULL);
         GRANT SELECT, INSERT ON journal TO writer, analyst;
         CREATE TABLE public.labels AS SELECT 'from public'::text AS label;
         CREATE SCHEMA analytics;
         CREATE TABLE analytics.labels AS SELECT 'from analytics'::text AS label;
         GRANT USAGE ON SCHEMA analytics TO analyst;
         GRANT SELECT ON public.labels, analytics.labels TO analyst;
         CREATE FUNCTION write_journal() RETURNS int LANGUAGE sql AS
             $$ INSERT INTO journal VALUES ('from a function') RETURNING 1 $$;",
    )
    .expect("setting up roles and tables");
}
