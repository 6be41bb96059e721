//! The data contract, end to end (docs/TYPES.md): every type both ways in Python and R,
//! parameters and output parameters, chunked input, and the edge cases, through the real
//! SQL entry point, a real cluster, the real `airlockd` and real sandboxes.

use std::sync::OnceLock;

use airlock_e2e::{describe, Cluster, Daemon, DaemonSettings};
use libtest_mimic::{Arguments, Failed, Trial};
use postgres::{error::SqlState, types::ToSql, Client, Row};

const FIRST_UID: u32 = 62100;
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

fn analyst() -> Client {
    env().cluster.connect("analyst").0
}

fn db_error(r: Result<Vec<Row>, postgres::Error>) -> Result<postgres::error::DbError, Failed> {
    match r {
        Ok(rows) => Err(format!("expected an error, got {} rows", rows.len()).into()),
        Err(e) => e
            .as_db_error()
            .cloned()
            .ok_or_else(|| format!("expected a server error, got {e}").into()),
    }
}

fn expect_error(
    r: Result<Vec<Row>, postgres::Error>,
    code: &SqlState,
    needles: &[&str],
) -> TestResult {
    let db = db_error(r)?;
    let text = format!("{} | {}", db.message(), db.detail().unwrap_or_default());
    ensure(
        db.code() == code,
        format!(
            "expected SQLSTATE {}, got {}: {text}",
            code.code(),
            db.code().code()
        ),
    )?;
    for n in needles {
        ensure(text.contains(n), format!("expected {n:?} in {text:?}"))?;
    }
    Ok(())
}

/// One call of execute_external_script with every argument.
struct Call<'a> {
    lang: &'a str,
    script: &'a str,
    input: Option<&'a str>,
    columns: &'a str,
    params: Option<serde_json::Value>,
    rows_per_read: Option<i64>,
}

