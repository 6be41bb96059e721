//! Output: the script's data.frame (or the output_params values) → Arrow batches, by the
//! declared type of each output column (docs/TYPES.md, "Out of the script", R column),
//! sent in batches of at most `output_batch_rows` rows and frames under
//! `max_frame_bytes`.

use std::sync::Arc;

use airlock_protocol::{
    begin_frame,
    data::OutputColumn,
    types::{PgType, Scalar},
    FrameKind,
};
use arrow_array::{
    builder::{BinaryBuilder, StringBuilder},
    new_empty_array, new_null_array, Array, ArrayRef, BooleanArray, Date32Array,
    DurationMicrosecondArray, Float32Array, Float64Array, Int16Array, Int32Array, Int64Array,
    ListArray, RecordBatch, Time64MicrosecondArray, TimestampMicrosecondArray,
};
use arrow_buffer::OffsetBuffer;
use arrow_ipc::writer::StreamWriter;
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use extendr_api::prelude::*;

use crate::channel::Channel;
use crate::error::BridgeError;
use crate::input::secs_to_micros;
use crate::rapi::{self, SEXPTYPE};

/// Names a column for messages: `column 2 (x) of OutputDataSet`.
struct Ctx<'a> {
    index: usize,
    name: &'a str,
    frame: &'a str,
    declared: PgType,
}

impl std::fmt::Display for Ctx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "column {} ({}) of {}",
            self.index + 1,
            self.name,
            self.frame
        )
    }
}

impl Ctx<'_> {
    fn mismatch(&self, x: &Robj) -> BridgeError {
        BridgeError::Output(format!(
            "{self} is {}, the column list says {}",
            describe(x),
            self.declared
        ))
    }

    fn value_error(&self, row: usize, value: impl std::fmt::Display, why: &str) -> BridgeError {
        BridgeError::Output(format!("value {value} in row {} of {self} {why}", row + 1))
    }
}

/// What an R value is, in the words of an R user ("a list", "character", "factor").
fn describe(x: &Robj) -> String {
    let classes = rapi::classes(x);
    if x.get_attrib("dim").is_some() && !classes.iter().any(|c| c == "data.frame") {
        return "a matrix".into();
    }
    if let Some(c) = classes
        .iter()
        .find(|c| !matches!(c.as_str(), "POSIXt" | "AsIs"))
    {
        return if c == "list" {
            "a list".into()
        } else {
            c.clone()
        };
    }
    match x.sexptype() {
        SEXPTYPE::NILSXP => "NULL".into(),
        SEXPTYPE::LGLSXP => "logical".into(),
        SEXPTYPE::INTSXP => "integer".into(),
        SEXPTYPE::REALSXP => "double".into(),
        SEXPTYPE::STRSXP => "character".into(),
        SEXPTYPE::VECSXP => "a list".into(),
        SEXPTYPE::RAWSXP => "raw".into(),
        SEXPTYPE::CPLXSXP => "complex".into(),
        SEXPTYPE::CLOSXP | SEXPTYPE::BUILTINSXP | SEXPTYPE::SPECIALSXP => "a function".into(),
        SEXPTYPE::ENVSXP => "an environment".into(),
        _ => format!("an R object of type {:?}", x.sexptype()),
    }
}

/// The R kinds the conversions accept.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Logical,
    Integer,
    Factor,
    Double,
    Integer64,
    Date,
    Posixct,
    /// Seconds per unit.
    Difftime(f64),
    Character,
    List,
    Other,
}

