//! The real R runtime (R + runtimes/r/airlock_runtime.R + the freshly built bridge),
//! driven over a socketpair as fd 3 with airlock-protocol's frames and arrow-rs batches,
//! the way the Postgres backend drives it.
//!
//! Needs R with bit64 and hms (`apt-get install r-base-core r-cran-bit64 r-cran-hms`).
//! No sandbox here: crates/airlock-sandbox/tests/sandbox.rs runs R inside one.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;

use airlock_protocol::{
    data::{ErrorPhase, FromRuntime, OutputColumn, ToRuntime},
    encode_arrow, encode_control,
    types::{PgType, TYPE_METADATA_KEY},
    FrameDecoder, FrameKind, PROTOCOL_VERSION,
};
use arrow_array::{
    builder::{Int32Builder, ListBuilder, StringBuilder},
    cast::AsArray,
    types::{Float32Type, Float64Type, Int32Type},
    Array, ArrayRef, BinaryArray, BooleanArray, Date32Array, FixedSizeBinaryArray, Float32Array,
    Float64Array, Int16Array, Int32Array, Int64Array, IntervalMonthDayNanoArray, RecordBatch,
    StringArray, Time64MicrosecondArray, TimestampMicrosecondArray,
};
use arrow_buffer::IntervalMonthDayNano;
use arrow_ipc::{reader::StreamReader, writer::StreamWriter};
use arrow_schema::{DataType, Field, Schema};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

// --- Harness --------------------------------------------------------------------------

fn bridge_so() -> PathBuf {
    if let Some(p) = std::env::var_os("AIRLOCK_R_BRIDGE") {
        return p.into();
    }
    // target/<profile>/deps/runtime-<hash> → target/<profile>/libairlock_r.so
    let exe = std::env::current_exe().expect("test executable path");
    let so = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("libairlock_r.so");
    assert!(so.exists(), "{} not built", so.display());
    so
}

fn shim() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../airlock_runtime.R")
}

/// What the runtime sent, in order.
#[derive(Debug)]
enum Msg {
    Control(FromRuntime),
    Batch(RecordBatch),
}

struct Outcome {
    msgs: Vec<Msg>,
    status: i32,
    /// What R wrote to stderr before the bridge took fd 2 over (startup failures).
    stderr: String,
    /// Sizes of the Arrow frames received (payload plus kind byte).
    arrow_frame_lens: Vec<usize>,
}

impl Outcome {
    fn batches(&self) -> Vec<&RecordBatch> {
        self.msgs
            .iter()
            .filter_map(|m| match m {
                Msg::Batch(b) => Some(b),
                Msg::Control(_) => None,
            })
            .collect()
    }