impl<'a> Call<'a> {
    fn new(lang: &'a str, script: &'a str, columns: &'a str) -> Call<'a> {
        Call {
            lang,
            script,
            input: None,
            columns,
            params: None,
            rows_per_read: None,
        }
    }

    fn input(mut self, q: &'a str) -> Self {
        self.input = Some(q);
        self
    }

    fn params(mut self, p: serde_json::Value) -> Self {
        self.params = Some(p);
        self
    }

    fn rows_per_read(mut self, n: i64) -> Self {
        self.rows_per_read = Some(n);
        self
    }

    fn sql(&self) -> String {
        format!(
            "SELECT * FROM airlock.execute_external_script($1, $2, $3, params => $4, \
             rows_per_read => $5) AS o({})",
            self.columns
        )
    }

    fn run(&self, c: &mut Client) -> Result<Vec<Row>, postgres::Error> {
        let params: [&(dyn ToSql + Sync); 5] = [
            &self.lang,
            &self.script,
            &self.input,
            &self.params,
            &self.rows_per_read,
        ];
        c.query(self.sql().as_str(), &params)
    }

    fn rows(&self, c: &mut Client) -> Result<Vec<Row>, Failed> {
        self.run(c).map_err(|e| describe(&e).into())
    }
}

/// The round-trip table: every type of docs/TYPES.md, NULL in each, and the extremes.
const TYPES_TABLE: &str = r#"
CREATE TABLE every_type AS SELECT * FROM (VALUES
 (1, true, 1::int2, 1::int4, 1::int8, 1.5::float4, 1.5::float8, 1.5::numeric, 'abc'::text,
  'v'::varchar(5), 'c'::char(3), '\x00ff00'::bytea, '2024-01-02'::date,
  '2024-01-02 03:04:05.123456'::timestamp, '2024-01-02 03:04:05.123456+02'::timestamptz,
  '03:04:05.000001'::time, '1 year 2 mons 3 days 04:05:06.000007'::interval,
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '{"a": [1, 2.50], "a": "dup"}'::json,
  '{"b": 1, "ü": "☃"}'::jsonb, ARRAY[1, NULL, 3]::int8[], ARRAY['x', NULL, '']::text[],
  ARRAY[1.5, 'NaN']::numeric[], ARRAY['NaN', '-0', 'Infinity']::float8[],
  ARRAY['1999-12-31 23:59:59.999999']::timestamp[]),
 (2, false, '-32768'::int2, '-2147483647'::int4, '-9223372036854775807'::int8, 'NaN'::float4,
  '-0'::float8, '-12345678901234567890.12345678901234567890'::numeric, '', '', '', ''::bytea,
  '1066-10-14'::date, '1900-01-01 00:00:00.000001'::timestamp,
  '2200-01-01 00:00:00.999999+00'::timestamptz, '23:59:59.999999'::time,
  '-1 mons -2 days -00:00:00.000001'::interval, '00000000-0000-0000-0000-000000000000'::uuid,
  'null'::json, '[]'::jsonb, '{}'::int8[], '{}'::text[], '{}'::numeric[], '{}'::float8[],
  '{}'::timestamp[]),
 (3, NULL, 32767::int2, 2147483647::int4, 9223372036854775807::int8, 'Infinity'::float4,
  '4.9e-324'::float8, 'NaN'::numeric, E'emoji 😀 rtl שלום\nnew line\ttab', 'ü', 'ü',
  '\x'::bytea || '\x00'::bytea, '2262-04-12'::date, '1969-12-31 23:59:59.999999'::timestamp,
  '1969-07-20 20:17:40+00'::timestamptz, '00:00:00'::time, '0'::interval,
  'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid, '"x"'::json, '{"n": 1e400}'::jsonb,
  ARRAY[NULL]::int8[], ARRAY[NULL]::text[], ARRAY[NULL]::numeric[], ARRAY[NULL]::float8[],
  ARRAY[NULL]::timestamp[]),
 (4, NULL, NULL, NULL, NULL, '-Infinity'::float4, '2.2250738585072014e-308'::float8,
  '0.0000000000000000000000000000000000000001'::numeric, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (5, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)
) AS v(id, b, i2, i4, i8, f4, f8, n, tx, vc, ch, by, d, ts, tz, tm, iv, u, js, jb, ai8, atx,
       anum, af8, ats);
GRANT SELECT ON every_type TO analyst;
"#;

/// The column definition list matching every_type.
const TYPES_COLUMNS: &str = "id int4, b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, \
    n numeric, tx text, vc varchar(5), ch char(3), by bytea, d date, ts timestamp, \
    tz timestamptz, tm time, iv interval, u uuid, js json, jb jsonb, ai8 int8[], atx text[], \
    anum numeric[], af8 float8[], ats timestamp[]";

const TYPES_NAMES: &[&str] = &[
    "b", "i2", "i4", "i8", "f4", "f8", "n", "tx", "vc", "ch", "by", "d", "ts", "tz", "tm", "iv",
    "u", "js", "jb", "ai8", "atx", "anum", "af8", "ats",
];

/// Runs `script` over every_type and compares the output with the table, value by value,
/// by text (Postgres prints floats exactly, -0 and NaN included, numeric with its scale,
/// json as written). Returns the differences.
fn round_trip_differences(c: &mut Client, lang: &str, script: &str) -> Result<Vec<String>, Failed> {
    let checks: Vec<String> = TYPES_NAMES
        .iter()
        .map(|n| {
            format!(
                "CASE WHEN t.{n}::text IS DISTINCT FROM o.{n}::text THEN \
                 '{n}: ' || coalesce(t.{n}::text, 'NULL') || ' became ' || coalesce(o.{n}::text, 'NULL') END"
            )
        })
        .collect();
    let sql = format!(
        "WITH o AS (SELECT * FROM airlock.execute_external_script($1, $2, \
         'SELECT * FROM every_type ORDER BY id') AS o({TYPES_COLUMNS})) \
         SELECT coalesce(t.id, o.id) AS id, array_remove(ARRAY[{}], NULL)::text[] AS diffs \
         FROM every_type t FULL JOIN o ON t.id = o.id ORDER BY 1",
        checks.join(", ")
    );
    let rows = c
        .query(sql.as_str(), &[&lang, &script])
        .map_err(|e| describe(&e))?;
    ensure(
        rows.len() == 5,
        format!("expected 5 rows, got {}", rows.len()),
    )?;
    let mut diffs = Vec::new();
    for r in rows {
        let id: i32 = r.get(0);
        for d in r.get::<_, Vec<String>>(1) {
            diffs.push(format!("row {id}: {d}"));
        }
    }
    Ok(diffs)
}

fn every_type_round_trips_python() -> TestResult {
    let diffs = round_trip_differences(&mut analyst(), "python", "OutputDataSet = InputDataSet")?;
    ensure(diffs.is_empty(), format!("{diffs:#?}"))
}

fn every_type_round_trips_r() -> TestResult {
    let diffs = round_trip_differences(&mut analyst(), "r", "OutputDataSet <- InputDataSet")?;
    ensure(diffs.is_empty(), format!("{diffs:#?}"))
}

/// What a Python script sees, per docs/TYPES.md.
fn python_sees_the_documented_types() -> TestResult {
    let script = r#"
import datetime, decimal, uuid
d = InputDataSet
want = {"id": "int32", "b": "boolean", "i2": "Int16", "i4": "Int32", "i8": "Int64",
        "f4": "Float32", "f8": "Float64", "ts": "datetime64[us]", "tz": "datetime64[us, UTC]"}
got = {c: str(d[c].dtype) for c in want}
assert got == want, got
for c in ["n", "by", "d", "tm", "iv", "u", "ai8", "anum"]:
    assert d[c].dtype == object, (c, d[c].dtype)
for c in ["tx", "js", "jb"]:
    assert str(d[c].dtype) == "string", (c, d[c].dtype)
r = d.iloc[0]
assert r.n == decimal.Decimal("1.5") and isinstance(r.n, decimal.Decimal)
assert d.n[2].is_nan() and d.n[1] == decimal.Decimal("-12345678901234567890.12345678901234567890")
assert r.by == b"\x00\xff\x00" and d.by[1] == b"" and d.by[4] is None
assert r.d == datetime.date(2024, 1, 2)
assert r.tm == datetime.time(3, 4, 5, 1)
assert r.iv == pd.DateOffset(months=14, days=3, microseconds=14706000007), r.iv
assert r.u == uuid.UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
assert r.js == '{"a": [1, 2.50], "a": "dup"}' and r.jb == '{"b": 1, "ü": "☃"}'
assert r.ai8 == [1, None, 3] and r.atx == ["x", None, ""]
assert r.anum[0] == decimal.Decimal("1.5") and r.anum[1].is_nan()
assert r.ts == pd.Timestamp("2024-01-02 03:04:05.123456")
assert r.tz == pd.Timestamp("2024-01-02 01:04:05.123456", tz="UTC")
assert d.tx[2] == "emoji 😀 rtl שלום\nnew line\ttab" and d.tx[1] == "" and d.tx[4] is pd.NA
assert d.f8[1] == 0 and str(float(d.f8[1])) == "-0.0"
assert pd.isna(d.i8[4]) and d.i8[2] == 9223372036854775807
assert np.isnan(d.f4[1]) and d.f4.isna().tolist() == [False, False, False, False, True]
OutputDataSet = pd.DataFrame({"ok": [True]})
"#;
    let rows = Call::new("python", script, "ok bool")
        .input("SELECT * FROM every_type ORDER BY id")
        .rows(&mut analyst())?;
    ensure(
        rows.len() == 1 && rows[0].get::<_, bool>(0),
        "the script's checks passed",
    )
}

/// Python values of the kinds docs/TYPES.md lists come back as the declared types.
fn python_values_become_declared_types() -> TestResult {
    let script = r#"
import datetime, decimal, uuid
OutputDataSet = pd.DataFrame({
    "n": [decimal.Decimal("1.10"), 2, 0.1, None, decimal.Decimal("-Infinity")],
    "j": [{"a": [1, None]}, [1, 2], "\"s\"", None, 3],
    "u": [uuid.UUID(int=1), "00000000-0000-0000-0000-000000000002", None, None, None],
    "d": pd.to_datetime(["2024-01-02", None, "1900-03-01", "2100-12-31", "1970-01-01"]),
    "tz": pd.to_datetime(["2024-01-02 03:04:05.123456789"] * 5).tz_localize("Europe/Paris"),
    "ts": pd.to_datetime(["2024-01-02 03:04:05.1234565"] * 5),
    "iv": [pd.Timedelta(hours=25), pd.DateOffset(months=1, days=2), None, pd.Timedelta(0), None],
    "a": [[1, None], None, [], np.array([4, 5]), [6]],
    # An object column keeps None apart from NaN (a float64 one would not).
    "f": pd.Series([np.nan, -0.0, None, 1e-320, float("inf")], dtype=object),
    "i": pd.array([1, None, 3, 4, 5], dtype="Int64"),
})
"#;
    let mut c = analyst();
    let got: Vec<Row> = c
        .query(
            "SELECT n::text, j::text, u::text, d::text, tz AT TIME ZONE 'UTC', ts::text, iv::text, \
             a::text, f::text, i FROM airlock.execute_external_script('python', $1) AS o(n numeric, \
             j jsonb, u uuid, d date, tz timestamptz, ts timestamp, iv interval, a int4[], f float8, i int8)",
            &[&script],
        )
        .map_err(|e| describe(&e))?;
    ensure(got.len() == 5, "five rows")?;
    let row = |i: usize| -> Vec<Option<String>> {
        (0..10)
            .map(|c| {
                if c == 4 {
                    got[i]
                        .get::<_, Option<std::time::SystemTime>>(c)
                        .map(|_| "ts".to_string())
                } else if c == 9 {
                    got[i].get::<_, Option<i64>>(c).map(|v| v.to_string())
                } else {
                    got[i].get::<_, Option<String>>(c)
                }
            })
            .collect()
    };
    let s = |v: &str| Some(v.to_string());
    let r0 = row(0);
    ensure(
        r0[0] == s("1.10")
            && r0[1] == s(r#"{"a": [1, null]}"#)
            && r0[2] == s("00000000-0000-0000-0000-000000000001")
            && r0[3] == s("2024-01-02")
            && r0[5] == s("2024-01-02 03:04:05.123457")
            && r0[6] == s("25:00:00")
            && r0[7] == s("{1,NULL}")
            && r0[8] == s("NaN")
            && r0[9] == s("1"),
        format!("row 1: {r0:?}"),
    )?;
    let r1 = row(1);
    ensure(
        r1[0] == s("2")
            && r1[1] == s("[1, 2]")
            && r1[2] == s("00000000-0000-0000-0000-000000000002")
            && r1[3].is_none()
            && r1[6] == s("1 mon 2 days")
            && r1[7].is_none()
            && r1[8] == s("-0")
            && r1[9].is_none(),
        format!("row 2: {r1:?}"),
    )?;
    let r2 = row(2);
    ensure(
        r2[0] == s("0.1") && r2[1] == s(r#""s""#) && r2[7] == s("{}") && r2[8].is_none(),
        format!("row 3: {r2:?}"),
    )?;
    let r3 = row(3);
    ensure(
        r3[0].is_none() && r3[1].is_none() && r3[7] == s("{4,5}") && r3[8] == s("1e-320"),
        format!("row 4: {r3:?}"),
    )?;
    let r4 = row(4);
    ensure(
        r4[0] == s("-Infinity") && r4[1] == s("3") && r4[8] == s("Infinity"),
        format!("row 5: {r4:?}"),
    )?;
    // The instant survives: 03:04:05.123456789 in Paris is 02:04:05.123457 UTC.
    let utc: String = c
        .query_one(
            "SELECT (tz AT TIME ZONE 'UTC')::text FROM airlock.execute_external_script('python', $1) \
             AS o(n numeric, j jsonb, u uuid, d date, tz timestamptz, ts timestamp, iv interval, \
             a int4[], f float8, i int8) LIMIT 1",
            &[&script],
        )
        .map_err(|e| describe(&e))?
        .get(0);
    ensure(utc == "2024-01-02 02:04:05.123457", format!("tz: {utc}"))
}

/// Values a script cannot hold losslessly are refused with the column named.
fn unrepresentable_values_are_errors() -> TestResult {
    let mut c = analyst();
    for (query, needles) in [
        (
            "SELECT 1 AS id, 'infinity'::timestamp AS valid_to",
            &["column 2 (\"valid_to\"", "infinity"][..],
        ),
        (
            "SELECT '-infinity'::date AS d",
            &["column 1 (\"d\"", "-infinity"][..],
        ),
        (
            "SELECT ARRAY[[1, 2], [3, 4]] AS m",
            &["column 1 (\"m\"", "2 dimensions"][..],
        ),
        (
            "SELECT '[0:1]={1,2}'::int4[] AS z",
            &["column 1 (\"z\"", "starts at index 0"][..],
        ),
    ] {
        expect_error(
            Call::new("python", "OutputDataSet = InputDataSet", "x int")
                .input(query)
                .run(&mut c),
            &SqlState::DATETIME_FIELD_OVERFLOW,
            needles,
        )?;
    }
    // Python's datetime.time has no 24:00:00; the runtime says which column.
    expect_error(
        Call::new("python", "OutputDataSet = InputDataSet", "t time")
            .input("SELECT '24:00'::time AS t")
            .run(&mut c),
        &SqlState::EXTERNAL_ROUTINE_EXCEPTION,
        &["column 1 ('t', time)"],
    )
}

fn params_become_variables() -> TestResult {
    let py = r#"
OutputDataSet = pd.DataFrame({
    "alpha": [alpha], "n": [n], "name": [name], "flag": [flag],
    "kinds": [",".join(type(v).__name__ for v in (alpha, n, name, flag, xs, obj, nothing))],
    "xs": [xs], "k": [obj["k"]]})
"#;
    let r = r#"
OutputDataSet <- data.frame(alpha = alpha, n = n, name = name, flag = flag,
    kinds = paste(class(alpha), class(n), class(name), class(flag), class(xs), class(obj),
                  if (is.null(nothing)) "NULL" else "?", sep = ","),
    k = obj$k)
OutputDataSet$xs <- list(xs)
OutputDataSet <- OutputDataSet[c("alpha", "n", "name", "flag", "kinds", "xs", "k")]
"#;
    let params = serde_json::json!({"alpha": 0.5, "n": 10, "name": "x ü", "flag": true,
        "xs": [1, 2], "obj": {"k": "v"}, "nothing": null});
    for (lang, script, kinds) in [
        ("python", py, "float,int,str,bool,list,dict,NoneType"),
        (
            "r",
            r,
            "numeric,integer,character,logical,integer,list,NULL",
        ),
    ] {
        let rows = Call::new(
            lang,
            script,
            "alpha float8, n int8, name text, flag bool, kinds text, xs int8[], k text",
        )
        .params(params.clone())
        .rows(&mut analyst())
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
        let r = &rows[0];
        ensure(
            r.get::<_, f64>(0) == 0.5
                && r.get::<_, i64>(1) == 10
                && r.get::<_, String>(2) == "x ü"
                && r.get::<_, bool>(3)
                && r.get::<_, String>(4) == kinds
                && r.get::<_, Vec<i64>>(5) == vec![1, 2]
                && r.get::<_, String>(6) == "v",
            format!("{lang}: {r:?} kinds {}", r.get::<_, String>(4)),
        )?;
    }
    Ok(())
}

fn bad_params_are_refused() -> TestResult {
    let mut c = analyst();
    for (params, needle) in [
        (
            serde_json::json!([1, 2]),
            "params must be a JSON object, got an array",
        ),
        (
            serde_json::json!({"1x": 1}),
            "params member \"1x\" is not a valid variable name",
        ),
        (
            serde_json::json!({"a-b": 1}),
            "\"a-b\" is not a valid variable name",
        ),
        (
            serde_json::json!({"InputDataSet": 1}),
            "params member \"InputDataSet\" would replace a variable airlock sets",
        ),
    ] {
        expect_error(
            Call::new(
                "python",
                "OutputDataSet = pd.DataFrame({'a': [1]})",
                "a int",
            )
            .params(params)
            .run(&mut c),
            &SqlState::INVALID_PARAMETER_VALUE,
            &[needle],
        )?;
    }
    expect_error(
        Call::new("python", "OutputDataSet = InputDataSet", "a int")
            .rows_per_read(0)
            .run(&mut c),
        &SqlState::INVALID_PARAMETER_VALUE,
        &["rows_per_read must be at least 1, got 0"],
    )
}

fn output_params(
    c: &mut Client,
    lang: &str,
    script: &str,
    names: &[&str],
    columns: &str,
) -> Result<Vec<Row>, postgres::Error> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    c.query(
        format!(
            "SELECT * FROM airlock.execute_external_script_outputs($1, $2, \
             'SELECT x, y FROM generate_series(1, 100) AS x, LATERAL (SELECT 2.0 * x + 1 AS y) AS l', \
             output_params => $3) AS o({columns})"
        )
        .as_str(),
        &[&lang, &script, &names],
    )
}

/// Train in the script, store the model's bytes: SQL Server's @params … OUTPUT.
fn output_params_return_one_row() -> TestResult {
    let py = r#"
import pickle
d = InputDataSet
slope, intercept = np.polyfit(d.x.astype(float), d.y.astype(float), 1)
model = pickle.dumps({"slope": slope, "intercept": intercept})
rmse = float(np.sqrt(np.mean((d.y.astype(float) - (slope * d.x + intercept)) ** 2)))
coefs = [slope, intercept]
"#;
    let r = r#"
fit <- lm(y ~ x, data = data.frame(x = as.numeric(InputDataSet$x), y = as.numeric(InputDataSet$y)))
model <- serialize(fit, NULL)
rmse <- sqrt(mean(residuals(fit)^2))
coefs <- unname(coef(fit))[c(2, 1)]
"#;
    let mut c = analyst();
    for (lang, script) in [("python", py), ("r", r)] {
        let rows = output_params(
            &mut c,
            lang,
            script,
            &["model", "rmse", "coefs"],
            "model bytea, rmse float8, coefs float8[]",
        )
        .map_err(|e| format!("{lang}: {}", describe(&e)))?;
        ensure(rows.len() == 1, format!("{lang}: one row"))?;
        let model: Vec<u8> = rows[0].get(0);
        let rmse: f64 = rows[0].get(1);
        let coefs: Vec<f64> = rows[0].get(2);
        ensure(
            model.len() > 20
                && rmse < 1e-9
                && (coefs[0] - 2.0).abs() < 1e-9
                && (coefs[1] - 1.0).abs() < 1e-9,
            format!(
                "{lang}: {} bytes, rmse {rmse}, coefs {coefs:?}",
                model.len()
            ),
        )?;
        // The model is stored and read back in a later call.
        c.execute(
            "CREATE TEMP TABLE IF NOT EXISTS models (lang text, m bytea)",
            &[],
        )
        .map_err(|e| describe(&e))?;
        c.execute("INSERT INTO models VALUES ($1, $2)", &[&lang, &model])
            .map_err(|e| describe(&e))?;
    }
    // The stored model goes back into a later call through its input query.
    let rows = c
        .query(
            "SELECT * FROM airlock.execute_external_script('python', \
             'import pickle\nm = pickle.loads(InputDataSet.m[0])\nOutputDataSet = pd.DataFrame({\"s\": [m[\"slope\"]]})', \
             'SELECT m FROM models WHERE lang = ''python''') AS o(s float8)",
            &[],
        )
        .map_err(|e| describe(&e))?;
    let slope: f64 = rows[0].get(0);
    ensure((slope - 2.0).abs() < 1e-9, format!("slope {slope}"))
}

fn output_params_errors_name_the_problem() -> TestResult {
    let mut c = analyst();
    for lang in ["python", "r"] {
        let set_a = if lang == "python" { "a = 1" } else { "a <- 1" };
        expect_error(
            output_params(&mut c, lang, set_a, &["a", "missing_one"], "a int, m int"),
            &SqlState::EXTERNAL_ROUTINE_EXCEPTION,
            &["missing_one"],
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
    }
    expect_error(
        output_params(&mut c, "python", "a = 1", &["a"], "a int, b int"),
        &SqlState::INVALID_PARAMETER_VALUE,
        &["output_params names 1 variable, the column definition list declares 2 columns"],
    )?;
    expect_error(
        output_params(&mut c, "python", "a = 1", &[], "a int"),
        &SqlState::INVALID_PARAMETER_VALUE,
        &["output_params must name at least one script variable"],
    )
}

/// rows_per_read feeds the script in chunks; its output streams back while input is
/// still being sent.
fn rows_per_read_runs_the_script_per_chunk() -> TestResult {
    let py = r#"
total = globals().get("total", 0) + len(InputDataSet)
OutputDataSet = pd.DataFrame({"chunk": [airlock_chunk], "rows": [len(InputDataSet)], "total": [total]})
"#;
    let r = r#"
total <- (if (exists("total")) total else 0L) + nrow(InputDataSet)
OutputDataSet <- data.frame(chunk = airlock_chunk, rows = nrow(InputDataSet), total = total)
"#;
    let mut c = analyst();
    for (lang, script) in [("python", py), ("r", r)] {
        let rows = Call::new(lang, script, "chunk int, rows int, total int")
            .input("SELECT g AS id FROM generate_series(1, 10) g")
            .rows_per_read(3)
            .rows(&mut c)
            .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
        let got: Vec<(i32, i32, i32)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        ensure(
            got == vec![(1, 3, 3), (2, 3, 6), (3, 3, 9), (4, 1, 10)],
            format!("{lang}: {got:?}"),
        )?;
        // No rows: one run, on an empty frame with the right columns.
        let rows = Call::new(lang, script, "chunk int, rows int, total int")
            .input("SELECT g AS id FROM generate_series(1, 0) g")
            .rows_per_read(3)
            .rows(&mut c)?;
        ensure(
            rows.len() == 1 && rows[0].get::<_, i32>(1) == 0,
            format!("{lang}: one run on no rows"),
        )?;
    }
    // Big chunks both ways at once: a runtime that writes while the backend writes must
    // not deadlock.
    let rows = Call::new(
        "python",
        "OutputDataSet = InputDataSet.assign(s=InputDataSet.s + '!')",
        "id int8, s text",
    )
    .input("SELECT g::int8 AS id, repeat('x', 200) AS s FROM generate_series(1, 200000) g")
    .rows_per_read(50000)
    .rows(&mut c)?;
    ensure(
        rows.len() == 200000 && rows[199999].get::<_, i64>(0) == 200000,
        format!("{} rows", rows.len()),
    )
}

fn zero_rows_keep_columns_and_types() -> TestResult {
    let py = r#"
d = InputDataSet
assert list(d.columns) == ["i", "f", "n", "t", "ts", "a"], list(d.columns)
assert [str(t) for t in d.dtypes] == ["int32", "float64", "object", "string", "datetime64[us]", "object"], d.dtypes
OutputDataSet = d
"#;
    let r = r#"
d <- InputDataSet
stopifnot(identical(names(d), c("i", "f", "n", "t", "ts", "a")), nrow(d) == 0,
          is.integer(d$i), is.double(d$f), is.character(d$n), is.character(d$t),
          inherits(d$ts, "POSIXct"), is.list(d$a))
OutputDataSet <- d
"#;
    for (lang, script) in [("python", py), ("r", r)] {
        let rows = Call::new(
            lang,
            script,
            "i int4, f float8, n numeric, t text, ts timestamp, a int8[]",
        )
        .input(
            "SELECT 1::int4 AS i, 1.5::float8 AS f, 1::numeric AS n, 'x' AS t, \
                 now()::timestamp AS ts, ARRAY[1::int8] AS a WHERE false",
        )
        .rows(&mut analyst())
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
        ensure(rows.is_empty(), format!("{lang}: no rows"))?;
    }
    Ok(())
}

fn a_thousand_columns_round_trip() -> TestResult {
    let cols: Vec<String> = (1..=1000).map(|i| format!("g + {i} AS c{i}")).collect();
    let query = format!("SELECT {} FROM generate_series(1, 10) g", cols.join(", "));
    let decl: Vec<String> = (1..=1000).map(|i| format!("c{i} int4")).collect();
    let decl = decl.join(", ");
    for (lang, script) in [
        ("python", "OutputDataSet = InputDataSet"),
        ("r", "OutputDataSet <- InputDataSet"),
    ] {
        let rows = Call::new(lang, script, &decl)
            .input(&query)
            .rows(&mut analyst())
            .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
        ensure(
            rows.len() == 10 && rows[9].get::<_, i32>(999) == 1010 && rows[0].get::<_, i32>(0) == 2,
            format!("{lang}: 1000 columns"),
        )?;
    }
    Ok(())
}

fn a_hundred_megabyte_value_round_trips() -> TestResult {
    let mut c = analyst();
    for (lang, script) in [
        ("python", "OutputDataSet = InputDataSet"),
        ("r", "OutputDataSet <- InputDataSet"),
    ] {
        let rows = c
            .query(
                "SELECT length(o.s), md5(o.s) = md5(repeat('ab€', 35000000)) FROM \
                 airlock.execute_external_script($1, $2, \
                 'SELECT repeat(''ab€'', 35000000) AS s') AS o(s text)",
                &[&lang, &script],
            )
            .map_err(|e| format!("{lang}: {}", describe(&e)))?;
        ensure(
            rows[0].get::<_, i32>(0) == 105_000_000 && rows[0].get::<_, bool>(1),
            format!("{lang}: the 100 MB value came back whole"),
        )?;
    }
    Ok(())
}

/// Rows that arrive once an input batch is full (about 32 MB) are sent in the next
/// batches, in order and whole, arrays included.
fn rows_past_a_full_batch_arrive_in_order() -> TestResult {
    let script = r#"
d = InputDataSet
OutputDataSet = pd.DataFrame({
    "n": [len(d)],
    "chars": [int(d.s.str.len().sum())],
    "ordered": [bool((d.g.diff().dropna() == 1).all())],
    "first_chars": ["".join(v[0] for v in d.s)],
    "elems": [int(sum(sum(a) for a in d.a))],
})
"#;
    let rows = Call::new(
        "python",
        script,
        "n int8, chars int8, ordered bool, first_chars text, elems int8",
    )
    .input(
        "SELECT g, repeat(chr(65 + g % 26), 1000000 + g) AS s, ARRAY[g, -g, 1]::int8[] AS a \
         FROM generate_series(1, 150) g",
    )
    .rows(&mut analyst())?;
    let want: String = (1..=150u8).map(|g| (b'A' + g % 26) as char).collect();
    let r = &rows[0];
    ensure(
        r.get::<_, i64>(0) == 150
            && r.get::<_, i64>(1) == 150 * 1_000_000 + 150 * 151 / 2
            && r.get::<_, bool>(2)
            && r.get::<_, String>(3) == want
            && r.get::<_, i64>(4) == 150,
        format!("{r:?}"),
    )
}

/// Output columns converted whole (integers, floats, text) and value by value (dates
/// from text, here) report the first bad value in row order, as one loop would.
fn output_errors_come_in_row_order() -> TestResult {
    let mut c = analyst();
    let cols = "i int2, d date, t text";
    // Row 2's date is bad, row 3's int2 is out of range: row 2 is reported.
    expect_error(
        Call::new(
            "python",
            "OutputDataSet = pd.DataFrame({'i': [1, 2, 70000], 'd': ['2024-01-01', 'nope', '2024-01-03'], 't': ['a', 'b', 'c']})",
            cols,
        )
        .run(&mut c),
        &SqlState::INVALID_DATETIME_FORMAT,
        &["nope", "row 2", "column 2 (\"d\", date)"],
    )?;
    // Row 2's int2 is out of range, row 3's date is bad: row 2 is reported.
    expect_error(
        Call::new(
            "python",
            "OutputDataSet = pd.DataFrame({'i': [1, 70000, 3], 'd': ['2024-01-01', '2024-01-02', 'nope'], 't': ['a', 'b', 'c']})",
            cols,
        )
        .run(&mut c),
        &SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        &["70000", "row 2", "column 1 (\"i\")"],
    )?;
    // A NUL in row 3's text after a bad date in row 4: row 3.
    expect_error(
        Call::new(
            "python",
            "OutputDataSet = pd.DataFrame({'i': [1, 2, 3, 4], 'd': ['2024-01-01'] * 3 + ['nope'], 't': ['a', None, 'c\\x00d', 'e']})",
            cols,
        )
        .run(&mut c),
        &SqlState::CHARACTER_NOT_IN_REPERTOIRE,
        &["row 3", "column 3 (\"t\")", "NUL"],
    )?;
    // Rows are formed in chunks: a bad value far into a batch is still named by its row.
    expect_error(
        Call::new(
            "python",
            "i = np.zeros(100000, dtype='int64'); i[69999] = 70000\n\
             OutputDataSet = pd.DataFrame({'i': i, 'd': ['2024-01-01'] * 100000, 't': ['x'] * 100000})",
            cols,
        )
        .run(&mut c),
        &SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
        &["70000", "row 70000", "column 1 (\"i\")"],
    )?;
    // The same columns with good values: NULLs and values in place.
    let rows = Call::new(
        "python",
        "OutputDataSet = pd.DataFrame({'i': pd.array([1, None, -32768], dtype='Int64'), 'd': ['2024-01-01', None, '2024-01-03'], 't': ['a', None, '']})",
        cols,
    )
    .rows(&mut c)?;
    let got: Vec<(Option<i16>, Option<String>)> =
        rows.iter().map(|r| (r.get(0), r.get(2))).collect();
    ensure(
        got == vec![
            (Some(1), Some("a".into())),
            (None, None),
            (Some(-32768), Some(String::new())),
        ],
        format!("{got:?}"),
    )
}

/// Values stored compressed or out of line (TOAST) arrive whole, in both directions.
fn toasted_values_round_trip() -> TestResult {
    let mut c = analyst();
    for (lang, script) in [
        ("python", "OutputDataSet = InputDataSet"),
        ("r", "OutputDataSet <- InputDataSet"),
    ] {
        let rows = c
            .query(
                "SELECT bool_and(md5(o.t) = md5(s.t) AND md5(o.b) = md5(s.b)), count(*) \
                 FROM airlock.execute_external_script($1, $2, 'SELECT id, t, b FROM toasty ORDER BY id') \
                 AS o(id int4, t text, b bytea) JOIN toasty s USING (id)",
                &[&lang, &script],
            )
            .map_err(|e| format!("{lang}: {}", describe(&e)))?;
        ensure(
            rows[0].get::<_, Option<bool>>(0) == Some(true) && rows[0].get::<_, i64>(1) == 2,
            format!("{lang}: toasted values changed"),
        )?;
    }
    Ok(())
}

fn column_count_mismatch_names_both_counts() -> TestResult {
    for (lang, script) in [
        (
            "python",
            "OutputDataSet = pd.DataFrame({'a': [1], 'b': [2]})",
        ),
        ("r", "OutputDataSet <- data.frame(a = 1L, b = 2L)"),
    ] {
        expect_error(
            Call::new(lang, script, "a int").run(&mut analyst()),
            &SqlState::DATATYPE_MISMATCH,
            &["has 2 columns, the column definition list declares 1"],
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
        expect_error(
            Call::new(lang, script, "a int, b int, c int").run(&mut analyst()),
            &SqlState::DATATYPE_MISMATCH,
            &["has 2 columns, the column definition list declares 3"],
        )
        .map_err(|e| format!("{lang}: {}", e.message().unwrap_or("failed")))?;
    }
    Ok(())
}

/// What an R script sees, per docs/TYPES.md.
fn r_sees_the_documented_types() -> TestResult {
    let script = r#"
d <- InputDataSet
stopifnot(is.integer(d$id), is.logical(d$b), is.integer(d$i2), is.integer(d$i4),
          inherits(d$i8, "integer64"), is.double(d$f4), is.double(d$f8),
          is.character(d$n), is.character(d$tx), is.list(d$by), inherits(d$d, "Date"),
          inherits(d$ts, "POSIXct"), inherits(d$tz, "POSIXct"), inherits(d$tm, "difftime"),
          is.character(d$iv), is.character(d$u), is.character(d$js), is.list(d$ai8))
stopifnot(identical(d$n[2], "-12345678901234567890.12345678901234567890"))
stopifnot(identical(as.character(d$i8[3]), "9223372036854775807"), is.na(d$i8[5]))
stopifnot(is.nan(d$f4[2]), !is.na(d$f4[2]) || is.nan(d$f4[2]), is.na(d$f4[5]), !is.nan(d$f4[5]))
stopifnot(identical(1 / d$f8[2], -Inf))
stopifnot(identical(d$by[[1]], as.raw(c(0, 255, 0))), is.null(d$by[[5]]))
stopifnot(identical(d$d[1], as.Date("2024-01-02")))
stopifnot(identical(format(d$ts[1], "%Y-%m-%d %H:%M:%OS6", tz = "UTC"), "2024-01-02 03:04:05.123456"))
stopifnot(identical(d$tx[3], "emoji \U1F600 rtl \u05e9\u05dc\u05d5\u05dd\nnew line\ttab"))
stopifnot(identical(d$tx[2], ""), is.na(d$tx[5]))
stopifnot(identical(d$u[1], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"))
stopifnot(identical(d$ai8[[1]][c(1, 3)], bit64::as.integer64(c(1, 3))), is.na(d$ai8[[1]][2]))
OutputDataSet <- data.frame(ok = TRUE)
"#;
    let rows = Call::new("r", script, "ok bool")
        .input("SELECT * FROM every_type ORDER BY id")
        .rows(&mut analyst())?;
    ensure(
        rows.len() == 1 && rows[0].get::<_, bool>(0),
        "the script's checks passed",
    )
}

/// R's NA sentinels are the smallest int4 and int8: those values are refused, named.
fn r_refuses_values_it_would_turn_into_na() -> TestResult {
    let mut c = analyst();
    for (query, column) in [
        ("SELECT 1 AS ok, '-2147483648'::int4 AS small", "small"),
        ("SELECT '-9223372036854775808'::int8 AS tiny", "tiny"),
    ] {
        let db = db_error(
            Call::new("r", "OutputDataSet <- InputDataSet", "x int8")
                .input(query)
                .run(&mut c),
        )?;
        let text = format!("{} {}", db.message(), db.detail().unwrap_or_default());
        ensure(
            text.contains(column) && text.contains("NA"),
            format!("expected {column} and NA in {text:?}"),
        )?;
    }
    Ok(())
}

/// An R error is an ERROR with the condition's message and the call stack in DETAIL;
/// what the script prints, messages and warnings become NOTICEs.
fn r_errors_and_prints() -> TestResult {
    let (mut c, notices) = env().cluster.connect("analyst");
    let script = "print(1:3)\nmessage('to stderr')\nfit_model <- function(x) stop('singular matrix in ', x)\nfit_model('lm')";
    let db = db_error(Call::new("r", script, "x int").run(&mut c))?;
    ensure(
        db.code() == &SqlState::EXTERNAL_ROUTINE_EXCEPTION
            && db.message().contains("singular matrix in lm")
            && db
                .detail()
                .unwrap_or_default()
                .contains("fit_model(\"lm\")"),
        format!("{} | {:?}", db.message(), db.detail()),
    )?;
    let seen = notices.lock().unwrap_or_else(|e| e.into_inner()).clone();
    ensure(
        seen.iter().any(|n| n.contains("[1] 1 2 3"))
            && seen.iter().any(|n| n.contains("to stderr")),
        format!("notices: {seen:?}"),
    )
}

/// The R runtime runs in the same sandbox: a worker uid, no network, no host files.
fn r_runs_in_the_sandbox() -> TestResult {
    let port = env().cluster.port;
    let script = format!(
        r#"
status <- readLines("/proc/self/status")
uid <- as.integer(strsplit(sub("^Uid:\\s+", "", grep("^Uid:", status, value = TRUE)), "\\s+")[[1]][1])
shadow <- tryCatch({{ readLines("/etc/shadow"); "read" }}, error = function(e) "refused", warning = function(w) "refused")
usr <- tryCatch({{ writeLines("x", "/usr/airlock-was-here"); "written" }}, error = function(e) "refused", warning = function(w) "refused")
net <- tryCatch({{ con <- socketConnection("127.0.0.1", {port}, timeout = 2); close(con); "connected" }},
                error = function(e) "refused", warning = function(w) "refused")
OutputDataSet <- data.frame(uid = uid, shadow = shadow, usr = usr, net = net)
"#
    );
    let rows =
        Call::new("r", &script, "uid int, shadow text, usr text, net text").rows(&mut analyst())?;
    let r = &rows[0];
    let uid: i32 = r.get(0);
    let got: Vec<String> = (1..4).map(|i| r.get(i)).collect();
    ensure(
        (FIRST_UID..FIRST_UID + WORKERS).contains(&(uid as u32)),
        format!("uid {uid}"),
    )?;
    ensure(got == ["refused", "refused", "refused"], format!("{got:?}"))
}

fn main() {
    let args = Arguments::from_args();
    let daemon = Daemon::start(DaemonSettings {
        first_uid: FIRST_UID,
        count: WORKERS,
        wall_clock_seconds: 60.0,
        cpu_seconds: 60,
        // Room for a 100 MB value held several times over by pandas or R.
        memory_mib: 2048,
        pids: 64,
        queue_timeout_seconds: 120.0,
    });
    let cluster = Cluster::start(&daemon.socket, true);
    {
        let mut c = cluster.connect("postgres").0;
        c.batch_execute("CREATE ROLE analyst LOGIN; GRANT airlock_script_executor TO analyst;")
            .expect("creating the analyst role");
        c.batch_execute(TYPES_TABLE).expect("creating every_type");
        // Row 1 compresses (stored compressed); row 2 does not (stored out of line).
        c.batch_execute(
            "CREATE TABLE toasty (id int4, t text, b bytea);
             INSERT INTO toasty SELECT 1, repeat('xyz', 200000), convert_to(repeat('ab', 100000), 'UTF8');
             INSERT INTO toasty SELECT 2, string_agg(md5(g::text), ''), decode(string_agg(md5(g::text), ''), 'hex')
                 FROM generate_series(1, 20000) g;
             GRANT SELECT ON toasty TO analyst;",
        )
        .expect("creating toasty");
    }
    if ENV.set(Env { daemon, cluster }).is_err() {
        unreachable!("main runs once");
    }
    macro_rules! trials {
        ($($f:ident),* $(,)?) => {
            vec![$(Trial::test(stringify!($f), $f)),*]
        };
    }
    let trials = trials![
        every_type_round_trips_python,
        every_type_round_trips_r,
        python_sees_the_documented_types,
        python_values_become_declared_types,
        unrepresentable_values_are_errors,
        params_become_variables,
        bad_params_are_refused,
        output_params_return_one_row,
        output_params_errors_name_the_problem,
        rows_per_read_runs_the_script_per_chunk,
        zero_rows_keep_columns_and_types,
        a_thousand_columns_round_trip,
        a_hundred_megabyte_value_round_trips,
        rows_past_a_full_batch_arrive_in_order,
        output_errors_come_in_row_order,
        column_count_mismatch_names_both_counts,
        toasted_values_round_trip,
        r_sees_the_documented_types,
        r_refuses_values_it_would_turn_into_na,
        r_errors_and_prints,
        r_runs_in_the_sandbox,
    ];
    let conclusion = libtest_mimic::run(&args, trials);
    let env = env();
    airlock_e2e::stop_suite(&env.cluster, &env.daemon, conclusion.has_failed());
    conclusion.exit();
}