fn kind(x: &Robj) -> Kind {
    let classes = rapi::classes(x);
    let has = |c: &str| classes.iter().any(|k| k == c);
    if x.get_attrib("dim").is_some() && !has("data.frame") {
        return Kind::Other;
    }
    match x.sexptype() {
        SEXPTYPE::LGLSXP if classes.is_empty() || has("AsIs") => Kind::Logical,
        SEXPTYPE::INTSXP if has("factor") => Kind::Factor,
        SEXPTYPE::INTSXP | SEXPTYPE::REALSXP if has("Date") => Kind::Date,
        SEXPTYPE::INTSXP if classes.is_empty() || has("AsIs") => Kind::Integer,
        SEXPTYPE::REALSXP if has("integer64") => Kind::Integer64,
        SEXPTYPE::REALSXP if has("POSIXct") => Kind::Posixct,
        SEXPTYPE::REALSXP | SEXPTYPE::INTSXP if has("difftime") => {
            let unit = match rapi::string_attr(x, "units").as_deref() {
                Some("secs") => 1.0,
                Some("mins") => 60.0,
                Some("hours") => 3600.0,
                Some("days") => 86_400.0,
                Some("weeks") => 604_800.0,
                _ => return Kind::Other,
            };
            Kind::Difftime(unit)
        }
        SEXPTYPE::REALSXP if classes.is_empty() || has("AsIs") => Kind::Double,
        SEXPTYPE::STRSXP if classes.is_empty() || has("AsIs") => Kind::Character,
        SEXPTYPE::VECSXP if classes.is_empty() || has("AsIs") || has("list") => Kind::List,
        _ => Kind::Other,
    }
}

/// One loopback parameter (`$n`, an R value of length 1) as a one-row Arrow column and
/// the Postgres type it binds as, chosen by its R class.
pub fn param_column(x: &Robj, index: usize) -> Result<(ArrayRef, PgType), BridgeError> {
    let name = format!("${}", index + 1);
    let scalar = match kind(x) {
        Kind::Logical => Scalar::Bool,
        Kind::Integer => Scalar::Int4,
        Kind::Integer64 => Scalar::Int8,
        Kind::Double => Scalar::Float8,
        Kind::Character | Kind::Factor => Scalar::Text,
        Kind::Date => Scalar::Date,
        Kind::Posixct => Scalar::Timestamptz,
        Kind::Difftime(_) => Scalar::Interval,
        _ if x.sexptype() == SEXPTYPE::RAWSXP => Scalar::Bytea,
        _ => {
            return Err(BridgeError::Output(format!(
                "loopback parameter {name} is {}, which airlock cannot bind",
                describe(x)
            )))
        }
    };
    let ctx = Ctx {
        index,
        name: &name,
        frame: "the loopback parameters",
        declared: PgType::scalar(scalar),
    };
    if scalar == Scalar::Bytea {
        // One raw vector is one bytea value: wrap it as a list column of one.
        let mut list = rapi::alloc(SEXPTYPE::VECSXP, 1)?;
        // SAFETY: x is a live protected Robj; the list references it from now on.
        rapi::set_list_elt(&mut list, 0, unsafe { x.get() });
        return Ok((scalar_column(&list, scalar, &ctx)?, PgType::scalar(scalar)));
    }
    if x.len() != 1 {
        return Err(BridgeError::Output(format!(
            "loopback parameter {name} has {} values; a parameter is one value",
            x.len()
        )));
    }
    Ok((scalar_column(x, scalar, &ctx)?, PgType::scalar(scalar)))
}

/// The Arrow type sent for a declared scalar type when the value is not character.
fn native_type(s: Scalar) -> DataType {
    match s {
        Scalar::Bool => DataType::Boolean,
        Scalar::Int2 => DataType::Int16,
        Scalar::Int4 => DataType::Int32,
        Scalar::Int8 => DataType::Int64,
        Scalar::Float4 => DataType::Float32,
        Scalar::Float8 => DataType::Float64,
        Scalar::Numeric
        | Scalar::Text
        | Scalar::Json
        | Scalar::Jsonb
        | Scalar::Uuid
        | Scalar::Interval => DataType::Utf8,
        Scalar::Bytea => DataType::Binary,
        Scalar::Date => DataType::Date32,
        Scalar::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        Scalar::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        Scalar::Time => DataType::Time64(TimeUnit::Microsecond),
    }
}