    fn printed(&self) -> String {
        self.msgs
            .iter()
            .filter_map(|m| match m {
                Msg::Control(FromRuntime::Print { text }) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn last(&self) -> &FromRuntime {
        match self.msgs.last() {
            Some(Msg::Control(c)) => c,
            other => panic!(
                "last message is not control: {other:?}; stderr: {}",
                self.stderr
            ),
        }
    }

    /// Asserts Done{rows} came last with exit status 0; returns the one output batch
    /// (all batches concatenated).
    fn ok(&self) -> RecordBatch {
        match self.last() {
            FromRuntime::Done { .. } => {}
            other => panic!("expected done, got {other:?}; stderr: {}", self.stderr),
        }
        assert_eq!(self.status, 0, "stderr: {}", self.stderr);
        let batches = self.batches();
        assert!(!batches.is_empty(), "no output batch");
        let schema = batches[0].schema();
        let owned: Vec<RecordBatch> = batches.into_iter().cloned().collect();
        arrow_select::concat::concat_batches(&schema, &owned).unwrap()
    }

    /// Asserts a ScriptError came last; returns (phase, type, message, traceback).
    fn error(&self) -> (ErrorPhase, String, String, String) {
        match self.last() {
            FromRuntime::ScriptError {
                phase,
                error_type,
                message,
                traceback,
            } => (
                *phase,
                error_type.clone(),
                message.clone(),
                traceback.clone(),
            ),
            other => panic!("expected script_error, got {other:?}"),
        }
    }
}

struct Call {
    script: String,
    has_input: bool,
    input: Vec<RecordBatch>,
    output_columns: Vec<(String, PgType)>,
    params: serde_json::Value,
    output_params: Option<Vec<String>>,
    rows_per_read: Option<u64>,
    max_print_bytes: u64,
    output_batch_rows: u64,
    max_frame_bytes: u64,
    version: u32,
}

impl Call {
    fn new(script: &str) -> Call {
        Call {
            script: script.into(),
            has_input: true,
            input: Vec::new(),
            output_columns: Vec::new(),
            params: serde_json::json!({}),
            output_params: None,
            rows_per_read: None,
            max_print_bytes: 1 << 20,
            output_batch_rows: 65536,
            max_frame_bytes: 64 << 20,
            version: PROTOCOL_VERSION,
        }
    }

    fn input(mut self, batches: Vec<RecordBatch>) -> Call {
        self.input = batches;
        self
    }

    fn outputs(mut self, cols: &[(&str, &str)]) -> Call {
        self.output_columns = cols
            .iter()
            .map(|(n, t)| (n.to_string(), t.parse().unwrap()))
            .collect();
        self
    }

    fn run(self) -> Outcome {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::Stream,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let theirs_fd = theirs.as_raw_fd();
        let mut cmd = Command::new("/usr/lib/R/bin/exec/R");
        cmd.args(["--vanilla", "--no-echo", "-f"])
            .arg(shim())
            .env_clear()
            .env("R_HOME", "/usr/lib/R")
            .env("LANG", "C.UTF-8")
            .env("LC_ALL", "C.UTF-8")
            .env("TZ", "UTC")
            .env("TMPDIR", std::env::temp_dir())
            .env("HOME", std::env::temp_dir())
            .env("AIRLOCK_R_BRIDGE", bridge_so())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: dup2 is async-signal-safe; it makes the socket fd 3 (without
        // close-on-exec) in the child between fork and exec, touching nothing else.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(theirs_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start R");
        drop(theirs);

        let mut params = serde_json::Map::new();
        if let serde_json::Value::Object(m) = &self.params {
            params = m.clone();
        }
        let start = ToRuntime::Start {
            version: self.version,
            script: self.script.clone(),
            input_name: "InputDataSet".into(),
            output_name: "OutputDataSet".into(),
            has_input: self.has_input,
            max_print_bytes: self.max_print_bytes,
            output_batch_rows: self.output_batch_rows,
            max_frame_bytes: self.max_frame_bytes,
            params,
            output_columns: self
                .output_columns
                .iter()
                .map(|(name, t)| OutputColumn {
                    name: name.clone(),
                    pg_type: *t,
                })
                .collect(),
            output_params: self.output_params.clone(),
            rows_per_read: self.rows_per_read,
        };
        let mut writer = std::fs::File::from(ours.try_clone().unwrap());
        let input = self.input.clone();
        // Input goes from its own thread: with rows_per_read the runtime answers before
        // it has read everything.
        let feeder = std::thread::spawn(move || {
            let _ = writer.write_all(&encode_control(&start).unwrap());
            for b in &input {
                let _ = writer.write_all(&encode_arrow(&ipc(b)).unwrap());
            }
            let _ = writer.write_all(&encode_control(&ToRuntime::InputEnd).unwrap());
        });
        let (msgs, arrow_frame_lens) = read_all(ours);
        feeder.join().unwrap();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let status = child.wait().unwrap().code().unwrap_or(-1);
        Outcome {
            msgs,
            status,
            stderr,
            arrow_frame_lens,
        }
    }
}

fn ipc(b: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = StreamWriter::try_new(&mut out, &b.schema()).unwrap();
    w.write(b).unwrap();
    w.finish().unwrap();
    drop(w);
    out
}

fn read_all(fd: OwnedFd) -> (Vec<Msg>, Vec<usize>) {
    let mut f = std::fs::File::from(fd);
    let mut dec = FrameDecoder::new();
    let mut msgs = Vec::new();
    let mut lens = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        while let Some(frame) = dec.next_frame().unwrap() {
            match frame.kind {
                FrameKind::Control => msgs.push(Msg::Control(frame.control().unwrap())),
                FrameKind::Arrow => {
                    lens.push(frame.payload.len() + 1);
                    let reader =
                        StreamReader::try_new(std::io::Cursor::new(frame.payload), None).unwrap();
                    for b in reader {
                        msgs.push(Msg::Batch(b.unwrap()));
                    }
                }
            }
        }
        let n = f.read(&mut buf).unwrap_or(0);
        if n == 0 {
            assert_eq!(dec.buffered(), 0, "runtime stopped mid-frame");
            return (msgs, lens);
        }
        dec.extend(&buf[..n]);
    }
}

/// A field carrying its Postgres type.
fn field(name: &str, t: &str, dt: DataType) -> Field {
    Field::new(name, dt, true)
        .with_metadata([(TYPE_METADATA_KEY.to_string(), t.to_string())].into())
}

fn batch(cols: Vec<(&str, &str, ArrayRef)>) -> RecordBatch {
    let fields: Vec<Field> = cols
        .iter()
        .map(|(n, t, a)| field(n, t, a.data_type().clone()))
        .collect();
    RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        cols.into_iter().map(|(_, _, a)| a).collect(),
    )
    .unwrap()
}

fn col<'a>(b: &'a RecordBatch, name: &str) -> &'a ArrayRef {
    b.column_by_name(name)
        .unwrap_or_else(|| panic!("no output column {name}"))
}

fn strings(a: &ArrayRef) -> Vec<Option<String>> {
    a.as_string::<i32>()
        .iter()
        .map(|s| s.map(str::to_owned))
        .collect()
}

fn one_text(script: &str, input: Vec<RecordBatch>) -> String {
    let out = Call::new(script)
        .input(input)
        .outputs(&[("s", "text")])
        .run()
        .ok();
    strings(col(&out, "s"))[0].clone().unwrap()
}

fn int4_batch(name: &str, values: Vec<Option<i32>>) -> RecordBatch {
    batch(vec![(name, "int4", Arc::new(Int32Array::from(values)))])
}

// --- Types ----------------------------------------------------------------------------

