//! Input: Arrow frames from the backend → R data.frames, by the Postgres type each field
//! carries in its metadata (docs/TYPES.md, R column).

use std::borrow::Cow;
use std::io::Cursor;

use airlock_protocol::{
    data::ToRuntime,
    types::{PgType, Scalar, TYPE_METADATA_KEY},
    FrameKind,
};
use arrow_array::{
    cast::AsArray,
    types::{
        Date32Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
        IntervalMonthDayNanoType, Time64MicrosecondType, TimestampMicrosecondType,
    },
    Array, ArrayRef, RecordBatch,
};
use arrow_ipc::reader::StreamReader;
use arrow_schema::{DataType, IntervalUnit, SchemaRef, TimeUnit};
use extendr_api::prelude::*;

use crate::channel::Channel;
use crate::error::BridgeError;
use crate::rapi::{self, SEXPTYPE};

/// Where a value sits, for messages: `row 3 of column 2 (x)`.
#[derive(Clone, Copy)]
pub struct Col<'a> {
    pub index: usize,
    pub name: &'a str,
}

impl std::fmt::Display for Col<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "column {} ({})", self.index + 1, self.name)
    }
}

/// The Arrow type the backend sends for a scalar Postgres type.
pub fn wire_type_ok(s: Scalar, dt: &DataType) -> bool {
    match s {
        Scalar::Bool => *dt == DataType::Boolean,
        Scalar::Int2 => *dt == DataType::Int16,
        Scalar::Int4 => *dt == DataType::Int32,
        Scalar::Int8 => *dt == DataType::Int64,
        Scalar::Float4 => *dt == DataType::Float32,
        Scalar::Float8 => *dt == DataType::Float64,
        Scalar::Numeric | Scalar::Text | Scalar::Json | Scalar::Jsonb => *dt == DataType::Utf8,
        Scalar::Bytea => *dt == DataType::Binary,
        Scalar::Date => *dt == DataType::Date32,
        Scalar::Timestamp => *dt == DataType::Timestamp(TimeUnit::Microsecond, None),
        Scalar::Timestamptz => {
            matches!(dt, DataType::Timestamp(TimeUnit::Microsecond, Some(_)))
        }
        Scalar::Time => *dt == DataType::Time64(TimeUnit::Microsecond),
        Scalar::Interval => *dt == DataType::Interval(IntervalUnit::MonthDayNano),
        Scalar::Uuid => *dt == DataType::FixedSizeBinary(16),
    }
}

/// The input side of the conversation: the batches read so far and not yet given to R.
pub struct Input {
    has_input: bool,
    schema: Option<SchemaRef>,
    types: Vec<PgType>,
    pending: Vec<RecordBatch>,
    pending_rows: usize,
    ended: bool,
    /// Chunks handed to R so far.
    chunks: usize,
    /// Input rows handed to R so far (for row numbers in messages).
    rows_done: usize,
}

impl Input {
    pub fn new(has_input: bool) -> Input {
        Input {
            has_input,
            schema: None,
            types: Vec::new(),
            pending: Vec::new(),
            pending_rows: 0,
            ended: false,
            chunks: 0,
            rows_done: 0,
        }
    }

    /// The next data.frame for the script: at most `chunk` rows (all rows when `None`).
    /// The first call always returns a frame (empty with the input's columns when there
    /// are no rows); later calls return `None` once the input is used up.
    pub fn next_frame(
        &mut self,
        chan: &Channel,
        chunk: Option<usize>,
    ) -> Result<Option<Robj>, BridgeError> {
        let want = chunk.unwrap_or(usize::MAX);
        while !self.ended && self.pending_rows < want {
            self.read_one(chan)?;
        }
        if self.pending_rows == 0 && self.chunks > 0 {
            return Ok(None);
        }
        self.chunks += 1;
        if !self.has_input {
            return rapi::data_frame(&[], Vec::new(), 0).map(Some);
        }
        let Some(schema) = self.schema.clone() else {
            return Err(BridgeError::Protocol(
                "has_input is true, but no input batch (not even an empty one) arrived".into(),
            ));
        };
        let all = arrow_select::concat::concat_batches(&schema, &self.pending)?;
        let n = all.num_rows().min(want);
        let batch = all.slice(0, n);
        let rest = all.slice(n, all.num_rows() - n);
        self.pending_rows = rest.num_rows();
        self.pending = if rest.num_rows() > 0 {
            vec![rest]
        } else {
            Vec::new()
        };
        let df = batch_to_frame(&batch, &self.types, self.rows_done)?;
        self.rows_done += n;
        Ok(Some(df))
    }