/// Converts the columns (a list of R vectors of `rows` elements each) and sends them.
/// Returns the number of rows sent.
pub fn send_frame(
    chan: &Channel,
    columns: &Robj,
    rows: usize,
    declared: &[OutputColumn],
    frame: &str,
    batch_rows: usize,
) -> Result<u64, BridgeError> {
    if columns.sexptype() != SEXPTYPE::VECSXP {
        return Err(BridgeError::Output(format!(
            "{frame} is {}, not a data.frame",
            describe(columns)
        )));
    }
    if columns.len() != declared.len() {
        // The backend owns this check and its error (both counts, SQLSTATE 42804): send
        // it an empty batch with the frame's column count.
        let fields: Vec<Field> = (0..columns.len())
            .map(|i| Field::new(format!("column{}", i + 1), DataType::Null, true))
            .collect();
        let batch = RecordBatch::try_new_with_options(
            Arc::new(Schema::new(fields)),
            (0..columns.len())
                .map(|_| Arc::new(arrow_array::NullArray::new(0)) as arrow_array::ArrayRef)
                .collect(),
            &arrow_array::RecordBatchOptions::new().with_row_count(Some(0)),
        )?;
        send_batch(chan, &batch)?;
        return Ok(0);
    }
    let mut fields = Vec::with_capacity(declared.len());
    let mut arrays = Vec::with_capacity(declared.len());
    for (i, d) in declared.iter().enumerate() {
        let x = rapi::robj(rapi::list_elt(columns, i));
        let ctx = Ctx {
            index: i,
            name: &d.name,
            frame,
            declared: d.pg_type,
        };
        if x.len() != rows {
            return Err(BridgeError::Output(format!(
                "{ctx} has {} values, the frame has {rows} rows",
                x.len()
            )));
        }
        let array = if d.pg_type.array {
            array_column(&x, d.pg_type.scalar, &ctx)?
        } else {
            scalar_column(&x, d.pg_type.scalar, &ctx)?
        };
        fields.push(Field::new(&d.name, array.data_type().clone(), true));
        arrays.push(array);
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new_with_options(
        schema,
        arrays,
        &arrow_array::RecordBatchOptions::new().with_row_count(Some(rows)),
    )?;
    let mut start = 0;
    loop {
        let n = (rows - start).min(batch_rows.max(1));
        send_batch(chan, &batch.slice(start, n))?;
        start += n;
        if start >= rows {
            break;
        }
    }
    Ok(rows as u64)
}

/// Sends one batch as one frame, halving it while its frame is above the limit.
fn send_batch(chan: &Channel, batch: &RecordBatch) -> Result<(), BridgeError> {
    let mut frame = begin_frame(FrameKind::Arrow, 0);
    {
        let mut w = StreamWriter::try_new(&mut frame, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    let len = frame.len() - airlock_protocol::frame::HEADER_LEN;
    if len > chan.max_frame() {
        if batch.num_rows() <= 1 {
            return Err(BridgeError::Output(format!(
                "one row of the output takes {len} bytes, above the frame limit of {}",
                chan.max_frame()
            )));
        }
        drop(frame);
        let half = batch.num_rows() / 2;
        send_batch(chan, &batch.slice(0, half))?;
        return send_batch(chan, &batch.slice(half, batch.num_rows() - half));
    }
    chan.send_started_frame(frame)
}

/// An array column: a list whose elements are vectors of the element type (NULL, or a
/// logical NA, for a NULL array).
fn array_column(x: &Robj, s: Scalar, ctx: &Ctx<'_>) -> Result<ArrayRef, BridgeError> {
    if kind(x) == Kind::Logical && all_na_logical(x) {
        let child = Field::new("item", native_type(s), true);
        return Ok(new_null_array(&DataType::List(Arc::new(child)), x.len()));
    }
    if kind(x) != Kind::List {
        return Err(ctx.mismatch(x));
    }
    let n = x.len();
    let mut children: Vec<ArrayRef> = Vec::with_capacity(n);
    let mut lengths = Vec::with_capacity(n);
    let mut valid = Vec::with_capacity(n);
    for i in 0..n {
        let e = rapi::robj(rapi::list_elt(x, i));
        if e.sexptype() == SEXPTYPE::NILSXP
            || (kind(&e) == Kind::Logical && e.len() == 1 && all_na_logical(&e))
        {
            lengths.push(0);
            valid.push(false);
            continue;
        }
        let ectx = Ctx {
            index: ctx.index,
            name: ctx.name,
            frame: ctx.frame,
            declared: PgType::scalar(s),
        };
        let child = scalar_column(&e, s, &ectx).map_err(|err| match err {
            BridgeError::Output(m) => {
                BridgeError::Output(format!("element {} of {ctx}: {m}", i + 1))
            }
            other => other,
        })?;
        lengths.push(child.len());
        valid.push(true);
        children.push(child);
    }
    let child_type = children
        .first()
        .map_or_else(|| native_type(s), |c| c.data_type().clone());
    if children.iter().any(|c| *c.data_type() != child_type) {
        return Err(BridgeError::Output(format!(
            "{ctx} mixes vectors of different classes (character and {})",
            s.name()
        )));
    }
    let refs: Vec<&dyn Array> = children.iter().map(|c| c.as_ref()).collect();
    let values = if refs.is_empty() {
        new_empty_array(&child_type)
    } else {
        arrow_select::concat::concat(&refs)?
    };
    let field = Arc::new(Field::new("item", child_type, true));
    let list = ListArray::try_new(
        field,
        OffsetBuffer::from_lengths(lengths),
        values,
        Some(valid.into()),
    )?;
    Ok(Arc::new(list))
}

fn all_na_logical(x: &Robj) -> bool {
    rapi::logical_slice(x).is_some_and(|v| v.iter().all(|&b| b == rapi::NA_INTEGER))
}

/// A scalar column from an R vector, by the declared type.
fn scalar_column(x: &Robj, s: Scalar, ctx: &Ctx<'_>) -> Result<ArrayRef, BridgeError> {
    let k = kind(x);
    let n = x.len();
    // A logical vector of NAs only (`NA`, `data.frame(x = NA)`) is NULLs of any type.
    if k == Kind::Logical && s != Scalar::Bool && all_na_logical(x) {
        return Ok(new_null_array(&native_type(s), n));
    }
    let character = |x: &Robj| -> Result<ArrayRef, BridgeError> {
        let mut b = StringBuilder::with_capacity(n, 0);
        for i in 0..n {
            match rapi::string_elt(x, i).map_err(|m| ctx.value_error(i, "(a string)", &m))? {
                Some(v) => b.append_value(v),
                None => b.append_null(),
            }
        }
        Ok(Arc::new(b.finish()))
    };
    let array: ArrayRef = match (s, k) {
        (Scalar::Bool, Kind::Logical) => {
            let v = rapi::logical_slice(x).ok_or(BridgeError::State("logical"))?;
            Arc::new(
                v.iter()
                    .map(|&b| (b != rapi::NA_INTEGER).then_some(b != 0))
                    .collect::<BooleanArray>(),
            )
        }
        (
            Scalar::Int2 | Scalar::Int4 | Scalar::Int8,
            Kind::Integer | Kind::Integer64 | Kind::Double,
        ) => {
            let values = whole_numbers(x, k, ctx)?;
            let check = |lo: i64, hi: i64| -> Result<(), BridgeError> {
                for (i, v) in values.iter().enumerate() {
                    if let Some(v) = v {
                        if *v < lo || *v > hi {
                            return Err(ctx.value_error(
                                i,
                                v,
                                &format!("does not fit {s}", s = s.name()),
                            ));
                        }
                    }
                }
                Ok(())
            };
            match s {
                Scalar::Int2 => {
                    check(i16::MIN.into(), i16::MAX.into())?;
                    // Checked just above: every value fits.
                    Arc::new(
                        values
                            .iter()
                            .map(|v| v.map(|v| v as i16))
                            .collect::<Int16Array>(),
                    )
                }
                Scalar::Int4 => {
                    check(i32::MIN.into(), i32::MAX.into())?;
                    Arc::new(
                        values
                            .iter()
                            .map(|v| v.map(|v| v as i32))
                            .collect::<Int32Array>(),
                    )
                }
                _ => Arc::new(values.into_iter().collect::<Int64Array>()),
            }
        }
        (Scalar::Float4 | Scalar::Float8, Kind::Double | Kind::Integer | Kind::Integer64) => {
            let values = floats(x, k, ctx)?;
            if s == Scalar::Float8 {
                Arc::new(values.into_iter().collect::<Float64Array>())
            } else {
                let mut out = Vec::with_capacity(n);
                for (i, v) in values.into_iter().enumerate() {
                    out.push(match v {
                        Some(v) => {
                            let f = v as f32;
                            if v.is_finite() && !f.is_finite() {
                                return Err(ctx.value_error(i, v, "does not fit float4"));
                            }
                            Some(f)
                        }
                        None => None,
                    });
                }
                Arc::new(out.into_iter().collect::<Float32Array>())
            }
        }
        (Scalar::Numeric, Kind::Character) => character(x)?,
        (Scalar::Numeric, Kind::Double | Kind::Integer | Kind::Integer64) => {
            let values = floats_or_ints_as_text(x, k)?;
            Arc::new(values.into_iter().collect::<arrow_array::StringArray>())
        }
        (Scalar::Text, Kind::Character)
        | (Scalar::Json | Scalar::Jsonb | Scalar::Uuid, Kind::Character)
        | (Scalar::Interval | Scalar::Date | Scalar::Time, Kind::Character)
        | (Scalar::Timestamp | Scalar::Timestamptz, Kind::Character) => character(x)?,
        (Scalar::Text, Kind::Factor) => {
            let levels = x
                .get_attrib("levels")
                .filter(|l| l.sexptype() == SEXPTYPE::STRSXP)
                .ok_or_else(|| ctx.mismatch(x))?;
            let codes = x.as_integer_slice().ok_or(BridgeError::State("factor"))?;
            let mut b = StringBuilder::with_capacity(n, 0);
            for (i, &c) in codes.iter().enumerate() {
                if c == rapi::NA_INTEGER {
                    b.append_null();
                    continue;
                }
                let level = usize::try_from(c - 1)
                    .ok()
                    .filter(|&l| l < levels.len())
                    .ok_or_else(|| ctx.value_error(i, c, "is not a level of the factor"))?;
                match rapi::string_elt(&levels, level)
                    .map_err(|m| ctx.value_error(i, "(a level)", &m))?
                {
                    Some(v) => b.append_value(v),
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
        (Scalar::Bytea, Kind::List) => {
            let mut b = BinaryBuilder::new();
            for i in 0..n {
                let e = rapi::robj(rapi::list_elt(x, i));
                if e.sexptype() == SEXPTYPE::NILSXP || (e.len() == 1 && all_na_logical(&e)) {
                    b.append_null();
                } else if e.sexptype() == SEXPTYPE::RAWSXP {
                    b.append_value(e.as_raw_slice().unwrap_or_default());
                } else {
                    return Err(BridgeError::Output(format!(
                        "row {} of {ctx} is {}, not a raw vector (bytea)",
                        i + 1,
                        describe(&e)
                    )));
                }
            }
            Arc::new(b.finish())
        }
        (Scalar::Date, Kind::Date) => {
            let mut out = Vec::with_capacity(n);
            for (i, v) in reals(x)?.into_iter().enumerate() {
                out.push(match v {
                    None => None,
                    Some(d)
                        if d.fract() == 0.0
                            && d >= f64::from(i32::MIN)
                            && d <= f64::from(i32::MAX) =>
                    {
                        Some(d as i32)
                    }
                    Some(d) => {
                        return Err(ctx.value_error(
                            i,
                            d,
                            "is not a whole number of days that fits a date",
                        ))
                    }
                });
            }
            Arc::new(out.into_iter().collect::<Date32Array>())
        }
        (Scalar::Timestamp | Scalar::Timestamptz, Kind::Posixct) => {
            let mut out = Vec::with_capacity(n);
            for (i, v) in reals(x)?.into_iter().enumerate() {
                out.push(match v {
                    None => None,
                    Some(secs) => Some(
                        secs_to_micros(secs)
                            .ok_or_else(|| ctx.value_error(i, secs, "is not a finite time"))?,
                    ),
                });
            }
            let a = out.into_iter().collect::<TimestampMicrosecondArray>();
            if s == Scalar::Timestamptz {
                Arc::new(a.with_timezone("UTC"))
            } else {
                Arc::new(a)
            }
        }
        (Scalar::Time, Kind::Difftime(unit)) => {
            let mut out = Vec::with_capacity(n);
            for (i, v) in reals(x)?.into_iter().enumerate() {
                out.push(match v {
                    None => None,
                    Some(t) => {
                        let us = secs_to_micros(t * unit)
                            .filter(|us| (0..=86_400_000_000).contains(us))
                            .ok_or_else(|| {
                                ctx.value_error(
                                    i,
                                    t * unit,
                                    "seconds is not a time of day (0 to 86400)",
                                )
                            })?;
                        Some(us)
                    }
                });
            }
            Arc::new(out.into_iter().collect::<Time64MicrosecondArray>())
        }
        (Scalar::Interval, Kind::Difftime(unit)) => {
            let mut out = Vec::with_capacity(n);
            for (i, v) in reals(x)?.into_iter().enumerate() {
                out.push(match v {
                    None => None,
                    Some(t) => Some(secs_to_micros(t * unit).ok_or_else(|| {
                        ctx.value_error(i, t * unit, "seconds is not a finite duration")
                    })?),
                });
            }
            Arc::new(out.into_iter().collect::<DurationMicrosecondArray>())
        }
        _ => return Err(ctx.mismatch(x)),
    };
    Ok(array)
}

/// The elements of a double (or integer) vector as f64, `None` for NA.
fn reals(x: &Robj) -> Result<Vec<Option<f64>>, BridgeError> {
    if let Some(v) = x.as_real_slice() {
        return Ok(v
            .iter()
            .map(|&d| (!rapi::is_na_real(d)).then_some(d))
            .collect());
    }
    if let Some(v) = x.as_integer_slice() {
        return Ok(v
            .iter()
            .map(|&i| (i != rapi::NA_INTEGER).then_some(f64::from(i)))
            .collect());
    }
    Err(BridgeError::State("expected a numeric vector"))
}

/// integer64 values, `None` for NA.
fn int64s(x: &Robj) -> Result<Vec<Option<i64>>, BridgeError> {
    let v = x.as_real_slice().ok_or(BridgeError::State("integer64"))?;
    Ok(v.iter()
        .map(|&d| {
            let i = d.to_bits() as i64;
            (i != rapi::NA_INTEGER64).then_some(i)
        })
        .collect())
}

/// Integer, integer64 or whole-number double values as i64.
fn whole_numbers(x: &Robj, k: Kind, ctx: &Ctx<'_>) -> Result<Vec<Option<i64>>, BridgeError> {
    match k {
        Kind::Integer64 => int64s(x),
        Kind::Integer => reals(x).map(|v| v.into_iter().map(|d| d.map(|d| d as i64)).collect()),
        _ => {
            let mut out = Vec::with_capacity(x.len());
            for (i, v) in reals(x)?.into_iter().enumerate() {
                out.push(match v {
                    None => None,
                    // 2^63 is the first double past i64::MAX.
                    Some(d) if d.fract() == 0.0 && d >= -(2f64.powi(63)) && d < 2f64.powi(63) => {
                        Some(d as i64)
                    }
                    Some(d) => return Err(ctx.value_error(i, d, "is not a whole number")),
                });
            }
            Ok(out)
        }
    }
}

/// Double, integer or integer64 values as f64; integer64 only where exact.
fn floats(x: &Robj, k: Kind, ctx: &Ctx<'_>) -> Result<Vec<Option<f64>>, BridgeError> {
    if k != Kind::Integer64 {
        return reals(x);
    }
    let mut out = Vec::with_capacity(x.len());
    for (i, v) in int64s(x)?.into_iter().enumerate() {
        out.push(match v {
            None => None,
            Some(v) if v.unsigned_abs() <= 1 << 53 => Some(v as f64),
            Some(v) => return Err(ctx.value_error(i, v, "does not fit a float exactly")),
        });
    }
    Ok(out)
}

/// Numbers as numeric text: integers exactly, doubles as their shortest exact decimal
/// (Rust's `Display` of f64: the fewest digits that read back as the same double).
fn floats_or_ints_as_text(x: &Robj, k: Kind) -> Result<Vec<Option<String>>, BridgeError> {
    Ok(match k {
        Kind::Integer64 => int64s(x)?
            .into_iter()
            .map(|v| v.map(|v| v.to_string()))
            .collect(),
        Kind::Integer => reals(x)?
            .into_iter()
            .map(|v| v.map(|v| (v as i64).to_string()))
            .collect(),
        _ => reals(x)?
            .into_iter()
            .map(|v| {
                v.map(|d| {
                    if d.is_nan() {
                        "NaN".into()
                    } else if d == f64::INFINITY {
                        "Infinity".into()
                    } else if d == f64::NEG_INFINITY {
                        "-Infinity".into()
                    } else {
                        d.to_string()
                    }
                })
            })
            .collect(),
    })
}