#[test]
fn every_type_round_trips_bit_for_bit() {
    let f8 = [
        f64::NAN,
        -0.0,
        5e-324,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.0 / 3.0,
    ];
    let mut f8s: Vec<Option<f64>> = f8.iter().copied().map(Some).collect();
    f8s.push(None);
    let f4s: Vec<Option<f32>> = vec![
        Some(f32::NAN),
        Some(-0.0),
        Some(1e-45),
        Some(f32::INFINITY),
        Some(3.4028235e38),
        Some(0.1),
        None,
    ];
    let ts: Vec<Option<i64>> = vec![
        Some(-1_262_303_999_876_544), // 1930-01-01 00:00:00.123456
        Some(-1),                     // 1969-12-31 23:59:59.999999
        Some(0),
        Some(4_102_444_800_000_001), // 2100-01-01 00:00:00.000001
        Some(4_294_967_295_999_999), // 2106-02-07 06:28:15.999999, the last always exact
        Some(1_700_000_000_654_321),
        None,
    ];
    let uuid = [
        0x12u8, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd,
        0xef,
    ];
    let mut ints = ListBuilder::new(Int32Builder::new());
    ints.append_value([Some(1), None, Some(3)]);
    ints.append_null();
    ints.append_value([]);
    ints.append_value([Some(i32::MAX)]);
    ints.append_value([None]);
    ints.append_value([Some(-7), Some(8)]);
    ints.append_value([Some(0)]);
    let mut texts = ListBuilder::new(StringBuilder::new());
    texts.append_value([Some("a"), None, Some("")]);
    texts.append_value([Some("😀")]);
    texts.append_null();
    texts.append_value([None::<&str>]);
    texts.append_value([Some("x"), Some("y")]);
    texts.append_value(Vec::<Option<&str>>::new());
    texts.append_value([Some("שלום")]);

    let input = batch(vec![
        (
            "b",
            "bool",
            Arc::new(BooleanArray::from(vec![
                Some(true),
                Some(false),
                None,
                Some(true),
                Some(false),
                Some(true),
                None,
            ])),
        ),
        (
            "i2",
            "int2",
            Arc::new(Int16Array::from(vec![
                Some(i16::MIN),
                Some(i16::MAX),
                None,
                Some(0),
                Some(-1),
                Some(1),
                Some(2),
            ])),
        ),
        (
            "i4",
            "int4",
            Arc::new(Int32Array::from(vec![
                Some(i32::MIN + 1),
                Some(i32::MAX),
                None,
                Some(0),
                Some(-1),
                Some(1),
                Some(2),
            ])),
        ),
        (
            "i8",
            "int8",
            Arc::new(Int64Array::from(vec![
                Some(i64::MAX),
                Some(i64::MIN + 1),
                None,
                Some(0),
                Some(-1),
                Some(9_007_199_254_740_993),
                Some(2),
            ])),
        ),
        ("f4", "float4", Arc::new(Float32Array::from(f4s.clone()))),
        ("f8", "float8", Arc::new(Float64Array::from(f8s.clone()))),
        (
            "num",
            "numeric",
            Arc::new(StringArray::from(vec![
                Some("1234567890123456789012345678901234567890.123456789"),
                Some("-0.000000000000000000000000000000000000001"),
                Some("NaN"),
                Some("Infinity"),
                Some("-Infinity"),
                Some("0"),
                None,
            ])),
        ),
        (
            "t",
            "text",
            Arc::new(StringArray::from(vec![
                Some("😀 emoji 👩‍👩‍👧"),
                Some("שלום עולם مرحبا"),
                Some(""),
                None,
                Some("line\nbreak\ttab \"quote\" \\"),
                Some("NA"),
                Some("ünïcödé"),
            ])),
        ),
        (
            "by",
            "bytea",
            Arc::new(BinaryArray::from(vec![
                Some(&b"\x00\x01\x00\xff"[..]),
                Some(&b""[..]),
                None,
                Some(&b"\x00"[..]),
                Some(&b"abc"[..]),
                Some(&[0u8; 300][..]),
                Some(&b"\xff\xfe"[..]),
            ])),
        ),
        (
            "d",
            "date",
            Arc::new(Date32Array::from(vec![
                Some(-719_162), // 0001-01-01
                Some(-1),
                Some(0),
                Some(2_932_896), // 9999-12-31
                None,
                Some(47_482), // 2100-01-01
                Some(19_000),
            ])),
        ),
        (
            "ts",
            "timestamp",
            Arc::new(TimestampMicrosecondArray::from(ts.clone())),
        ),
        (
            "tz",
            "timestamptz",
            Arc::new(TimestampMicrosecondArray::from(ts.clone()).with_timezone("UTC")),
        ),
        (
            "tm",
            "time",
            Arc::new(Time64MicrosecondArray::from(vec![
                Some(0),
                Some(86_400_000_000),
                Some(45_296_789_012),
                None,
                Some(1),
                Some(86_399_999_999),
                Some(3_600_000_000),
            ])),
        ),
        (
            "uu",
            "uuid",
            Arc::new(
                FixedSizeBinaryArray::try_from_sparse_iter_with_size(
                    vec![
                        Some(uuid),
                        None,
                        Some([0u8; 16]),
                        Some([0xffu8; 16]),
                        Some(uuid),
                        Some(uuid),
                        Some(uuid),
                    ]
                    .into_iter(),
                    16,
                )
                .unwrap(),
            ),
        ),
        (
            "j",
            "json",
            Arc::new(StringArray::from(vec![
                Some(r#"{"a": [1, 2.5, null], "b": "é"}"#),
                Some("null"),
                None,
                Some("[]"),
                Some("1e400"),
                Some(r#""str""#),
                Some("{}"),
            ])),
        ),
        (
            "jb",
            "jsonb",
            Arc::new(StringArray::from(vec![
                Some(r#"{"a": 1}"#),
                None,
                Some("true"),
                Some("[1, 2]"),
                Some("0"),
                Some(r#""x""#),
                Some("{}"),
            ])),
        ),
        ("ai", "int4[]", Arc::new(ints.finish())),
        ("at", "text[]", Arc::new(texts.finish())),
    ]);
    let decl: Vec<(String, String)> = input
        .schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.metadata()[TYPE_METADATA_KEY].clone()))
        .collect();
    let decl_refs: Vec<(&str, &str)> = decl.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let run = Call::new("OutputDataSet <- InputDataSet")
        .input(vec![input.clone()])
        .outputs(&decl_refs)
        .run();
    let out = run.ok();
    assert_eq!(out.num_rows(), 7);

    // Same Arrow type both ways: the arrays are equal, and floats equal bit for bit.
    for name in [
        "b", "i2", "i4", "i8", "num", "t", "by", "d", "ts", "tz", "tm", "j", "jb", "ai", "at",
    ] {
        assert_eq!(
            col(&out, name).as_ref(),
            col(&input, name).as_ref(),
            "column {name}"
        );
    }
    let f8_out = col(&out, "f8").as_primitive::<Float64Type>();
    for (i, want) in f8s.iter().enumerate() {
        match want {
            None => assert!(f8_out.is_null(i), "f8 row {i} should be NULL"),
            Some(w) => {
                assert!(f8_out.is_valid(i), "f8 row {i} is NULL, want {w}");
                assert_eq!(f8_out.value(i).to_bits(), w.to_bits(), "f8 row {i}");
            }
        }
    }
    let f4_out = col(&out, "f4").as_primitive::<Float32Type>();
    for (i, want) in f4s.iter().enumerate() {
        match want {
            None => assert!(f4_out.is_null(i)),
            Some(w) => assert_eq!(f4_out.value(i).to_bits(), w.to_bits(), "f4 row {i}"),
        }
    }
    // uuid comes back as its text, which Postgres' uuid input reads.
    assert_eq!(
        strings(col(&out, "uu")),
        vec![
            Some("12345678-9abc-def0-0123-456789abcdef".to_string()),
            None,
            Some("00000000-0000-0000-0000-000000000000".into()),
            Some("ffffffff-ffff-ffff-ffff-ffffffffffff".into()),
            Some("12345678-9abc-def0-0123-456789abcdef".into()),
            Some("12345678-9abc-def0-0123-456789abcdef".into()),
            Some("12345678-9abc-def0-0123-456789abcdef".into()),
        ]
    );
    assert_eq!(
        *col(&out, "tz").data_type(),
        DataType::Timestamp(arrow_schema::TimeUnit::Microsecond, Some("UTC".into()))
    );
}

#[test]
fn r_sees_the_promised_classes_and_values() {
    let input = batch(vec![
        (
            "b",
            "bool",
            Arc::new(BooleanArray::from(vec![Some(true), None])),
        ),
        (
            "i4",
            "int4",
            Arc::new(Int32Array::from(vec![Some(7), None])),
        ),
        (
            "i8",
            "int8",
            Arc::new(Int64Array::from(vec![Some(i64::MAX), None])),
        ),
        (
            "f8",
            "float8",
            Arc::new(Float64Array::from(vec![Some(f64::NAN), None])),
        ),
        (
            "by",
            "bytea",
            Arc::new(BinaryArray::from(vec![Some(&b"\x00a"[..]), None])),
        ),
        (
            "d",
            "date",
            Arc::new(Date32Array::from(vec![Some(0), None])),
        ),
        (
            "ts",
            "timestamp",
            Arc::new(TimestampMicrosecondArray::from(vec![Some(-1), None])),
        ),
        (
            "tm",
            "time",
            Arc::new(Time64MicrosecondArray::from(vec![
                Some(3_661_000_001),
                None,
            ])),
        ),
        (
            "iv",
            "interval",
            Arc::new(IntervalMonthDayNanoArray::from(vec![
                Some(IntervalMonthDayNano::new(14, 3, 14_706_000_007_000)),
                None,
            ])),
        ),
        (
            "t",
            "text",
            Arc::new(StringArray::from(vec![Some(""), None])),
        ),
    ]);
    let s = one_text(
        r#"x <- InputDataSet
OutputDataSet <- data.frame(s = paste(
  class(x$b), class(x$i4), class(x$i8), class(x$f8), class(x$by), class(x$d),
  paste(class(x$ts), collapse = "/"), attr(x$ts, "tzone"),
  paste(class(x$tm), collapse = "/"), class(x$iv), class(x$t),
  is.na(x$b[2]), is.na(x$i4[2]), is.na(x$i8[2]), as.character(x$i8[1]),
  is.nan(x$f8[1]), is.na(x$f8[1]) && !is.nan(x$f8[1]), is.nan(x$f8[2]),
  paste(as.integer(x$by[[1]]), collapse = ":"), is.null(x$by[[2]]),
  format(x$d[1]), format(x$ts[1], "%Y-%m-%d %H:%M:%OS6"), format(x$tm[1]),
  x$iv[1], is.na(x$iv[2]), nchar(x$t[1]), is.na(x$t[2]),
  sep = "|"))"#,
        vec![input],
    );
    assert_eq!(
        s,
        "logical|integer|integer64|numeric|list|Date|POSIXct/POSIXt|UTC|hms/difftime|character|character|\
         TRUE|TRUE|TRUE|9223372036854775807|\
         TRUE|FALSE|FALSE|\
         0:97|TRUE|\
         1970-01-01|1969-12-31 23:59:59.999999|01:01:01.000001|\
         P1Y2M3DT4H5M6.000007S|TRUE|0|TRUE"
    );
}

#[test]
fn int4_min_and_int8_min_are_errors_naming_the_column() {
    let run = Call::new("OutputDataSet <- InputDataSet")
        .input(vec![int4_batch("x", vec![Some(1), Some(i32::MIN)])])
        .outputs(&[("x", "int4")])
        .run();
    let (phase, _, msg, _) = run.error();
    assert_eq!(phase, ErrorPhase::Input);
    assert_eq!(run.status, 2);
    assert!(
        msg.contains("row 2 of column 1 (x)") && msg.contains("-2147483648"),
        "{msg}"
    );

    let run = Call::new("OutputDataSet <- InputDataSet")
        .input(vec![batch(vec![(
            "big",
            "int8",
            Arc::new(Int64Array::from(vec![i64::MIN])),
        )])])
        .outputs(&[("big", "int8")])
        .run();
    let (phase, _, msg, _) = run.error();
    assert_eq!(phase, ErrorPhase::Input);
    assert!(
        msg.contains("column 1 (big)") && msg.contains("NA_integer64_"),
        "{msg}"
    );
}

#[test]
fn timestamps_posixct_cannot_hold_exactly_are_errors() {
    let run = Call::new("OutputDataSet <- InputDataSet")
        .input(vec![batch(vec![(
            "ts",
            "timestamp",
            // 9999-12-31 23:59:59.999999: 2.5e17 µs, past a double's exact microseconds.
            Arc::new(TimestampMicrosecondArray::from(vec![
                253_402_300_799_999_999,
            ])),
        )])])
        .outputs(&[("ts", "timestamp")])
        .run();
    let (phase, _, msg, _) = run.error();
    assert_eq!(phase, ErrorPhase::Input);
    assert!(
        msg.contains("column 1 (ts)") && msg.contains("POSIXct"),
        "{msg}"
    );
}

#[test]
fn r_values_become_the_declared_types() {
    let out = Call::new(
        r#"OutputDataSet <- data.frame(
  i = c(1, 2, NA),
  f = c(1L, NA, 3L),
  n = c(0.1, 1e300, NA),
  fac = factor(c("b", "a", NA)),
  d = as.Date(c("2024-02-29", NA, "1900-01-01")),
  ts = as.POSIXct(c("2024-01-02 03:04:05", NA, "1960-06-01 00:00:00"), tz = "America/New_York"),
  tz = as.POSIXct(c("2024-01-02 03:04:05", NA, "1960-06-01 00:00:00"), tz = "America/New_York"),
  tm = hms::as_hms(c(1.5, NA, 86400)),
  iv = as.difftime(c(90, NA, -1), units = "mins"),
  nul = NA,
  stringsAsFactors = FALSE)
OutputDataSet$by <- list(as.raw(c(0, 1)), NULL, raw(0))
OutputDataSet$arr <- list(c(1.5, NA), NULL, numeric(0))"#,
    )
    .input(vec![int4_batch("x", vec![])])
    .outputs(&[
        ("i", "int8"),
        ("f", "float8"),
        ("n", "numeric"),
        ("fac", "text"),
        ("d", "date"),
        ("ts", "timestamp"),
        ("tz", "timestamptz"),
        ("tm", "time"),
        ("iv", "interval"),
        ("nul", "uuid"),
        ("by", "bytea"),
        ("arr", "float8[]"),
    ])
    .run()
    .ok();
    assert_eq!(
        col(&out, "i").as_ref(),
        &Int64Array::from(vec![Some(1), Some(2), None]) as &dyn Array
    );
    assert_eq!(
        col(&out, "f").as_ref(),
        &Float64Array::from(vec![Some(1.0), None, Some(3.0)]) as &dyn Array
    );
    assert_eq!(
        strings(col(&out, "n")),
        vec![
            Some("0.1".into()),
            Some(format!("1{}", "0".repeat(300))),
            None
        ]
    );
    assert_eq!(
        strings(col(&out, "fac")),
        vec![Some("b".into()), Some("a".into()), None]
    );
    assert_eq!(
        col(&out, "d").as_ref(),
        &Date32Array::from(vec![Some(19_782), None, Some(-25_567)]) as &dyn Array
    );
    // timestamp: the wall-clock time in New York; timestamptz: the instant.
    assert_eq!(
        col(&out, "ts").as_ref(),
        &TimestampMicrosecondArray::from(vec![
            Some(1_704_164_645_000_000),
            None,
            Some(-302_486_400_000_000)
        ]) as &dyn Array
    );
    assert_eq!(
        col(&out, "tz").as_ref(),
        &TimestampMicrosecondArray::from(vec![
            Some(1_704_164_645_000_000 + 5 * 3_600_000_000),
            None,
            Some(-302_486_400_000_000 + 4 * 3_600_000_000)
        ])
        .with_timezone("UTC") as &dyn Array
    );
    assert_eq!(
        col(&out, "tm").as_ref(),
        &Time64MicrosecondArray::from(vec![Some(1_500_000), None, Some(86_400_000_000)])
            as &dyn Array
    );
    assert_eq!(
        col(&out, "iv").as_ref(),
        &arrow_array::DurationMicrosecondArray::from(vec![
            Some(5_400_000_000),
            None,
            Some(-60_000_000)
        ]) as &dyn Array
    );
    assert_eq!(col(&out, "nul").null_count(), 3);
    assert_eq!(
        col(&out, "by").as_ref(),
        &BinaryArray::from(vec![Some(&b"\x00\x01"[..]), None, Some(&b""[..])]) as &dyn Array
    );
    let arr = col(&out, "arr").as_list::<i32>();
    assert!(arr.is_null(1));
    assert_eq!(arr.value(2).len(), 0);
    let first = arr.value(0);
    let first = first.as_primitive::<Float64Type>();
    assert_eq!(first.value(0), 1.5);
    assert!(first.is_null(1), "NA in an array is a NULL element");
}

#[test]
fn mismatches_and_bad_values_name_the_column() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "OutputDataSet <- data.frame(a = 1L); OutputDataSet$x <- list(1)",
            "int4",
            "column 2 (x) of OutputDataSet is a list, the column list says int4",
        ),
        (
            "OutputDataSet <- data.frame(a = 1L, x = 'no')",
            "int4",
            "column 2 (x) of OutputDataSet is character, the column list says int4",
        ),
        (
            "OutputDataSet <- data.frame(a = 1L, x = 40000L)",
            "int2",
            "value 40000 in row 1 of column 2 (x) of OutputDataSet does not fit int2",
        ),
        (
            "OutputDataSet <- data.frame(a = 1L, x = 1.5)",
            "int8",
            "value 1.5 in row 1 of column 2 (x) of OutputDataSet is not a whole number",
        ),
        (
            "OutputDataSet <- data.frame(a = 1L, x = TRUE)",
            "float8",
            "column 2 (x) of OutputDataSet is logical, the column list says float8",
        ),
    ];
    for (script, t, want) in cases {
        let run = Call::new(script)
            .input(vec![int4_batch("x", vec![])])
            .outputs(&[("a", "int4"), ("x", t)])
            .run();
        if !matches!(run.last(), FromRuntime::ScriptError { .. }) {
            panic!("{script}: {:?}", run.batches());
        }
        let (phase, kind, msg, _) = run.error();
        assert_eq!(
            (phase, kind.as_str()),
            (ErrorPhase::Output, "OutputError"),
            "{script}"
        );
        assert_eq!(msg, *want, "{script}");
        assert_eq!(run.status, 1);
    }
    let run = Call::new("OutputDataSet <- data.frame(a = 1L, b = 2L)")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("a", "int4")])
        .run();
    // The backend names both counts: it gets a batch with the frame's two columns.
    let batches = run.batches();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].num_columns(), 2);
    assert_eq!(batches[0].num_rows(), 0);
}