    fn read_one(&mut self, chan: &Channel) -> Result<(), BridgeError> {
        let Some(frame) = chan.recv()? else {
            return Err(BridgeError::Protocol(
                "the backend closed the connection before input_end".into(),
            ));
        };
        if frame.kind == FrameKind::Control {
            return match frame.control::<ToRuntime>()? {
                ToRuntime::InputEnd => {
                    self.ended = true;
                    Ok(())
                }
                other => Err(BridgeError::Protocol(format!(
                    "expected input rows or input_end, got {other:?}"
                ))),
            };
        }
        if !self.has_input {
            return Err(BridgeError::Protocol(
                "received input rows, but start said has_input is false".into(),
            ));
        }
        let reader = StreamReader::try_new(Cursor::new(frame.payload), None)
            .map_err(|e| BridgeError::Protocol(format!("malformed Arrow frame: {e}")))?;
        let schema = reader.schema();
        match &self.schema {
            None => {
                self.types = column_types(&schema)?;
                self.schema = Some(schema.clone());
            }
            Some(first) => {
                let same = first.fields().len() == schema.fields().len()
                    && first
                        .fields()
                        .iter()
                        .zip(schema.fields())
                        .all(|(a, b)| a.name() == b.name() && a.data_type() == b.data_type());
                if !same {
                    return Err(BridgeError::Protocol(format!(
                        "input batches disagree on the schema: first {first}, then {schema}"
                    )));
                }
            }
        }
        for batch in reader {
            let batch =
                batch.map_err(|e| BridgeError::Protocol(format!("malformed Arrow frame: {e}")))?;
            // Field metadata may differ between frames; the first schema's is kept.
            let batch = RecordBatch::try_new(
                self.schema.clone().ok_or(BridgeError::State("no schema"))?,
                batch.columns().to_vec(),
            )?;
            self.pending_rows += batch.num_rows();
            self.pending.push(batch);
        }
        Ok(())
    }
}

/// Each field's Postgres type, from its metadata, checked against its Arrow type.
fn column_types(schema: &SchemaRef) -> Result<Vec<PgType>, BridgeError> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let col = Col {
                index: i,
                name: f.name(),
            };
            let Some(name) = f.metadata().get(TYPE_METADATA_KEY) else {
                return Err(BridgeError::Protocol(format!(
                    "input {col} has no {TYPE_METADATA_KEY} metadata"
                )));
            };
            let t: PgType = name
                .parse()
                .map_err(|e| BridgeError::Protocol(format!("input {col}: {e}")))?;
            let ok = if t.array {
                match f.data_type() {
                    DataType::List(child) => wire_type_ok(t.scalar, child.data_type()),
                    _ => false,
                }
            } else {
                wire_type_ok(t.scalar, f.data_type())
            };
            if !ok {
                return Err(BridgeError::Protocol(format!(
                    "input {col} is declared {t} but arrives as Arrow {}",
                    f.data_type()
                )));
            }
            Ok(t)
        })
        .collect()
}