#[test]
fn missing_or_wrong_output_is_an_output_error() {
    let run = Call::new("x <- 1")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("a", "int4")])
        .run();
    let (phase, kind, msg, _) = run.error();
    assert_eq!(phase, ErrorPhase::Output);
    assert_eq!(kind, "OutputError");
    assert_eq!(msg, "the script did not set OutputDataSet");
    assert_eq!(run.status, 1);

    let run = Call::new("OutputDataSet <- list(a = 1)")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("a", "int4")])
        .run();
    assert_eq!(run.error().2, "OutputDataSet is a list, not a data.frame");
}

// --- Conversation ---------------------------------------------------------------------

#[test]
fn params_become_r_values() {
    let mut call = Call::new(
        r#"d <- function(x) paste0(class(x)[1], ":", paste(format(x), collapse = ","))
OutputDataSet <- data.frame(s = paste(d(alpha), d(n), d(name), d(flag), is.null(nothing),
  d(v), d(vs), d(vn), class(mixed), length(mixed), d(mixed[[2]]),
  paste(names(obj), collapse = ","), d(obj$k), d(big), sep = " "))"#,
    )
    .input(vec![int4_batch("x", vec![])])
    .outputs(&[("s", "text")]);
    call.params = serde_json::json!({
        "alpha": 0.5, "n": 10, "name": "x é", "flag": true, "nothing": null,
        "v": [1, 2, 3], "vs": ["a", null], "vn": [1, 2.5], "mixed": [1, "a"],
        "obj": {"k": [true, false]}, "big": 3000000000u64
    });
    let out = call.run().ok();
    assert_eq!(
        strings(col(&out, "s"))[0].as_deref(),
        Some(
            "numeric:0.5 integer:10 character:x é logical:TRUE TRUE integer:1,2,3 \
             character:a ,NA numeric:1.0,2.5 list 2 character:a k logical: TRUE,FALSE \
             numeric:3e+09"
        )
    );
}

#[test]
fn output_params_make_one_row_and_a_missing_one_is_named() {
    let mut call =
        Call::new("model <- as.raw(c(0, 255)); rmse <- 0.25; tags <- c('a', NA); n <- 3L")
            .input(vec![int4_batch("x", vec![Some(1)])])
            .outputs(&[
                ("model", "bytea"),
                ("rmse", "float8"),
                ("tags", "text[]"),
                ("n", "int8"),
            ]);
    call.output_params = Some(vec![
        "model".into(),
        "rmse".into(),
        "tags".into(),
        "n".into(),
    ]);
    let out = call.run().ok();
    assert_eq!(out.num_rows(), 1);
    assert_eq!(
        col(&out, "model").as_ref(),
        &BinaryArray::from(vec![&b"\x00\xff"[..]]) as &dyn Array
    );
    assert_eq!(
        col(&out, "rmse").as_primitive::<Float64Type>().value(0),
        0.25
    );
    let tags = col(&out, "tags").as_list::<i32>().value(0);
    assert_eq!(
        tags.as_string::<i32>().iter().collect::<Vec<_>>(),
        vec![Some("a"), None]
    );
    assert_eq!(
        col(&out, "n")
            .as_primitive::<arrow_array::types::Int64Type>()
            .value(0),
        3
    );

    let mut call = Call::new("rmse <- 1")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("rmse", "float8"), ("model", "bytea")]);
    call.output_params = Some(vec!["rmse".into(), "model".into()]);
    let run = call.run();
    let (phase, _, msg, _) = run.error();
    assert_eq!(phase, ErrorPhase::Output);
    assert!(msg.contains("did not set model"), "{msg}");
}