/// A loopback query's result (its batches, possibly none but with a schema) as a
/// data.frame, with the same conversions as the input.
pub fn result_to_frame(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Robj, BridgeError> {
    let types = column_types(schema)?;
    let all = arrow_select::concat::concat_batches(schema, batches)?;
    batch_to_frame(&all, &types, 0)
}

/// One record batch as a data.frame.
fn batch_to_frame(
    batch: &RecordBatch,
    types: &[PgType],
    row_base: usize,
) -> Result<Robj, BridgeError> {
    let schema = batch.schema();
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let mut columns = Vec::with_capacity(types.len());
    for (i, (array, t)) in batch.columns().iter().zip(types).enumerate() {
        let col = Col {
            index: i,
            name: names[i],
        };
        columns.push(column_to_r(array, *t, col, row_base)?);
    }
    rapi::data_frame(&names, columns, batch.num_rows())
}

/// One column: a vector, or for arrays a list of vectors (NULL for a NULL array).
pub fn column_to_r(
    array: &ArrayRef,
    t: PgType,
    col: Col<'_>,
    row_base: usize,
) -> Result<Robj, BridgeError> {
    if !t.array {
        return scalar_to_r(array.as_ref(), t.scalar, col, row_base);
    }
    let list = array
        .as_list_opt::<i32>()
        .ok_or_else(|| BridgeError::Protocol(format!("input {col} is not an Arrow list")))?;
    let mut out = rapi::alloc(SEXPTYPE::VECSXP, list.len())?;
    for i in 0..list.len() {
        if list.is_null(i) {
            continue; // Lists start as NULLs.
        }
        let values = list.value(i);
        let v = scalar_to_r(values.as_ref(), t.scalar, col, row_base + i)?;
        // SAFETY: v is a live protected Robj; the list references it from now on.
        rapi::set_list_elt(&mut out, i, unsafe { v.get() });
    }
    Ok(out)
}

fn not_representable(col: Col<'_>, row: usize, what: String, hint: &str) -> BridgeError {
    BridgeError::Input(format!(
        "{what} in row {} of {col} cannot be represented in R: {hint}",
        row + 1
    ))
}

fn scalar_to_r(
    a: &dyn Array,
    s: Scalar,
    col: Col<'_>,
    row_base: usize,
) -> Result<Robj, BridgeError> {
    if !wire_type_ok(s, a.data_type()) {
        return Err(BridgeError::Protocol(format!(
            "input {col} has Arrow type {} where {} was expected",
            a.data_type(),
            s.name()
        )));
    }
    let n = a.len();
    let robj = match s {
        Scalar::Bool => {
            let b = a.as_boolean();
            let mut out = rapi::alloc(SEXPTYPE::LGLSXP, n)?;
            let dst =
                rapi::logical_slice_mut(&mut out).ok_or(BridgeError::State("logical vector"))?;
            for (i, d) in dst.iter_mut().enumerate() {
                *d = if b.is_null(i) {
                    rapi::NA_INTEGER
                } else {
                    i32::from(b.value(i))
                };
            }
            out
        }
        Scalar::Int2 => {
            let v = a.as_primitive::<Int16Type>();
            let mut out = rapi::alloc(SEXPTYPE::INTSXP, n)?;
            let dst = out
                .as_integer_slice_mut()
                .ok_or(BridgeError::State("integer vector"))?;
            for (i, d) in dst.iter_mut().enumerate() {
                *d = if v.is_null(i) {
                    rapi::NA_INTEGER
                } else {
                    i32::from(v.value(i))
                };
            }
            out
        }
        Scalar::Int4 => {
            let v = a.as_primitive::<Int32Type>();
            let mut out = rapi::alloc(SEXPTYPE::INTSXP, n)?;
            let dst = out
                .as_integer_slice_mut()
                .ok_or(BridgeError::State("integer vector"))?;
            for (i, d) in dst.iter_mut().enumerate() {
                *d = if v.is_null(i) {
                    rapi::NA_INTEGER
                } else if v.value(i) == rapi::NA_INTEGER {
                    return Err(not_representable(
                        col,
                        row_base + i,
                        format!("value {}", v.value(i)),
                        "it is R's NA_integer_; cast the column to int8 or float8 in the query",
                    ));
                } else {
                    v.value(i)
                };
            }
            out
        }
        Scalar::Int8 => {
            let v = a.as_primitive::<Int64Type>();
            let mut out = rapi::alloc(SEXPTYPE::REALSXP, n)?;
            let dst = out
                .as_real_slice_mut()
                .ok_or(BridgeError::State("double vector"))?;
            for (i, d) in dst.iter_mut().enumerate() {
                let bits = if v.is_null(i) {
                    rapi::NA_INTEGER64
                } else if v.value(i) == rapi::NA_INTEGER64 {
                    return Err(not_representable(
                        col,
                        row_base + i,
                        format!("value {}", v.value(i)),
                        "it is bit64's NA_integer64_; cast the column to numeric in the query",
                    ));
                } else {
                    v.value(i)
                };
                // integer64 keeps the 64 bits in a double's storage.
                *d = f64::from_bits(bits as u64);
            }
            rapi::set_class(&mut out, &["integer64"])?;
            out
        }
        Scalar::Float4 => {
            let v = a.as_primitive::<Float32Type>();
            doubles(n, |i| (!v.is_null(i)).then(|| f64::from(v.value(i))))?
        }
        Scalar::Float8 => {
            let v = a.as_primitive::<Float64Type>();
            doubles(n, |i| {
                (!v.is_null(i)).then(|| {
                    let x = v.value(i);
                    // A NaN whose payload happens to be R's NA pattern is still NaN.
                    if rapi::is_na_real(x) {
                        f64::NAN
                    } else {
                        x
                    }
                })
            })?
        }
        Scalar::Numeric | Scalar::Text | Scalar::Json | Scalar::Jsonb => {
            let v = a.as_string::<i32>();
            rapi::strings(
                n,
                (0..n).map(|i| (!v.is_null(i)).then(|| Cow::Borrowed(v.value(i)))),
            )
            .map_err(|e| BridgeError::Input(format!("{col}: {e}")))?
        }
        Scalar::Bytea => {
            let v = a.as_binary::<i32>();
            let mut out = rapi::alloc(SEXPTYPE::VECSXP, n)?;
            for i in 0..n {
                if v.is_null(i) {
                    continue;
                }
                let bytes = v.value(i);
                let mut raw = rapi::alloc(SEXPTYPE::RAWSXP, bytes.len())?;
                raw.as_raw_slice_mut()
                    .ok_or(BridgeError::State("raw vector"))?
                    .copy_from_slice(bytes);
                // SAFETY: raw is a live protected Robj; the list references it from now on.
                rapi::set_list_elt(&mut out, i, unsafe { raw.get() });
            }
            out
        }
        Scalar::Date => {
            let v = a.as_primitive::<Date32Type>();
            let mut out = doubles(n, |i| (!v.is_null(i)).then(|| f64::from(v.value(i))))?;
            rapi::set_class(&mut out, &["Date"])?;
            out
        }
        Scalar::Timestamp | Scalar::Timestamptz => {
            let v = a.as_primitive::<TimestampMicrosecondType>();
            let mut err = None;
            let mut out = doubles(n, |i| {
                if v.is_null(i) {
                    return None;
                }
                let us = v.value(i);
                let secs = micros_to_secs(us);
                if secs_to_micros(secs) != Some(us) && err.is_none() {
                    err = Some(not_representable(
                        col,
                        row_base + i,
                        format!("timestamp {us} µs since 1970"),
                        "POSIXct (a double of seconds) cannot hold it to the microsecond; \
                         cast the column to text in the query",
                    ));
                }
                Some(secs)
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            rapi::set_class(&mut out, &["POSIXct", "POSIXt"])?;
            rapi::set_attr(&mut out, "tzone", rapi::string("UTC")?)?;
            out
        }
        Scalar::Time => {
            let v = a.as_primitive::<Time64MicrosecondType>();
            let mut out = doubles(n, |i| (!v.is_null(i)).then(|| micros_to_secs(v.value(i))))?;
            rapi::set_class(&mut out, &["hms", "difftime"])?;
            rapi::set_attr(&mut out, "units", rapi::string("secs")?)?;
            out
        }
        Scalar::Interval => {
            let v = a.as_primitive::<IntervalMonthDayNanoType>();
            let mut texts = Vec::with_capacity(n);
            for i in 0..n {
                if v.is_null(i) {
                    texts.push(None);
                    continue;
                }
                let iv = v.value(i);
                if iv.nanoseconds % 1000 != 0 {
                    return Err(BridgeError::Protocol(format!(
                        "input {col} row {}: an interval with sub-microsecond nanoseconds",
                        row_base + i + 1
                    )));
                }
                texts.push(Some(Cow::Owned(iso_interval(
                    iv.months,
                    iv.days,
                    iv.nanoseconds / 1000,
                ))));
            }
            rapi::strings(n, texts)?
        }
        Scalar::Uuid => {
            let v = a.as_fixed_size_binary();
            rapi::strings(
                n,
                (0..n).map(|i| (!v.is_null(i)).then(|| Cow::Owned(uuid_text(v.value(i))))),
            )?
        }
    };
    Ok(robj)
}

/// A double vector from `f(i)`, `None` as NA.
fn doubles(n: usize, mut f: impl FnMut(usize) -> Option<f64>) -> Result<Robj, BridgeError> {
    let mut out = rapi::alloc(SEXPTYPE::REALSXP, n)?;
    let dst = out
        .as_real_slice_mut()
        .ok_or(BridgeError::State("double vector"))?;
    for (i, d) in dst.iter_mut().enumerate() {
        *d = f(i).unwrap_or_else(rapi::na_real);
    }
    Ok(out)
}

/// Microseconds to R's seconds (POSIXct, difftime).
pub fn micros_to_secs(us: i64) -> f64 {
    us as f64 / 1e6
}

/// R's seconds to microseconds, rounded to the nearest; `None` if not finite or out of
/// range. The input side sends a timestamp only when this gives back its exact value.
pub fn secs_to_micros(secs: f64) -> Option<i64> {
    let us = (secs * 1e6).round();
    // i64::MAX as f64 rounds up to 2^63, which is out of range: compare with <.
    (us.is_finite() && us >= i64::MIN as f64 && us < i64::MAX as f64).then_some(us as i64)
}

/// `8-4-4-4-12` lowercase hex.
fn uuid_text(b: &[u8]) -> String {
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push_str(&format!("{byte:02x}"));
    }
    s
}

/// An interval as Postgres prints it with `IntervalStyle = iso_8601`
/// (`P1Y2M3DT4H5M6.000007S`), which Postgres' interval input reads back exactly.
pub fn iso_interval(months: i32, days: i32, micros: i64) -> String {
    if months == 0 && days == 0 && micros == 0 {
        return "PT0S".into();
    }
    let mut s = String::from("P");
    let part = |s: &mut String, v: i64, unit: char| {
        if v != 0 {
            s.push_str(&format!("{v}{unit}"));
        }
    };
    // C's truncating division, as Postgres does.
    part(&mut s, i64::from(months / 12), 'Y');
    part(&mut s, i64::from(months % 12), 'M');
    part(&mut s, i64::from(days), 'D');
    let hours = micros / 3_600_000_000;
    let rem = micros % 3_600_000_000;
    let mins = rem / 60_000_000;
    let rem = rem % 60_000_000;
    let secs = rem / 1_000_000;
    let frac = rem % 1_000_000;
    if micros != 0 {
        s.push('T');
    }
    part(&mut s, hours, 'H');
    part(&mut s, mins, 'M');
    if secs != 0 || frac != 0 {
        if secs < 0 || frac < 0 {
            s.push('-');
        }
        s.push_str(&secs.abs().to_string());
        if frac != 0 {
            let digits = format!("{:06}", frac.abs());
            s.push('.');
            s.push_str(digits.trim_end_matches('0'));
        }
        s.push('S');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_print_as_postgres_iso_8601() {
        assert_eq!(iso_interval(0, 0, 0), "PT0S");
        assert_eq!(
            iso_interval(14, 3, 4 * 3_600_000_000 + 5 * 60_000_000 + 6_000_007),
            "P1Y2M3DT4H5M6.000007S"
        );
        assert_eq!(iso_interval(-14, 3, -6_500_000), "P-1Y-2M3DT-6.5S");
        assert_eq!(iso_interval(0, 0, 60_000_000), "PT1M");
    }

    #[test]
    fn microseconds_round_trip_in_the_promised_range() {
        // |t| < 2^32 s (1833-11-24 .. 2106-02-07): a double of seconds is spaced at most
        // 2^-20 s there, so every microsecond survives. Steps hit many residue classes.
        let lo = -(1i64 << 32) * 1_000_000 + 1;
        let hi = (1i64 << 32) * 1_000_000 - 1;
        let mut us = lo;
        while us < hi {
            for u in [us, us + 1, us + 999_999] {
                assert_eq!(secs_to_micros(micros_to_secs(u)), Some(u), "{u}");
            }
            us += 99_999_937_123;
        }
        // Further out, not every microsecond does: the input side checks each value.
        let far = 253_402_300_799_999_999; // 9999-12-31 23:59:59.999999
        assert_ne!(secs_to_micros(micros_to_secs(far)), Some(far));
    }
}