#[test]
fn rows_per_read_runs_once_per_chunk_in_one_scope() {
    let input = vec![
        int4_batch("x", (1..=3).map(Some).collect()),
        int4_batch("x", (4..=7).map(Some).collect()),
        int4_batch("x", (8..=10).map(Some).collect()),
    ];
    let mut call = Call::new(
        r#"seen <- if (exists("seen")) seen + nrow(InputDataSet) else nrow(InputDataSet)
stopifnot(!exists("OutputDataSet"))
OutputDataSet <- data.frame(chunk = airlock_chunk, n = nrow(InputDataSet),
  first = InputDataSet$x[1], seen = seen)"#,
    )
    .input(input)
    .outputs(&[
        ("chunk", "int4"),
        ("n", "int4"),
        ("first", "int4"),
        ("seen", "int4"),
    ]);
    call.rows_per_read = Some(4);
    let run = call.run();
    assert_eq!(run.batches().len(), 3, "one batch per chunk");
    let out = run.ok();
    let get = |n: &str| col(&out, n).as_primitive::<Int32Type>().values().to_vec();
    assert_eq!(get("chunk"), vec![1, 2, 3]);
    assert_eq!(get("n"), vec![4, 4, 2]);
    assert_eq!(get("first"), vec![1, 5, 9]);
    assert_eq!(get("seen"), vec![4, 8, 10]);
    assert!(matches!(run.last(), FromRuntime::Done { rows: 3 }));

    // No rows: one run on an empty frame.
    let mut call =
        Call::new("OutputDataSet <- data.frame(n = nrow(InputDataSet), c = airlock_chunk)")
            .input(vec![int4_batch("x", vec![])])
            .outputs(&[("n", "int4"), ("c", "int4")]);
    call.rows_per_read = Some(4);
    let out = call.run().ok();
    assert_eq!(out.num_rows(), 1);
    assert_eq!(col(&out, "n").as_primitive::<Int32Type>().value(0), 0);
}

#[test]
fn an_r_error_reports_its_class_message_and_the_scripts_call_stack() {
    let run = Call::new(
        "f <- function(x) g(x)\ng <- function(x) {\n  y <- 1\n  stop('boom: ', x)\n}\nf('é')\n",
    )
    .input(vec![int4_batch("x", vec![])])
    .outputs(&[("a", "int4")])
    .run();
    let (phase, kind, msg, tb) = run.error();
    assert_eq!(phase, ErrorPhase::Script);
    assert_eq!(kind, "simpleError");
    assert_eq!(msg, "boom: é");
    assert_eq!(
        tb,
        "3: stop(\"boom: \", x) at line 4\n2: g(x) at line 1\n1: f(\"é\") at line 6"
    );
    assert_eq!(run.status, 1);
    assert!(!tb.contains("airlock_eval") && !tb.contains("withCallingHandlers"));

    // A builtin's error, and a condition class of the script's own.
    let run = Call::new("x <- log('a')")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("a", "int4")])
        .run();
    let (_, kind, msg, tb) = run.error();
    assert_eq!(kind, "simpleError");
    assert_eq!(msg, "non-numeric argument to mathematical function");
    assert_eq!(tb, "1: log(\"a\")");
    let run = Call::new("stop(structure(class = c('myError', 'error', 'condition'), list(message = 'mine', call = NULL)))")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("a", "int4")])
        .run();
    let (_, kind, msg, _) = run.error();
    assert_eq!((kind.as_str(), msg.as_str()), ("myError", "mine"));

    // A syntax error.
    let run = Call::new("x <- (")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("a", "int4")])
        .run();
    let (phase, _, msg, _) = run.error();
    assert_eq!(phase, ErrorPhase::Script);
    assert!(msg.contains("unexpected end of input"), "{msg}");
}

#[test]
fn printed_output_is_forwarded_and_truncated() {
    let run = Call::new(
        r#"print(1:3)
cat("no newline")
message("to stderr")
warning("careful")
x <- log(-1)
system2 <- NULL
OutputDataSet <- data.frame(a = 1L)"#,
    )
    .input(vec![int4_batch("x", vec![])])
    .outputs(&[("a", "int4")])
    .run();
    run.ok();
    assert_eq!(
        run.printed(),
        "[1] 1 2 3\nno newlineto stderr\nWarning message:\ncareful\n\
         Warning message:\nIn log(-1) : NaNs produced\n"
    );
    // Prints come before the outcome.
    assert!(matches!(
        run.msgs.last(),
        Some(Msg::Control(FromRuntime::Done { rows: 1 }))
    ));

    let mut call = Call::new(
        "for (i in 1:100) cat(strrep('x', 9), '\\n'); OutputDataSet <- data.frame(a = 1L)",
    )
    .input(vec![int4_batch("x", vec![])])
    .outputs(&[("a", "int4")]);
    call.max_print_bytes = 55;
    let run = call.run();
    run.ok();
    let printed = run.printed();
    assert!(
        printed.ends_with("[airlock: output truncated: 1045 more bytes not shown]\n"),
        "{printed:?}"
    );
    assert!(
        printed.starts_with("xxxxxxxxx \nxxxxxxxxx \n"),
        "{printed:?}"
    );
}

#[test]
fn zero_rows_keep_their_columns_and_no_input_is_an_empty_frame() {
    let input = batch(vec![
        ("a", "int8", Arc::new(Int64Array::from(Vec::<i64>::new()))),
        (
            "b",
            "text",
            Arc::new(StringArray::from(Vec::<String>::new())),
        ),
        (
            "c",
            "timestamptz",
            Arc::new(TimestampMicrosecondArray::from(Vec::<i64>::new()).with_timezone("UTC")),
        ),
    ]);
    let s = one_text(
        "OutputDataSet <- data.frame(s = paste(nrow(InputDataSet), paste(names(InputDataSet), collapse = ','), paste(sapply(InputDataSet, function(x) class(x)[1]), collapse = ',')))",
        vec![input.clone()],
    );
    assert_eq!(s, "0 a,b,c integer64,character,POSIXct");
    // And back: zero rows still make one (empty) batch with the declared types.
    let run = Call::new("OutputDataSet <- InputDataSet")
        .input(vec![input])
        .outputs(&[("a", "int8"), ("b", "text"), ("c", "timestamptz")])
        .run();
    let out = run.ok();
    assert_eq!(run.batches().len(), 1);
    assert_eq!(out.num_rows(), 0);
    assert_eq!(*out.column(0).data_type(), DataType::Int64);

    let mut call = Call::new("OutputDataSet <- data.frame(s = paste(nrow(InputDataSet), ncol(InputDataSet), is.data.frame(InputDataSet)))")
        .outputs(&[("s", "text")]);
    call.has_input = false;
    let out = call.run().ok();
    assert_eq!(strings(col(&out, "s"))[0].as_deref(), Some("0 0 TRUE"));
}

#[test]
fn a_thousand_columns_round_trip() {
    let cols: Vec<(String, ArrayRef)> = (0..1000)
        .map(|i| {
            (
                format!("c{i}"),
                Arc::new(Int32Array::from(vec![Some(i), None, Some(-i)])) as ArrayRef,
            )
        })
        .collect();
    let input = batch(
        cols.iter()
            .map(|(n, a)| (n.as_str(), "int4", a.clone()))
            .collect(),
    );
    let decl: Vec<(&str, &str)> = cols.iter().map(|(n, _)| (n.as_str(), "int4")).collect();
    let out = Call::new("OutputDataSet <- InputDataSet")
        .input(vec![input.clone()])
        .outputs(&decl)
        .run()
        .ok();
    assert_eq!(out.num_columns(), 1000);
    for i in 0..1000 {
        assert_eq!(out.column(i).as_ref(), input.column(i).as_ref());
    }
}

#[test]
fn output_is_split_by_rows_and_frame_size() {
    let mut call = Call::new("OutputDataSet <- data.frame(s = strrep('y', 1:5000 %% 50))")
        .input(vec![int4_batch("x", vec![])])
        .outputs(&[("s", "text")]);
    call.output_batch_rows = 1000;
    call.max_frame_bytes = 8192;
    let run = call.run();
    let out = run.ok();
    assert_eq!(out.num_rows(), 5000);
    assert!(
        run.batches().len() > 5,
        "split into {}",
        run.batches().len()
    );
    assert!(run.batches().iter().all(|b| b.num_rows() <= 1000));
    assert!(
        run.arrow_frame_lens.iter().all(|&l| l <= 8192),
        "{:?}",
        run.arrow_frame_lens
    );
    assert_eq!(
        strings(col(&out, "s"))[4998].as_deref(),
        Some(&*"y".repeat(49))
    );
    assert_eq!(strings(col(&out, "s"))[4999].as_deref(), Some(""));
}

#[test]
fn a_protocol_version_mismatch_is_refused() {
    let mut call = Call::new("OutputDataSet <- data.frame(a = 1L)").outputs(&[("a", "int4")]);
    call.version = PROTOCOL_VERSION + 1;
    let run = call.run();
    let (phase, kind, msg, _) = run.error();
    assert_eq!((phase, kind.as_str()), (ErrorPhase::Input, "ProtocolError"));
    assert!(msg.contains("unsupported protocol version"), "{msg}");
    assert_eq!(run.status, 2);
}
