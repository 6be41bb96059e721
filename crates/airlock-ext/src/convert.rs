//! Postgres values ⇄ Arrow columns, in binary, both ways: the table in docs/TYPES.md.
//!
//! Input: tuples from the SPI cursor are appended column by column to Arrow builders and
//! shipped as one IPC stream per batch; every field names its Postgres type in its
//! metadata. Output: Arrow batches from the runtime are checked against the caller's column
//! definition list once, then each value becomes a Datum of the declared type.
//! The runtime is untrusted: arrow-ipc validates every array it decodes (offsets, UTF-8)
//! before we read it, and every value is range-checked against the declared type; text
//! into a non-text type goes through that type's own input function.

use std::{collections::HashMap, ffi::CStr, sync::Arc};

use airlock_protocol::types::{PgType, Scalar, TYPE_METADATA_KEY};
use arrow_array::{
    builder::{
        BinaryBuilder, BooleanBuilder, Date32Builder, FixedSizeBinaryBuilder, Float32Builder,
        Float64Builder, Int16Builder, Int32Builder, Int64Builder, IntervalMonthDayNanoBuilder,
        StringBuilder, Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
    },
    cast::AsArray,
    types::{
        Date32Type, Date64Type, Decimal128Type, Decimal256Type, DurationMicrosecondType,
        DurationMillisecondType, DurationNanosecondType, DurationSecondType, Float32Type,
        Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, IntervalMonthDayNanoType,
        Time32MillisecondType, Time32SecondType, Time64MicrosecondType, Time64NanosecondType,
        TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
        TimestampSecondType, UInt16Type, UInt32Type, UInt64Type, UInt8Type,
    },
    Array, ArrayRef, ListArray, RecordBatch,
};
use arrow_buffer::{NullBuffer, NullBufferBuilder, OffsetBuffer};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use pgrx::{pg_sys, IntoDatum};

use crate::error::CallError;

/// The types the data path carries, for error messages.
pub const SUPPORTED_TYPES: &str = "bool, int2, int4, int8, float4, float8, numeric, text, varchar, char, name, bytea, date, timestamp, timestamptz, time, interval, uuid, json, jsonb, one-dimensional arrays of these, and domains over them (see docs/TYPES.md)";

/// Days from 1970-01-01 (Arrow's epoch) to 2000-01-01 (Postgres').
const EPOCH_DAYS: i32 = 10_957;
/// Microseconds from 1970-01-01 to 2000-01-01.
const EPOCH_MICROS: i64 = 946_684_800_000_000;
/// Postgres' valid date range, in its own day numbers (IS_VALID_DATE).
const DATE_MIN: i32 = -2_451_545;
const DATE_END: i32 = 2_145_031_949;
/// Postgres' valid timestamp range, in its own microseconds (IS_VALID_TIMESTAMP).
const TIMESTAMP_MIN: i64 = -211_813_488_000_000_000;
const TIMESTAMP_END: i64 = 9_223_371_331_200_000_000;
/// Microseconds in a day: the largest time value (24:00:00).
const DAY_MICROS: i64 = 86_400_000_000;
/// Output rows are formed in chunks of about this many values (rows × columns).
const CHUNK_CELLS: usize = 1 << 16;
/// Largest buffer the input encoder keeps from one batch to the next; a larger one (a
/// batch of huge values) is freed.
const MAX_KEPT_BYTES: usize = 64 << 20;
/// Postgres' MaxAllocSize: the most one palloc may ask for (1 GB - 1).
const MAX_ALLOC_SIZE: usize = 0x3fff_ffff;

fn scalar_of_base(base: pg_sys::Oid) -> Option<Scalar> {
    Some(match base {
        pg_sys::BOOLOID => Scalar::Bool,
        pg_sys::INT2OID => Scalar::Int2,
        pg_sys::INT4OID => Scalar::Int4,
        pg_sys::INT8OID => Scalar::Int8,
        pg_sys::FLOAT4OID => Scalar::Float4,
        pg_sys::FLOAT8OID => Scalar::Float8,
        pg_sys::NUMERICOID => Scalar::Numeric,
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID | pg_sys::NAMEOID => Scalar::Text,
        pg_sys::BYTEAOID => Scalar::Bytea,
        pg_sys::DATEOID => Scalar::Date,
        pg_sys::TIMESTAMPOID => Scalar::Timestamp,
        pg_sys::TIMESTAMPTZOID => Scalar::Timestamptz,
        pg_sys::TIMEOID => Scalar::Time,
        pg_sys::INTERVALOID => Scalar::Interval,
        pg_sys::UUIDOID => Scalar::Uuid,
        pg_sys::JSONOID => Scalar::Json,
        pg_sys::JSONBOID => Scalar::Jsonb,
        _ => return None,
    })
}

fn base_type(typoid: pg_sys::Oid) -> pg_sys::Oid {
    // SAFETY: getBaseType only reads the syscache; any oid is valid input (an unknown
    // oid is returned unchanged).
    unsafe { pg_sys::getBaseType(typoid) }
}

/// A column type the data path knows: its protocol name, and the base oid of the scalar
/// (the element, for arrays) after resolving domains.
#[derive(Debug, Clone, Copy)]
struct Resolved {
    pg: PgType,
    scalar_oid: pg_sys::Oid,
    /// For arrays: the array type's element oid as declared (a domain stays a domain).
    elem_oid: pg_sys::Oid,
}

fn resolve(typoid: pg_sys::Oid) -> Option<Resolved> {
    let base = base_type(typoid);
    if let Some(scalar) = scalar_of_base(base) {
        return Some(Resolved {
            pg: PgType::scalar(scalar),
            scalar_oid: base,
            elem_oid: pg_sys::Oid::INVALID,
        });
    }
    // SAFETY: get_element_type reads the syscache; InvalidOid if base is not an array.
    let elem = unsafe { pg_sys::get_element_type(base) };
    if elem == pg_sys::Oid::INVALID {
        return None;
    }
    let elem_base = base_type(elem);
    scalar_of_base(elem_base).map(|scalar| Resolved {
        pg: PgType::array_of(scalar),
        scalar_oid: elem_base,
        elem_oid: elem,
    })
}

/// `format_type` of a type, for messages.
pub fn type_name(typoid: pg_sys::Oid, typmod: i32) -> String {
    // SAFETY: format_type_with_typemod accepts any oid (unknown ones print as "???") and
    // returns a palloc'd NUL-terminated string.
    unsafe {
        let p = pg_sys::format_type_with_typemod(typoid, typmod);
        CStr::from_ptr(p).to_string_lossy().into_owned()
    }
}

/// One live column of a tuple descriptor.
pub struct Attr {
    pub number: usize,
    pub name: String,
    pub typoid: pg_sys::Oid,
    pub typmod: i32,
}

/// The live columns of `tupdesc`, numbered from 1.
///
/// # Safety
/// `tupdesc` must be a valid tuple descriptor.
pub unsafe fn attributes(tupdesc: pg_sys::TupleDesc) -> Vec<Attr> {
    // SAFETY: the caller guarantees tupdesc is valid; attrs has natts entries.
    let attrs = unsafe { (*tupdesc).attrs.as_slice((*tupdesc).natts as usize) };
    attrs
        .iter()
        .enumerate()
        .filter(|(_, a)| !a.attisdropped)
        .map(|(i, a)| Attr {
            number: i + 1,
            name: pgrx::name_data_to_str(&a.attname).to_owned(),
            typoid: a.atttypid,
            typmod: a.atttypmod,
        })
        .collect()
}

/// The Arrow type a scalar travels as (docs/TYPES.md, "Arrow on the wire").
fn wire_type(scalar: Scalar) -> DataType {
    match scalar {
        Scalar::Bool => DataType::Boolean,
        Scalar::Int2 => DataType::Int16,
        Scalar::Int4 => DataType::Int32,
        Scalar::Int8 => DataType::Int64,
        Scalar::Float4 => DataType::Float32,
        Scalar::Float8 => DataType::Float64,
        Scalar::Numeric | Scalar::Text | Scalar::Json | Scalar::Jsonb => DataType::Utf8,
        Scalar::Bytea => DataType::Binary,
        Scalar::Date => DataType::Date32,
        Scalar::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        Scalar::Timestamptz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        Scalar::Time => DataType::Time64(TimeUnit::Microsecond),
        Scalar::Interval => DataType::Interval(arrow_schema::IntervalUnit::MonthDayNano),
        Scalar::Uuid => DataType::FixedSizeBinary(16),
    }
}

// --- Input: Datums to Arrow ---------------------------------------------------------

/// Why one input value cannot be passed to a script.
type ValueError = String;

/// How a non-null Datum of one scalar type is read.
enum Reader {
    /// By-value types, read from the Datum's bits as Postgres' DatumGet* macros do.
    ByValue,
    /// Varlena text (text, varchar, char, json): the bytes are UTF-8.
    Text,
    /// name: a NUL-terminated NameData.
    Name,
    /// Through the type's output function (numeric, jsonb): its exact text.
    Output(Box<pg_sys::FmgrInfo>),
    /// bytea: the varlena's bytes.
    Bytes,
    /// interval: a pointer to an Interval.
    Interval,
    /// uuid: a pointer to 16 bytes.
    Uuid,
}

enum Builder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Str(StringBuilder),
    Bin(BinaryBuilder),
    Date(Date32Builder),
    Ts(TimestampMicrosecondBuilder),
    Time(Time64MicrosecondBuilder),
    Interval(IntervalMonthDayNanoBuilder),
    Uuid(FixedSizeBinaryBuilder),
}

/// Appends values of one scalar type.
struct ScalarEncoder {
    reader: Reader,
    builder: Builder,
}

impl ScalarEncoder {
    fn new(scalar: Scalar, base_oid: pg_sys::Oid) -> ScalarEncoder {
        let reader = match scalar {
            Scalar::Text if base_oid == pg_sys::NAMEOID => Reader::Name,
            Scalar::Text | Scalar::Json => Reader::Text,
            Scalar::Numeric | Scalar::Jsonb => {
                let mut func = pg_sys::Oid::INVALID;
                let mut varlena = false;
                let mut flinfo = Box::new(pg_sys::FmgrInfo::default());
                // SAFETY: base_oid is a valid type oid (numeric or jsonb); fmgr_info fills
                // the boxed FmgrInfo, which stays at one address while it is used.
                unsafe {
                    pg_sys::getTypeOutputInfo(base_oid, &mut func, &mut varlena);
                    pg_sys::fmgr_info(func, &mut *flinfo);
                }
                Reader::Output(flinfo)
            }
            Scalar::Bytea => Reader::Bytes,
            Scalar::Interval => Reader::Interval,
            Scalar::Uuid => Reader::Uuid,
            _ => Reader::ByValue,
        };
        let builder = match scalar {
            Scalar::Bool => Builder::Bool(BooleanBuilder::new()),
            Scalar::Int2 => Builder::I16(Int16Builder::new()),
            Scalar::Int4 => Builder::I32(Int32Builder::new()),
            Scalar::Int8 => Builder::I64(Int64Builder::new()),
            Scalar::Float4 => Builder::F32(Float32Builder::new()),
            Scalar::Float8 => Builder::F64(Float64Builder::new()),
            Scalar::Numeric | Scalar::Text | Scalar::Json | Scalar::Jsonb => {
                Builder::Str(StringBuilder::new())
            }
            Scalar::Bytea => Builder::Bin(BinaryBuilder::new()),
            Scalar::Date => Builder::Date(Date32Builder::new()),
            Scalar::Timestamp => Builder::Ts(TimestampMicrosecondBuilder::new()),
            Scalar::Timestamptz => {
                Builder::Ts(TimestampMicrosecondBuilder::new().with_timezone("UTC"))
            }
            Scalar::Time => Builder::Time(Time64MicrosecondBuilder::new()),
            Scalar::Interval => Builder::Interval(IntervalMonthDayNanoBuilder::new()),
            Scalar::Uuid => Builder::Uuid(FixedSizeBinaryBuilder::new(16)),
        };
        ScalarEncoder { reader, builder }
    }

    /// Bytes a value of this type adds besides its variable-length data.
    fn fixed_bytes(&self) -> usize {
        match self.builder {
            Builder::Bool(_) => 1,
            Builder::I16(_) => 3,
            Builder::I32(_) | Builder::F32(_) | Builder::Date(_) => 5,
            Builder::I64(_) | Builder::F64(_) | Builder::Ts(_) | Builder::Time(_) => 9,
            Builder::Str(_) | Builder::Bin(_) => 5,
            Builder::Interval(_) | Builder::Uuid(_) => 17,
        }
    }

    fn append_null(&mut self) {
        match &mut self.builder {
            Builder::Bool(b) => b.append_null(),
            Builder::I16(b) => b.append_null(),
            Builder::I32(b) => b.append_null(),
            Builder::I64(b) => b.append_null(),
            Builder::F32(b) => b.append_null(),
            Builder::F64(b) => b.append_null(),
            Builder::Str(b) => b.append_null(),
            Builder::Bin(b) => b.append_null(),
            Builder::Date(b) => b.append_null(),
            Builder::Ts(b) => b.append_null(),
            Builder::Time(b) => b.append_null(),
            Builder::Interval(b) => b.append_null(),
            Builder::Uuid(b) => b.append_null(),
        }
    }

    /// Appends one non-null value; returns the variable-length bytes it added.
    ///
    /// # Safety
    /// `d` must be a non-null Datum of this encoder's type, valid for the call.
    unsafe fn append(&mut self, d: pg_sys::Datum) -> Result<usize, ValueError> {
        let bits = d.value();
        match (&mut self.builder, &mut self.reader) {
            (Builder::Bool(b), _) => b.append_value(bits != 0),
            (Builder::I16(b), _) => b.append_value(bits as i16),
            (Builder::I32(b), _) => b.append_value(bits as i32),
            (Builder::I64(b), _) => b.append_value(bits as i64),
            (Builder::F32(b), _) => b.append_value(f32::from_bits(bits as u32)),
            (Builder::F64(b), _) => b.append_value(f64::from_bits(bits as u64)),
            (Builder::Str(b), Reader::Text) => {
                // SAFETY: per the caller, d is a non-null varlena of a text-like type.
                let text = unsafe { Detoasted::new(d) };
                let bytes = text.bytes();
                // The database is UTF8 (checked before the call), so text is valid
                // UTF-8; from_utf8 still guards against a corrupt value.
                match std::str::from_utf8(bytes) {
                    Ok(s) => b.append_value(s),
                    Err(_) => b.append_value(String::from_utf8_lossy(bytes)),
                }
                // The detoasted copy (if one was made) is freed here, so a batch of huge
                // values never holds more than one of them.
                return Ok(bytes.len());
            }
            (Builder::Str(b), Reader::Name) => {
                // SAFETY: a name Datum points at a NUL-terminated NameData.
                let s = unsafe { CStr::from_ptr(d.cast_mut_ptr::<std::ffi::c_char>()) };
                b.append_value(s.to_string_lossy());
                return Ok(s.to_bytes().len());
            }
            (Builder::Str(b), Reader::Output(flinfo)) => {
                // SAFETY: flinfo is the type's output function, d a value of the type;
                // the result is a palloc'd C string we free after copying it.
                unsafe {
                    let p = pg_sys::OutputFunctionCall(&mut **flinfo, d);
                    let s = CStr::from_ptr(p);
                    let n = s.to_bytes().len();
                    b.append_value(s.to_string_lossy());
                    pg_sys::pfree(p.cast());
                    return Ok(n);
                }
            }
            (Builder::Bin(b), _) => {
                // SAFETY: per the caller, d is a non-null bytea varlena.
                let value = unsafe { Detoasted::new(d) };
                b.append_value(value.bytes());
                return Ok(value.bytes().len());
            }
            (Builder::Date(b), _) => {
                let days = bits as i32;
                if days == i32::MIN || days == i32::MAX {
                    return Err(infinity(days == i32::MAX));
                }
                // Every finite Postgres date fits after the shift (its range ends well
                // below i32::MAX - EPOCH_DAYS).
                b.append_value(days + EPOCH_DAYS);
            }
            (Builder::Ts(b), _) => {
                let micros = bits as i64;
                if micros == i64::MIN || micros == i64::MAX {
                    return Err(infinity(micros == i64::MAX));
                }
                let unix = micros.checked_add(EPOCH_MICROS).ok_or_else(|| {
                    "is too far in the future for a script's microsecond clock".to_string()
                })?;
                b.append_value(unix);
            }
            (Builder::Time(b), _) => b.append_value(bits as i64),
            (Builder::Interval(b), _) => {
                // SAFETY: an interval Datum points at an Interval.
                let iv = unsafe { &*d.cast_mut_ptr::<pg_sys::Interval>() };
                let nanos = iv.time.checked_mul(1000).ok_or_else(|| {
                    "has a time part too large to count in nanoseconds".to_string()
                })?;
                b.append_value(arrow_buffer::IntervalMonthDayNano::new(
                    iv.month, iv.day, nanos,
                ));
            }
            (Builder::Uuid(b), _) => {
                // SAFETY: a uuid Datum points at 16 bytes (pg_uuid_t).
                let bytes = unsafe { std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16) };
                // Cannot fail: the builder's width is 16 and so is the slice.
                b.append_value(bytes).map_err(|e| e.to_string())?;
            }
            (Builder::Str(_), _) => unreachable!("text builders have text readers"),
        }
        Ok(0)
    }

    fn finish(&mut self) -> ArrayRef {
        match &mut self.builder {
            Builder::Bool(b) => Arc::new(b.finish()),
            Builder::I16(b) => Arc::new(b.finish()),
            Builder::I32(b) => Arc::new(b.finish()),
            Builder::I64(b) => Arc::new(b.finish()),
            Builder::F32(b) => Arc::new(b.finish()),
            Builder::F64(b) => Arc::new(b.finish()),
            Builder::Str(b) => Arc::new(b.finish()),
            Builder::Bin(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
            Builder::Ts(b) => Arc::new(b.finish()),
            Builder::Time(b) => Arc::new(b.finish()),
            Builder::Interval(b) => Arc::new(b.finish()),
            Builder::Uuid(b) => Arc::new(b.finish()),
        }
    }
}

fn infinity(positive: bool) -> ValueError {
    format!(
        "is {}infinity, which pandas and R cannot hold",
        if positive { "" } else { "-" }
    )
}

/// Element layout of an array column, for deconstruct_array.
#[derive(Clone, Copy)]
struct ElemLayout {
    oid: pg_sys::Oid,
    len: i16,
    byval: bool,
    align: std::ffi::c_char,
}

impl ElemLayout {
    fn of(oid: pg_sys::Oid) -> ElemLayout {
        let mut len = 0i16;
        let mut byval = false;
        let mut align: std::ffi::c_char = 0;
        // SAFETY: oid is a valid type oid from a tuple descriptor; the outputs are plain
        // values.
        unsafe { pg_sys::get_typlenbyvalalign(oid, &mut len, &mut byval, &mut align) };
        ElemLayout {
            oid,
            len,
            byval,
            align,
        }
    }
}

/// Appends one-dimensional arrays as an Arrow list column.
struct ListEncoder {
    elem: ScalarEncoder,
    layout: ElemLayout,
    offsets: Vec<i32>,
    validity: NullBufferBuilder,
}

/// The common scalar columns, appended to plain vectors with one match per value and
/// handed to Arrow without a copy: integers, floats, and text-like varlenas (text,
/// varchar, char, json). Text is checked as UTF-8 once per batch instead of once per
/// value; a batch with an invalid value (corrupt storage) falls back to replacing the
/// invalid bytes value by value, exactly as `ScalarEncoder` does. The vectors start each
/// batch with the previous batch's capacity, so they do not grow value by value.
enum FastEncoder {
    I16(Vec<i16>, NullBufferBuilder),
    I32(Vec<i32>, NullBufferBuilder),
    I64(Vec<i64>, NullBufferBuilder),
    F32(Vec<f32>, NullBufferBuilder),
    F64(Vec<f64>, NullBufferBuilder),
    Text {
        offsets: Vec<i32>,
        data: Vec<u8>,
        nulls: NullBufferBuilder,
    },
}

impl FastEncoder {
    /// The fast encoder for a scalar type, if it has one.
    fn new(scalar: Scalar, base_oid: pg_sys::Oid) -> Option<FastEncoder> {
        let nulls = || NullBufferBuilder::new(0);
        Some(match scalar {
            Scalar::Int2 => FastEncoder::I16(Vec::new(), nulls()),
            Scalar::Int4 => FastEncoder::I32(Vec::new(), nulls()),
            Scalar::Int8 => FastEncoder::I64(Vec::new(), nulls()),
            Scalar::Float4 => FastEncoder::F32(Vec::new(), nulls()),
            Scalar::Float8 => FastEncoder::F64(Vec::new(), nulls()),
            // name is a NameData, not a varlena: ScalarEncoder's Reader::Name.
            Scalar::Text | Scalar::Json if base_oid != pg_sys::NAMEOID => FastEncoder::Text {
                offsets: vec![0],
                data: Vec::new(),
                nulls: nulls(),
            },
            _ => return None,
        })
    }

    /// Appends one value or NULL; returns the bytes it added (as `append_column`).
    ///
    /// # Safety
    /// `d` must be a Datum of this encoder's type unless `isnull`.
    #[inline]
    unsafe fn append(&mut self, d: pg_sys::Datum, isnull: bool) -> Result<usize, ValueError> {
        /// NULL slots hold 0, as Arrow's builders leave them.
        #[inline]
        fn push<T: Default>(v: &mut Vec<T>, n: &mut NullBufferBuilder, isnull: bool, x: T) {
            if isnull {
                v.push(T::default());
                n.append_null();
            } else {
                v.push(x);
                n.append_non_null();
            }
        }
        let bits = d.value();
        Ok(match self {
            // By-value types, read from the Datum's bits as Postgres' DatumGet* do.
            FastEncoder::I16(v, n) => {
                push(v, n, isnull, bits as i16);
                3
            }
            FastEncoder::I32(v, n) => {
                push(v, n, isnull, bits as i32);
                5
            }
            FastEncoder::I64(v, n) => {
                push(v, n, isnull, bits as i64);
                9
            }
            FastEncoder::F32(v, n) => {
                push(v, n, isnull, f32::from_bits(bits as u32));
                5
            }
            FastEncoder::F64(v, n) => {
                push(v, n, isnull, f64::from_bits(bits as u64));
                9
            }
            FastEncoder::Text {
                offsets,
                data,
                nulls,
            } => {
                if isnull {
                    offsets.push(*offsets.last().unwrap_or(&0));
                    nulls.append_null();
                    return Ok(5);
                }
                // SAFETY: per the caller, d is a non-null varlena of a text-like type.
                let text = unsafe { Detoasted::new(d) };
                let bytes = text.bytes();
                data.extend_from_slice(bytes);
                let end = i32::try_from(data.len())
                    .map_err(|_| "makes one batch hold more than 2 GB of text".to_string())?;
                offsets.push(end);
                nulls.append_non_null();
                // The detoasted copy (if one was made) is freed here, so a batch of huge
                // values never holds more than one of them.
                5 + bytes.len()
            }
        })
    }

    /// The column as an Arrow array; its vectors move into the array, and `recycle`
    /// takes them back once the batch was encoded.
    fn finish(&mut self) -> ArrayRef {
        use std::mem::take;
        match self {
            FastEncoder::I16(v, n) => {
                Arc::new(arrow_array::Int16Array::new(take(v).into(), n.finish()))
            }
            FastEncoder::I32(v, n) => {
                Arc::new(arrow_array::Int32Array::new(take(v).into(), n.finish()))
            }
            FastEncoder::I64(v, n) => {
                Arc::new(arrow_array::Int64Array::new(take(v).into(), n.finish()))
            }
            FastEncoder::F32(v, n) => {
                Arc::new(arrow_array::Float32Array::new(take(v).into(), n.finish()))
            }
            FastEncoder::F64(v, n) => {
                Arc::new(arrow_array::Float64Array::new(take(v).into(), n.finish()))
            }
            FastEncoder::Text {
                offsets,
                data,
                nulls,
            } => {
                // Offsets start at 0 and never decrease (each is the data length so far).
                let done = OffsetBuffer::new(std::mem::replace(offsets, vec![0]).into());
                text_array(done, take(data), nulls.finish())
            }
        }
    }

    /// Takes back the vectors `finish` moved into `array`, once nothing else holds them,
    /// so that the next batch writes into memory already in use instead of fresh pages
    /// (the kernel zeroes every new page, which cost more than the encoding itself).
    /// Vectors grown past `MAX_KEPT_BYTES` by huge values are let go.
    fn recycle(&mut self, array: ArrayRef) {
        fn back<T: arrow_buffer::ArrowNativeType>(
            into: &mut Vec<T>,
            buffer: Option<arrow_buffer::Buffer>,
        ) {
            let Some(buffer) = buffer else { return };
            if buffer.capacity() > MAX_KEPT_BYTES || !into.is_empty() {
                return;
            }
            if let Ok(mut v) = buffer.into_vec::<T>() {
                v.clear();
                *into = v;
            }
        }
        let data = array.to_data();
        drop(array);
        // Only this function holds the buffers once the array data is dropped.
        let mut buffers = data.buffers().to_vec().into_iter();
        drop(data);
        match self {
            FastEncoder::I16(v, _) => back(v, buffers.next()),
            FastEncoder::I32(v, _) => back(v, buffers.next()),
            FastEncoder::I64(v, _) => back(v, buffers.next()),
            FastEncoder::F32(v, _) => back(v, buffers.next()),
            FastEncoder::F64(v, _) => back(v, buffers.next()),
            FastEncoder::Text { offsets, data, .. } => {
                if offsets.len() == 1 {
                    offsets.clear();
                    back(offsets, buffers.next());
                    if offsets.is_empty() {
                        offsets.push(0);
                    }
                }
                back(data, buffers.next());
            }
        }
    }
}

enum ColumnEncoder {
    Scalar(ScalarEncoder),
    List(ListEncoder),
    Fast(FastEncoder),
}

struct InCol {
    attno: i32,
    name: String,
    type_name: String,
    encoder: ColumnEncoder,
}

/// Accumulates input rows into Arrow builders.
pub struct InputEncoder {
    /// What the rows come from, for messages: "the input query", "the loopback query".
    source: &'static str,
    schema: SchemaRef,
    cols: Vec<InCol>,
    rows: usize,
    bytes: usize,
    /// Per-row buffers for heap_deform_tuple.
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    /// The last frame sent, to write the next one into.
    spare_frame: Vec<u8>,
}

impl InputEncoder {
    /// Plans the encoding of the input query's columns.
    ///
    /// # Safety
    /// `tupdesc` must be a valid tuple descriptor.
    pub unsafe fn new(
        tupdesc: pg_sys::TupleDesc,
        source: &'static str,
    ) -> Result<InputEncoder, CallError> {
        // SAFETY: forwarded from the caller.
        let attrs = unsafe { attributes(tupdesc) };
        let mut fields = Vec::with_capacity(attrs.len());
        let mut cols = Vec::with_capacity(attrs.len());
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(attrs.len());
        for a in &attrs {
            if let Some(&first) = seen.get(a.name.as_str()) {
                return Err(CallError::DuplicateInputColumn {
                    source,
                    name: a.name.clone(),
                    first,
                    second: a.number,
                });
            }
            seen.insert(&a.name, a.number);
            let Some(r) = resolve(a.typoid) else {
                return Err(CallError::UnsupportedInputType {
                    source,
                    column: a.number,
                    name: a.name.clone(),
                    type_name: type_name(a.typoid, a.typmod),
                });
            };
            let scalar = ScalarEncoder::new(r.pg.scalar, r.scalar_oid);
            let value_type = wire_type(r.pg.scalar);
            let (dt, encoder) = if r.pg.array {
                let item = Field::new("item", value_type, true);
                (
                    DataType::List(Arc::new(item)),
                    ColumnEncoder::List(ListEncoder {
                        elem: scalar,
                        layout: ElemLayout::of(r.elem_oid),
                        offsets: vec![0],
                        validity: NullBufferBuilder::new(0),
                    }),
                )
            } else {
                let encoder = match FastEncoder::new(r.pg.scalar, r.scalar_oid) {
                    Some(fast) => ColumnEncoder::Fast(fast),
                    None => ColumnEncoder::Scalar(scalar),
                };
                (value_type, encoder)
            };
            let metadata = HashMap::from([(TYPE_METADATA_KEY.to_string(), r.pg.to_string())]);
            fields.push(Field::new(a.name.clone(), dt, true).with_metadata(metadata));
            cols.push(InCol {
                attno: a.number as i32,
                name: a.name.clone(),
                type_name: type_name(a.typoid, a.typmod),
                encoder,
            });
        }
        Ok(InputEncoder {
            source,
            schema: Arc::new(Schema::new(fields)),
            cols,
            rows: 0,
            bytes: 0,
            values: Vec::new(),
            nulls: Vec::new(),
            spare_frame: Vec::new(),
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// About how many bytes the buffered rows take; callers flush early past a
    /// threshold.
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }

    /// Appends one tuple. `row` numbers it (from 1) for messages.
    ///
    /// # Safety
    /// `tuple` must be a valid heap tuple described by `tupdesc`, the descriptor this
    /// encoder was planned from.
    pub unsafe fn append(
        &mut self,
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
        row: u64,
    ) -> Result<(), CallError> {
        // One deform per row (not one lookup per column): every attribute's Datum at once.
        // SAFETY: tupdesc is valid per the caller.
        let natts = unsafe { (*tupdesc).natts } as usize;
        if self.values.len() < natts {
            self.values.resize(natts, pg_sys::Datum::from(0usize));
            self.nulls.resize(natts, true);
        }
        // SAFETY: tuple is described by tupdesc; the buffers hold natts entries.
        unsafe {
            pg_sys::heap_deform_tuple(
                tuple,
                tupdesc,
                self.values.as_mut_ptr(),
                self.nulls.as_mut_ptr(),
            )
        };
        let (values, nulls) = (
            std::mem::take(&mut self.values),
            std::mem::take(&mut self.nulls),
        );
        // SAFETY: heap_deform_tuple filled natts entries of each from the tuple.
        let appended = unsafe { self.append_datums(&values[..natts], &nulls[..natts], row) };
        (self.values, self.nulls) = (values, nulls);
        appended
    }

    /// Appends one row given as its Datums (a slot's `tts_values` and `tts_isnull`, or a
    /// deformed tuple). `row` numbers it (from 1) for messages.
    ///
    /// # Safety
    /// `values` and `nulls` must hold one entry per attribute of the descriptor this
    /// encoder was planned from, each Datum of its attribute's type unless NULL.
    pub unsafe fn append_datums(
        &mut self,
        values: &[pg_sys::Datum],
        nulls: &[bool],
        row: u64,
    ) -> Result<(), CallError> {
        for col in &mut self.cols {
            let i = col.attno as usize - 1;
            let (d, isnull) = (values[i], nulls[i]);
            // SAFETY: d is a Datum of the column's type (or isnull).
            let added = unsafe { append_column(&mut col.encoder, d, isnull) };
            match added {
                Ok(n) => self.bytes += n,
                Err(reason) => {
                    return Err(CallError::InputValue {
                        source: self.source,
                        column: col.attno as usize,
                        name: col.name.clone(),
                        row,
                        type_name: col.type_name.clone(),
                        reason,
                    })
                }
            }
        }
        self.rows += 1;
        Ok(())
    }

    /// Emits the buffered rows as one Arrow frame (schema, batch, end marker) and resets.
    pub fn finish_frame(&mut self) -> Result<Vec<u8>, CallError> {
        let arrays: Vec<ArrayRef> = self
            .cols
            .iter_mut()
            .zip(self.schema.fields())
            .map(|(col, field)| -> Result<ArrayRef, CallError> {
                Ok(match &mut col.encoder {
                    ColumnEncoder::Scalar(s) => s.finish(),
                    ColumnEncoder::Fast(f) => f.finish(),
                    ColumnEncoder::List(l) => {
                        let values = l.elem.finish();
                        let offsets = std::mem::replace(&mut l.offsets, vec![0]);
                        let DataType::List(item) = field.data_type() else {
                            unreachable!("list encoders have list fields")
                        };
                        Arc::new(
                            ListArray::try_new(
                                item.clone(),
                                OffsetBuffer::new(offsets.into()),
                                values,
                                l.validity.finish(),
                            )
                            .map_err(|e| internal(format!("building an input list: {e}")))?,
                        )
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(self.rows));
        let batch = RecordBatch::try_new_with_options(self.schema.clone(), arrays, &options)
            .map_err(|e| internal(format!("building an input batch: {e}")))?;
        self.rows = 0;
        self.bytes = 0;
        let frame = encode_batch_into(&batch, std::mem::take(&mut self.spare_frame))?;
        let (_, arrays, _) = batch.into_parts();
        for (col, array) in self.cols.iter_mut().zip(arrays) {
            if let ColumnEncoder::Fast(f) = &mut col.encoder {
                f.recycle(array);
            }
        }
        Ok(frame)
    }

    /// Takes back a frame `finish_frame` returned, once it was sent, to write the next
    /// one into (see `FastEncoder::recycle`).
    pub fn reuse_frame(&mut self, frame: Vec<u8>) {
        if frame.capacity() <= MAX_KEPT_BYTES {
            self.spare_frame = frame;
        }
    }
}

/// A utf8 array of text-like values, checked as UTF-8 as a whole; if that fails (only a
/// corrupt value can), each value's invalid bytes are replaced, as `ScalarEncoder` does.
fn text_array(offsets: OffsetBuffer<i32>, data: Vec<u8>, nulls: Option<NullBuffer>) -> ArrayRef {
    let data = arrow_buffer::Buffer::from_vec(data);
    match arrow_array::StringArray::try_new(offsets.clone(), data.clone(), nulls.clone()) {
        Ok(array) => Arc::new(array),
        Err(_) => {
            let raw = arrow_array::BinaryArray::new(offsets, data, nulls);
            let mut b = StringBuilder::with_capacity(raw.len(), raw.values().len());
            for v in raw.iter() {
                match v {
                    Some(bytes) => b.append_value(String::from_utf8_lossy(bytes)),
                    None => b.append_null(),
                }
            }
            Arc::new(b.finish())
        }
    }
}

/// Appends one value (or NULL) of a column; returns the bytes it added.
///
/// # Safety
/// `d` must be a Datum of the column's type unless `isnull`.
unsafe fn append_column(
    encoder: &mut ColumnEncoder,
    d: pg_sys::Datum,
    isnull: bool,
) -> Result<usize, ValueError> {
    match encoder {
        // SAFETY: forwarded from the caller.
        ColumnEncoder::Fast(f) => unsafe { f.append(d, isnull) },
        ColumnEncoder::Scalar(s) => {
            if isnull {
                s.append_null();
                return Ok(s.fixed_bytes());
            }
            // SAFETY: forwarded from the caller.
            Ok(s.fixed_bytes() + unsafe { s.append(d) }?)
        }
        ColumnEncoder::List(l) => {
            if isnull {
                l.offsets.push(*l.offsets.last().unwrap_or(&0));
                l.validity.append_null();
                return Ok(5);
            }
            // SAFETY: d is a non-null array Datum; pg_detoast_datum returns it or a
            // palloc'd detoasted copy with a full header, which ARR_NDIM and friends need.
            let arr =
                unsafe { pg_sys::pg_detoast_datum(d.cast_mut_ptr()) } as *mut pg_sys::ArrayType;
            // SAFETY: arr is a detoasted array; its dims and lower bounds follow the
            // header (ARR_DIMS, ARR_LBOUND).
            let (ndim, lbound) = unsafe {
                let ndim = (*arr).ndim;
                let dims = arr.add(1) as *const i32;
                let lbound = if ndim > 0 {
                    *dims.add(ndim as usize)
                } else {
                    1
                };
                (ndim, lbound)
            };
            if ndim > 1 {
                return Err(format!(
                    "has {ndim} dimensions (scripts get one-dimensional arrays)"
                ));
            }
            if lbound != 1 {
                return Err(format!(
                    "starts at index {lbound} (scripts get arrays that start at 1)"
                ));
            }
            let mut elems: *mut pg_sys::Datum = std::ptr::null_mut();
            let mut nulls: *mut bool = std::ptr::null_mut();
            let mut n = 0i32;
            // SAFETY: arr is a valid array of the layout's element type; the outputs are
            // palloc'd arrays of n entries in the current (per-batch) memory context.
            unsafe {
                pg_sys::deconstruct_array(
                    arr,
                    l.layout.oid,
                    l.layout.len.into(),
                    l.layout.byval,
                    l.layout.align,
                    &mut elems,
                    &mut nulls,
                    &mut n,
                )
            };
            let mut bytes = 5;
            for i in 0..n as usize {
                // SAFETY: i < n, the length deconstruct_array gave for both arrays.
                let (e, null) = unsafe { (*elems.add(i), *nulls.add(i)) };
                if null {
                    l.elem.append_null();
                } else {
                    // SAFETY: e is a non-null element of the array's element type.
                    bytes += unsafe { l.elem.append(e) }?;
                }
                bytes += l.elem.fixed_bytes();
            }
            let last = *l.offsets.last().unwrap_or(&0);
            let next = last
                .checked_add(n)
                .ok_or("makes one batch hold more than 2^31 array elements")?;
            l.offsets.push(next);
            l.validity.append_non_null();
            Ok(bytes)
        }
    }
}

fn internal(message: String) -> CallError {
    CallError::Internal { message }
}

/// Encodes a batch as a complete Arrow frame, written in place after the frame header,
/// into `buf` (cleared first) when it has room.
fn encode_batch_into(batch: &RecordBatch, mut buf: Vec<u8>) -> Result<Vec<u8>, CallError> {
    let header = airlock_protocol::begin_frame(airlock_protocol::FrameKind::Arrow, 0);
    let want = header.len() + batch.get_array_memory_size() + 1024;
    if buf.capacity() < want {
        buf = Vec::with_capacity(want);
    }
    buf.clear();
    buf.extend_from_slice(&header);
    let mut w = arrow_ipc::writer::StreamWriter::try_new(buf, &batch.schema())
        .map_err(|e| internal(format!("encoding a batch: {e}")))?;
    w.write(batch)
        .map_err(|e| internal(format!("encoding a batch: {e}")))?;
    w.finish()
        .map_err(|e| internal(format!("encoding a batch: {e}")))?;
    let mut buf = w
        .into_inner()
        .map_err(|e| internal(format!("encoding a batch: {e}")))?;
    airlock_protocol::finish_frame(&mut buf).map_err(|e| internal(e.to_string()))?;
    Ok(buf)
}

/// A varlena value, detoasted; a copy made for it is freed on drop.
struct Detoasted {
    original: *mut pg_sys::varlena,
    value: *mut pg_sys::varlena,
}

impl Detoasted {
    /// # Safety
    /// `d` must be a non-null varlena Datum that stays valid while this value lives.
    unsafe fn new(d: pg_sys::Datum) -> Detoasted {
        let original = d.cast_mut_ptr::<pg_sys::varlena>();
        // SAFETY: per the caller, d is a varlena. An inline, uncompressed value (the
        // common case) is used where it is, as pg_detoast_datum_packed would return it,
        // without a call into Postgres; a compressed or external one is detoasted into a
        // palloc'd copy.
        let value = unsafe {
            if pgrx::varlena::varatt_is_1b_e(original) || pgrx::varlena::varatt_is_4b_c(original) {
                pg_sys::pg_detoast_datum_packed(original)
            } else {
                original
            }
        };
        Detoasted { original, value }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: value is a valid (possibly short-header) varlena for self's lifetime;
        // pgrx's helpers read its header to find the data and length.
        unsafe {
            let len = pgrx::varlena::varsize_any_exhdr(self.value);
            let data = pgrx::varlena::vardata_any(self.value) as *const u8;
            std::slice::from_raw_parts(data, len)
        }
    }
}

impl Drop for Detoasted {
    fn drop(&mut self) {
        if self.value != self.original {
            // SAFETY: a different pointer is the copy pg_detoast_datum_packed palloc'd
            // for us; nothing else refers to it.
            unsafe { pg_sys::pfree(self.value.cast()) };
        }
    }
}

// --- Output: Arrow to Datums --------------------------------------------------------

/// How values of one scalar type are made from the runtime's Arrow values.
struct ScalarTarget {
    scalar: Scalar,
    /// Input function and its I/O parameter, for utf8 into a non-text type.
    input: Option<(Box<pg_sys::FmgrInfo>, pg_sys::Oid)>,
    /// The length coercion for a declared typmod (varchar(n), numeric(p,s),
    /// timestamp(p), …), applied to every value as an assignment would.
    typmod: Option<(pg_sys::Oid, i32)>,
}

impl ScalarTarget {
    fn new(scalar: Scalar, oid: pg_sys::Oid, typmod: i32) -> ScalarTarget {
        let input = (scalar != Scalar::Text || oid == pg_sys::NAMEOID).then(|| {
            let mut func = pg_sys::Oid::INVALID;
            let mut ioparam = pg_sys::Oid::INVALID;
            let mut flinfo = Box::new(pg_sys::FmgrInfo::default());
            // SAFETY: oid is a valid base type oid; fmgr_info fills the boxed FmgrInfo,
            // which stays at one address while it is used.
            unsafe {
                pg_sys::getTypeInputInfo(oid, &mut func, &mut ioparam);
                pg_sys::fmgr_info(func, &mut *flinfo);
            }
            (flinfo, ioparam)
        });
        let typmod = (typmod >= 0)
            .then(|| {
                let mut func = pg_sys::Oid::INVALID;
                // SAFETY: a syscache lookup on a valid type oid.
                let path = unsafe { pg_sys::find_typmod_coercion_function(oid, &mut func) };
                (path == pg_sys::CoercionPathType::COERCION_PATH_FUNC).then_some((func, typmod))
            })
            .flatten();
        ScalarTarget {
            scalar,
            input,
            typmod,
        }
    }
}

struct OutCol {
    number: usize,
    name: String,
    declared: String,
    pg: PgType,
    target: ScalarTarget,
    /// For arrays: the element type's layout, for construct_md_array.
    layout: Option<ElemLayout>,
    /// Set when the declared type is a domain: its constraints are checked on every
    /// value (NULL included), with domain_check's cache.
    domain: Option<(pg_sys::Oid, *mut std::ffi::c_void)>,
}

/// Checks and converts the runtime's output against the caller's column definition list.
pub struct OutputDecoder {
    cols: Vec<OutCol>,
    checked: bool,
    max_batch_rows: usize,
    /// Where domain_check keeps its per-column cache: the query's memory context.
    cache_cx: pg_sys::MemoryContext,
    /// Vectors for converting columns whole, reused from chunk to chunk.
    pool: Pool,
}

/// Arrow type names as a pandas or R user knows them.
fn produced_name(dt: &DataType) -> String {
    match dt {
        DataType::Boolean => "bool".into(),
        DataType::Int8 => "int8 (numpy)".into(),
        DataType::Int16 => "int16".into(),
        DataType::Int32 => "int32".into(),
        DataType::Int64 => "int64".into(),
        DataType::UInt8 => "uint8".into(),
        DataType::UInt16 => "uint16".into(),
        DataType::UInt32 => "uint32".into(),
        DataType::UInt64 => "uint64".into(),
        DataType::Float16 => "float16".into(),
        DataType::Float32 => "float32".into(),
        DataType::Float64 => "float64".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "string".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "bytes".into(),
        DataType::FixedSizeBinary(n) => format!("bytes of width {n}"),
        DataType::Null => "all missing (None)".into(),
        DataType::Timestamp(_, None) => "datetime64".into(),
        DataType::Timestamp(_, Some(tz)) => format!("datetime64 with time zone {tz}"),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Time32(_) | DataType::Time64(_) => "time".into(),
        DataType::Duration(_) => "timedelta".into(),
        DataType::Interval(_) => "interval (DateOffset)".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("decimal({p},{s})"),
        DataType::List(f) | DataType::LargeList(f) => {
            format!("list of {}", produced_name(f.data_type()))
        }
        DataType::Struct(_) => "struct (dict)".into(),
        other => other.to_string(),
    }
}

fn is_int(dt: &DataType) -> bool {
    use DataType as D;
    matches!(
        dt,
        D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64
    )
}

fn is_str(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    )
}

/// Whether a declared scalar type takes values of Arrow type `dt` (docs/TYPES.md, "Out
/// of the script").
fn accepts_scalar(scalar: Scalar, dt: &DataType) -> bool {
    use DataType as D;
    if matches!(dt, D::Null) {
        return true;
    }
    // Text into any type goes through the type's input function.
    if is_str(dt) {
        return true;
    }
    match scalar {
        Scalar::Bool => matches!(dt, D::Boolean),
        Scalar::Int2 | Scalar::Int4 | Scalar::Int8 => is_int(dt),
        Scalar::Float4 | Scalar::Float8 => is_int(dt) || matches!(dt, D::Float32 | D::Float64),
        Scalar::Numeric => {
            is_int(dt)
                || matches!(
                    dt,
                    D::Float32 | D::Float64 | D::Decimal128(..) | D::Decimal256(..)
                )
        }
        Scalar::Text | Scalar::Json | Scalar::Jsonb => false,
        Scalar::Bytea => matches!(dt, D::Binary | D::LargeBinary | D::FixedSizeBinary(_)),
        Scalar::Date => matches!(dt, D::Date32 | D::Date64),
        Scalar::Timestamp | Scalar::Timestamptz => matches!(dt, D::Timestamp(..)),
        Scalar::Time => matches!(dt, D::Time32(_) | D::Time64(_)),
        Scalar::Interval => matches!(
            dt,
            D::Interval(arrow_schema::IntervalUnit::MonthDayNano) | D::Duration(_)
        ),
        Scalar::Uuid => matches!(dt, D::FixedSizeBinary(16)),
    }
}

fn accepts(pg: PgType, dt: &DataType) -> bool {
    if !pg.array {
        return accepts_scalar(pg.scalar, dt);
    }
    match dt {
        DataType::Null => true,
        DataType::List(item) | DataType::LargeList(item) => {
            accepts_scalar(pg.scalar, item.data_type())
        }
        // Text into an array type: array_in, e.g. '{1,2,3}'.
        dt => is_str(dt),
    }
}

impl OutputDecoder {
    /// Plans the conversion for the declared columns. Batches of more than
    /// `max_batch_rows` rows are refused (the runtime was told the limit).
    ///
    /// # Safety
    /// `tupdesc` must be a valid tuple descriptor and `cache_cx` a memory context that
    /// outlives this decoder.
    pub unsafe fn new(
        tupdesc: pg_sys::TupleDesc,
        max_batch_rows: usize,
        cache_cx: pg_sys::MemoryContext,
    ) -> Result<OutputDecoder, CallError> {
        // SAFETY: forwarded from the caller.
        let attrs = unsafe { attributes(tupdesc) };
        let mut cols = Vec::with_capacity(attrs.len());
        for a in attrs {
            let declared = type_name(a.typoid, a.typmod);
            let Some(r) = resolve(a.typoid) else {
                return Err(CallError::UnsupportedOutputType {
                    column: a.number,
                    name: a.name,
                    type_name: declared,
                });
            };
            let is_domain = base_type(a.typoid) != a.typoid;
            cols.push(OutCol {
                number: a.number,
                name: a.name,
                declared,
                pg: r.pg,
                // An array's typmod applies to its elements.
                target: ScalarTarget::new(r.pg.scalar, r.scalar_oid, a.typmod),
                layout: r.pg.array.then(|| ElemLayout::of(r.elem_oid)),
                domain: is_domain.then_some((a.typoid, std::ptr::null_mut())),
            });
        }
        Ok(OutputDecoder {
            cols,
            checked: false,
            max_batch_rows,
            cache_cx,
            pool: Vec::new(),
        })
    }

    /// The declared columns, as the runtime is told them.
    pub fn columns(&self) -> Vec<airlock_protocol::data::OutputColumn> {
        self.cols
            .iter()
            .map(|c| airlock_protocol::data::OutputColumn {
                name: c.name.clone(),
                pg_type: c.pg,
            })
            .collect()
    }

    /// Checks one batch's schema against the declared columns.
    pub fn check_schema(&mut self, schema: &Schema) -> Result<(), CallError> {
        if schema.fields().len() != self.cols.len() {
            return Err(CallError::ColumnCount {
                produced: schema.fields().len(),
                declared: self.cols.len(),
            });
        }
        for (col, field) in self.cols.iter().zip(schema.fields()) {
            if !accepts(col.pg, field.data_type()) {
                return Err(CallError::ColumnType {
                    column: col.number,
                    name: field.name().clone(),
                    produced: produced_name(field.data_type()),
                    declared: col.declared.clone(),
                });
            }
        }
        self.checked = true;
        Ok(())
    }

    /// Appends every row of `batch` to `tupstore`. `first_row` numbers rows in messages.
    ///
    /// # Safety
    /// `tupstore` and `tupdesc` must be the valid tuplestore and descriptor of this call.
    pub unsafe fn put_batch(
        &mut self,
        batch: &RecordBatch,
        tupstore: *mut pg_sys::Tuplestorestate,
        tupdesc: pg_sys::TupleDesc,
        first_row: u64,
    ) -> Result<(), CallError> {
        if !self.checked {
            self.check_schema(&batch.schema())?;
        }
        if batch.num_rows() > self.max_batch_rows {
            // A batch must not make the backend loop without end: a Null column of any
            // length costs the sender nothing.
            return Err(CallError::Protocol {
                peer: crate::channel::Peer::Runtime,
                message: format!(
                    "an output batch of {} rows exceeds the limit of {} rows",
                    batch.num_rows(),
                    self.max_batch_rows
                ),
            });
        }
        // In chunks of about CHUNK_CELLS values: the converted columns of a chunk stay in
        // cache while its rows are formed, and a wide batch never needs more than that.
        let chunk = (CHUNK_CELLS / self.cols.len().max(1)).max(1);
        let mut start = 0;
        while start < batch.num_rows() {
            let len = chunk.min(batch.num_rows() - start);
            // SAFETY: forwarded from the caller.
            unsafe {
                self.put_rows(
                    &batch.slice(start, len),
                    tupstore,
                    tupdesc,
                    first_row + start as u64,
                )
            }?;
            start += len;
        }
        Ok(())
    }

    /// `put_batch` for one chunk of rows.
    ///
    /// # Safety
    /// As `put_batch`; the batch's schema was checked.
    unsafe fn put_rows(
        &mut self,
        batch: &RecordBatch,
        tupstore: *mut pg_sys::Tuplestorestate,
        tupdesc: pg_sys::TupleDesc,
        first_row: u64,
    ) -> Result<(), CallError> {
        let n = self.cols.len();
        let mut values = vec![pg_sys::Datum::from(0usize); n];
        let mut nulls = vec![false; n];
        let cache_cx = self.cache_cx;
        // Errors Postgres raises while converting (input functions, domain checks,
        // length coercions) are caught and raised again saying where the value was.
        let position = std::panic::AssertUnwindSafe(std::cell::Cell::new((0usize, 0u64)));
        // The common columns are converted whole, ahead of the rows, from their typed
        // buffers (see `Decoded`); the others value by value in the row loop.
        let pool = &mut self.pool;
        let mut decoded: Vec<Option<Decoded>> = self
            .cols
            .iter()
            .zip(batch.columns())
            // SAFETY: every column was checked against its declared type; the Datums
            // are made in the current (per-batch) memory context, which outlives the
            // loop.
            .map(|(col, array)| unsafe { Decoded::of(col, array, pool) })
            .collect();
        let no_domains = self.cols.iter().all(|c| c.domain.is_none());
        let cols = &mut self.cols;
        let converted =
            pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| -> Result<(), CallError> {
                // When every column was converted whole and none is a domain, the rows
                // before the first failed value only need their Datums gathered.
                let whole: Option<Vec<(&[pg_sys::Datum], &[bool])>> = if no_domains {
                    decoded
                        .iter()
                        .map(|d| d.as_ref().map(|d| (&d.values[..], &d.nulls[..])))
                        .collect()
                } else {
                    None
                };
                let clean_rows = match &whole {
                    Some(_) => decoded
                        .iter()
                        .flatten()
                        .filter_map(|d| d.error.as_ref().map(|(row, _)| *row))
                        .min()
                        .unwrap_or(batch.num_rows()),
                    None => 0,
                };
                if let Some(whole) = &whole {
                    let last = whole.len().saturating_sub(1);
                    for row in 0..clean_rows {
                        if row % 4096 == 4095 {
                            pgrx::check_for_interrupts!();
                        }
                        position.set((last, first_row + row as u64 + 1));
                        for (c, (v, n)) in whole.iter().enumerate() {
                            values[c] = v[row];
                            nulls[c] = n[row];
                        }
                        // SAFETY: as below.
                        unsafe {
                            pg_sys::tuplestore_putvalues(
                                tupstore,
                                tupdesc,
                                values.as_mut_ptr(),
                                nulls.as_mut_ptr(),
                            )
                        };
                    }
                }
                drop(whole);
                for row in clean_rows..batch.num_rows() {
                    if row % 4096 == 4095 {
                        pgrx::check_for_interrupts!();
                    }
                    let row_number = first_row + row as u64 + 1;
                    for (c, col) in cols.iter_mut().enumerate() {
                        position.set((c, row_number));
                        let value = match decoded[c].as_mut() {
                            Some(dec) => dec.value(row),
                            // SAFETY: the column was checked against the declared type.
                            None => unsafe { column_datum(col, batch.column(c), row) },
                        }
                        .map_err(|e| e.at(col, row_number))?;
                        (values[c], nulls[c]) = match value {
                            Some(d) => (d, false),
                            None => (pg_sys::Datum::from(0usize), true),
                        };
                        if let Some((domain, extra)) = col.domain.as_mut() {
                            // SAFETY: the Datum is of the domain's base type (or NULL);
                            // the cache pointer starts NULL and domain_check keeps its
                            // cache in cache_cx, which outlives the decoder. A violated
                            // constraint raises the domain's own ERROR.
                            unsafe {
                                pg_sys::domain_check(values[c], nulls[c], *domain, extra, cache_cx)
                            };
                        }
                    }
                    // SAFETY: values/nulls have one entry per attribute of tupdesc, each
                    // Datum of that attribute's type; tuplestore_putvalues copies the
                    // tuple.
                    unsafe {
                        pg_sys::tuplestore_putvalues(
                            tupstore,
                            tupdesc,
                            values.as_mut_ptr(),
                            nulls.as_mut_ptr(),
                        )
                    };
                }
                Ok(())
            }))
            .catch_others(|e| match e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(report) => {
                    let (c, row) = position.get();
                    Err(CallError::AtOutputValue {
                        code: report.sql_error_code(),
                        message: report.message().to_owned(),
                        detail: report.detail().map(str::to_owned),
                        hint: report.hint().map(str::to_owned),
                        row,
                        column: c,
                    })
                }
                other => other.rethrow(),
            })
            .execute();
        for d in decoded.into_iter().flatten() {
            self.pool.push((d.values, d.nulls));
        }
        converted.map_err(|e| match e {
            CallError::AtOutputValue {
                code,
                message,
                detail,
                hint,
                row,
                column,
            } => {
                let col = &self.cols[column];
                let place = format!(
                    "In row {row} of the script's output, column {} (\"{}\", {}).",
                    col.number, col.name, col.declared
                );
                CallError::Postgres {
                    code,
                    message,
                    detail: Some(match detail {
                        Some(d) if !d.is_empty() => format!("{d}\n{place}"),
                        _ => place,
                    }),
                    hint,
                }
            }
            other => other,
        })
    }
}

/// Why one output value cannot become a Datum, before we know where it was.
enum OutError {
    /// The value (printed) does not fit the declared type.
    Range(String),
    /// Text with a NUL character.
    Nul,
}

impl OutError {
    fn at(self, col: &OutCol, row: u64) -> CallError {
        match self {
            OutError::Range(value) => CallError::ValueOutOfRange {
                column: col.number,
                name: col.name.clone(),
                row,
                value,
                declared: col.declared.clone(),
            },
            OutError::Nul => CallError::InvalidText {
                column: col.number,
                name: col.name.clone(),
                row,
                reason: "contains a NUL character, which Postgres text cannot hold",
            },
        }
    }
}

/// An output column converted whole, before the row loop, straight from its typed Arrow
/// buffers: integers into integer columns (range-checked), floats into float columns of
/// the same width, bools, and utf8 into plain text columns (all of a batch's text values
/// in one allocation). These conversions never call into Postgres for a value, so the
/// first value that fails is kept and reported when the row loop reaches it: errors come
/// in the same order as value by value. Everything else (typmods, arrays, input
/// functions, other Arrow types) takes the general path ([`column_datum`]).
/// Vectors of earlier chunks, for `Decoded` to fill again instead of allocating.
type Pool = Vec<(Vec<pg_sys::Datum>, Vec<bool>)>;

struct Decoded {
    values: Vec<pg_sys::Datum>,
    nulls: Vec<bool>,
    /// The first value that cannot be converted: its row in the batch, and why.
    error: Option<(usize, OutError)>,
}

impl Decoded {
    /// Converts `array` whole if its kind allows, else None.
    ///
    /// # Safety
    /// The array's type must have been accepted for the column by `check_schema`. Text
    /// values are palloc'd in the current memory context.
    unsafe fn of(col: &OutCol, array: &ArrayRef, pool: &mut Pool) -> Option<Decoded> {
        if col.layout.is_some() || col.target.typmod.is_some() {
            return None;
        }
        use DataType as D;
        let target = col.target.scalar;
        match (target, array.data_type()) {
            (Scalar::Int2 | Scalar::Int4 | Scalar::Int8, D::Int64) => Some(Decoded::ints(
                target,
                array,
                array.as_primitive::<Int64Type>().values(),
                pool,
            )),
            (Scalar::Int2 | Scalar::Int4 | Scalar::Int8, D::Int32) => Some(Decoded::ints(
                target,
                array,
                array.as_primitive::<Int32Type>().values(),
                pool,
            )),
            (Scalar::Int2 | Scalar::Int4 | Scalar::Int8, D::Int16) => Some(Decoded::ints(
                target,
                array,
                array.as_primitive::<Int16Type>().values(),
                pool,
            )),
            (Scalar::Float8, D::Float64) => Some(Decoded::each(
                array,
                array.as_primitive::<Float64Type>().values(),
                |v| Ok(pg_sys::Datum::from(v.to_bits())),
                pool,
            )),
            (Scalar::Float4, D::Float32) => Some(Decoded::each(
                array,
                array.as_primitive::<Float32Type>().values(),
                |v| Ok(pg_sys::Datum::from(v.to_bits() as u64)),
                pool,
            )),
            (Scalar::Bool, D::Boolean) => {
                let bools = array.as_boolean().values();
                let mut dec = Decoded::with_nulls(array, pool);
                dec.values
                    .extend((0..array.len()).map(|i| pg_sys::Datum::from(bools.value(i))));
                Some(dec)
            }
            // Plain text (no input function: not name; no typmod: checked above).
            (Scalar::Text, D::Utf8) if col.target.input.is_none() => {
                // SAFETY: forwarded from the caller.
                unsafe { Decoded::texts(array.as_string::<i32>(), pool) }
            }
            _ => None,
        }
    }

    /// Nulls from the array's validity, values (empty) still to fill; both vectors
    /// from the pool when it has some.
    fn with_nulls(array: &dyn Array, pool: &mut Pool) -> Decoded {
        let (mut values, mut nulls) = pool.pop().unwrap_or_default();
        values.clear();
        values.reserve(array.len());
        nulls.clear();
        match array.nulls() {
            Some(n) => nulls.extend(n.iter().map(|valid| !valid)),
            None => nulls.resize(array.len(), false),
        }
        Decoded {
            values,
            nulls,
            error: None,
        }
    }

    /// Each non-null value through `f`; NULL slots hold 0.
    fn each<T: Copy>(
        array: &dyn Array,
        values: &[T],
        f: impl Fn(T) -> Result<pg_sys::Datum, OutError>,
        pool: &mut Pool,
    ) -> Decoded {
        let mut dec = Decoded::with_nulls(array, pool);
        let mut out = std::mem::take(&mut dec.values);
        for (i, &v) in values.iter().enumerate() {
            if dec.nulls[i] {
                out.push(pg_sys::Datum::from(0usize));
                continue;
            }
            match f(v) {
                Ok(d) => out.push(d),
                Err(e) => {
                    // Rows from here on are never read: the row loop stops at this one.
                    dec.error = Some((i, e));
                    out.resize(values.len(), pg_sys::Datum::from(0usize));
                    break;
                }
            }
        }
        dec.values = out;
        dec
    }

    /// Integers into an integer column, each range-checked for the declared width.
    fn ints<T: Copy + Into<i64>>(
        target: Scalar,
        array: &dyn Array,
        values: &[T],
        pool: &mut Pool,
    ) -> Decoded {
        // The same range check as the general path's (`int_datum`).
        let wide = |v: T| i128::from(v.into());
        match target {
            Scalar::Int2 => Decoded::each(array, values, |v| int_datum::<i16>(wide(v)), pool),
            Scalar::Int4 => Decoded::each(array, values, |v| int_datum::<i32>(wide(v)), pool),
            _ => Decoded::each(array, values, |v| Ok(pg_sys::Datum::from(v.into())), pool),
        }
    }

    /// Utf8 into text: every value of the batch becomes a varlena in one palloc'd block.
    /// None (the general path) if the block would be too large for one allocation.
    ///
    /// # Safety
    /// Allocates in the current memory context.
    unsafe fn texts(array: &arrow_array::StringArray, pool: &mut Pool) -> Option<Decoded> {
        const HDR: usize = pg_sys::VARHDRSZ;
        let mut dec = Decoded::with_nulls(array, pool);
        let n = array.len();
        let offsets = array.value_offsets();
        let bytes = array.value_data();
        // Every value starts 4-aligned, as a palloc'd varlena with a 4-byte header would.
        let mut total = 0usize;
        for i in 0..n {
            if !dec.nulls[i] {
                let len = (offsets[i + 1] - offsets[i]) as usize;
                total += (HDR + len).next_multiple_of(4);
            }
        }
        if total >= MAX_ALLOC_SIZE {
            pool.push((dec.values, dec.nulls));
            return None;
        }
        // Text cannot hold NUL; look for one in all the values at once, and per value
        // only if there is one.
        let used = &bytes[offsets[0] as usize..offsets[n] as usize];
        let any_nul = used.contains(&0);
        // SAFETY: palloc of `total` bytes (below MaxAllocSize) in the current context;
        // at least 1 so the pointer is valid even when every value is NULL.
        let block = unsafe { pg_sys::palloc(total.max(1)) } as *mut u8;
        let mut at = 0usize;
        for i in 0..n {
            if dec.nulls[i] {
                dec.values.push(pg_sys::Datum::from(0usize));
                continue;
            }
            let value = &bytes[offsets[i] as usize..offsets[i + 1] as usize];
            if any_nul && value.contains(&0) {
                dec.error = Some((i, OutError::Nul));
                dec.values.resize(n, pg_sys::Datum::from(0usize));
                break;
            }
            // SAFETY: `at + HDR + len` is within the block (the sizes summed above, in
            // the same order); the header is written as SET_VARSIZE does, then the bytes.
            unsafe {
                let p = block.add(at);
                pgrx::varlena::set_varsize_4b(p.cast(), (HDR + value.len()) as i32);
                std::ptr::copy_nonoverlapping(value.as_ptr(), p.add(HDR), value.len());
                dec.values.push(pg_sys::Datum::from(p));
            }
            at += (HDR + value.len()).next_multiple_of(4);
        }
        Some(dec)
    }

    /// The value at `row`; the kept error when the row is the one that failed.
    fn value(&mut self, row: usize) -> Result<Option<pg_sys::Datum>, OutError> {
        if let Some((bad, _)) = &self.error {
            if *bad == row {
                let (_, e) = self.error.take().expect("checked just above");
                return Err(e);
            }
        }
        Ok((!self.nulls[row]).then(|| self.values[row]))
    }
}

/// One output value of a column: a scalar, or an array built from a list.
///
/// # Safety
/// The array's type must have been accepted for the column by `check_schema`.
unsafe fn column_datum(
    col: &mut OutCol,
    array: &ArrayRef,
    row: usize,
) -> Result<Option<pg_sys::Datum>, OutError> {
    if *array.data_type() == DataType::Null || array.is_null(row) {
        return Ok(None);
    }
    let Some(layout) = col.layout else {
        // SAFETY: forwarded from the caller.
        return unsafe { scalar_datum(&mut col.target, array, row) }.map(Some);
    };
    let items = match array.data_type() {
        DataType::List(_) => array.as_list::<i32>().value(row),
        DataType::LargeList(_) => array.as_list::<i64>().value(row),
        // Text: the array type's own input function, e.g. '{1,2,3}'.
        _ => {
            let s = str_value(array, row);
            let c = std::ffi::CString::new(s).map_err(|_| OutError::Nul)?;
            let mut func = pg_sys::Oid::INVALID;
            let mut ioparam = pg_sys::Oid::INVALID;
            // SAFETY: array_in for the declared array type; an invalid literal raises the
            // type's own ERROR.
            return Ok(Some(unsafe {
                // SAFETY: get_array_type reads the syscache for the element oid.
                let array_oid = pg_sys::get_array_type(layout.oid);
                pg_sys::getTypeInputInfo(array_oid, &mut func, &mut ioparam);
                pg_sys::OidInputFunctionCall(func, c.as_ptr() as *mut _, ioparam, -1)
            }));
        }
    };
    let n = items.len();
    let mut elems = Vec::with_capacity(n);
    let mut nulls = Vec::with_capacity(n);
    for i in 0..n {
        if *items.data_type() == DataType::Null || items.is_null(i) {
            elems.push(pg_sys::Datum::from(0usize));
            nulls.push(true);
        } else {
            // SAFETY: the list's item type was accepted for the element type.
            elems.push(unsafe { scalar_datum(&mut col.target, &items, i) }?);
            nulls.push(false);
        }
    }
    let mut dims = [n as i32];
    let mut lbs = [1i32];
    // SAFETY: elems/nulls hold n entries of the element type; construct_md_array copies
    // them into a new palloc'd one-dimensional array.
    let arr = unsafe {
        pg_sys::construct_md_array(
            elems.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            layout.oid,
            layout.len.into(),
            layout.byval,
            layout.align,
        )
    };
    Ok(Some(pg_sys::Datum::from(arr)))
}

fn int_value(array: &dyn Array, row: usize) -> i128 {
    use DataType as D;
    match array.data_type() {
        D::Int8 => array.as_primitive::<Int8Type>().value(row) as i128,
        D::Int16 => array.as_primitive::<Int16Type>().value(row) as i128,
        D::Int32 => array.as_primitive::<Int32Type>().value(row) as i128,
        D::Int64 => array.as_primitive::<Int64Type>().value(row) as i128,
        D::UInt8 => array.as_primitive::<UInt8Type>().value(row) as i128,
        D::UInt16 => array.as_primitive::<UInt16Type>().value(row) as i128,
        D::UInt32 => array.as_primitive::<UInt32Type>().value(row) as i128,
        D::UInt64 => array.as_primitive::<UInt64Type>().value(row) as i128,
        // check_schema admitted only integer types here.
        other => unreachable!("integer target fed {other}"),
    }
}

/// An integer as the declared integer type's Datum.
fn int_datum<T: TryFrom<i128> + IntoDatum>(v: i128) -> Result<pg_sys::Datum, OutError> {
    T::try_from(v)
        .ok()
        .and_then(IntoDatum::into_datum)
        .ok_or_else(|| OutError::Range(v.to_string()))
}

fn float_value(array: &dyn Array, row: usize) -> f64 {
    match array.data_type() {
        DataType::Float32 => array.as_primitive::<Float32Type>().value(row) as f64,
        DataType::Float64 => array.as_primitive::<Float64Type>().value(row),
        // Integers into a float column: the nearest float, as Postgres' int8::float8.
        _ => int_value(array, row) as f64,
    }
}

fn str_value(array: &dyn Array, row: usize) -> &str {
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(row),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row),
        DataType::Utf8View => array.as_string_view().value(row),
        // check_schema admitted only string types here.
        other => unreachable!("text target fed {other}"),
    }
}

fn bytes_value(array: &dyn Array, row: usize) -> &[u8] {
    match array.data_type() {
        DataType::Binary => array.as_binary::<i32>().value(row),
        DataType::LargeBinary => array.as_binary::<i64>().value(row),
        DataType::FixedSizeBinary(_) => array.as_fixed_size_binary().value(row),
        // check_schema admitted only binary types here.
        other => unreachable!("binary target fed {other}"),
    }
}

/// Shortest text that reads back as the same double, in numeric's input syntax.
fn float_text(v: f64, single: bool) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else if single {
        format!("{}", v as f32)
    } else {
        format!("{v}")
    }
}

/// A count of `unit`s as microseconds, rounding sub-microsecond parts to the nearest.
fn to_micros(v: i64, unit: TimeUnit) -> Option<i64> {
    match unit {
        TimeUnit::Second => v.checked_mul(1_000_000),
        TimeUnit::Millisecond => v.checked_mul(1_000),
        TimeUnit::Microsecond => Some(v),
        TimeUnit::Nanosecond => Some(v.div_euclid(1000) + i64::from(v.rem_euclid(1000) >= 500)),
    }
}

fn timestamp_micros(array: &dyn Array, row: usize) -> (i64, TimeUnit) {
    match array.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) => (
            array.as_primitive::<TimestampSecondType>().value(row),
            TimeUnit::Second,
        ),
        DataType::Timestamp(TimeUnit::Millisecond, _) => (
            array.as_primitive::<TimestampMillisecondType>().value(row),
            TimeUnit::Millisecond,
        ),
        DataType::Timestamp(TimeUnit::Microsecond, _) => (
            array.as_primitive::<TimestampMicrosecondType>().value(row),
            TimeUnit::Microsecond,
        ),
        DataType::Timestamp(TimeUnit::Nanosecond, _) => (
            array.as_primitive::<TimestampNanosecondType>().value(row),
            TimeUnit::Nanosecond,
        ),
        other => unreachable!("timestamp target fed {other}"),
    }
}

fn duration_value(array: &dyn Array, row: usize) -> (i64, TimeUnit) {
    match array.data_type() {
        DataType::Duration(TimeUnit::Second) => (
            array.as_primitive::<DurationSecondType>().value(row),
            TimeUnit::Second,
        ),
        DataType::Duration(TimeUnit::Millisecond) => (
            array.as_primitive::<DurationMillisecondType>().value(row),
            TimeUnit::Millisecond,
        ),
        DataType::Duration(TimeUnit::Microsecond) => (
            array.as_primitive::<DurationMicrosecondType>().value(row),
            TimeUnit::Microsecond,
        ),
        DataType::Duration(TimeUnit::Nanosecond) => (
            array.as_primitive::<DurationNanosecondType>().value(row),
            TimeUnit::Nanosecond,
        ),
        other => unreachable!("duration target fed {other}"),
    }
}

fn time_value(array: &dyn Array, row: usize) -> (i64, TimeUnit) {
    match array.data_type() {
        DataType::Time32(TimeUnit::Second) => (
            array.as_primitive::<Time32SecondType>().value(row).into(),
            TimeUnit::Second,
        ),
        DataType::Time32(_) => (
            array
                .as_primitive::<Time32MillisecondType>()
                .value(row)
                .into(),
            TimeUnit::Millisecond,
        ),
        DataType::Time64(TimeUnit::Microsecond) => (
            array.as_primitive::<Time64MicrosecondType>().value(row),
            TimeUnit::Microsecond,
        ),
        DataType::Time64(_) => (
            array.as_primitive::<Time64NanosecondType>().value(row),
            TimeUnit::Nanosecond,
        ),
        other => unreachable!("time target fed {other}"),
    }
}

/// Calls a built-in function of one argument (the timestamp ⇄ timestamptz casts).
///
/// # Safety
/// `f` must take one argument of `d`'s type and never return NULL for it.
unsafe fn call1(
    f: unsafe fn(pg_sys::FunctionCallInfo) -> pg_sys::Datum,
    d: pg_sys::Datum,
) -> pg_sys::Datum {
    // SAFETY: per the caller.
    unsafe { pgrx::direct_function_call_as_datum(f, &[Some(d)]) }
        .expect("the timestamp casts never return NULL for a non-NULL argument")
}

/// One non-null scalar value as a Datum of the target type.
///
/// # Safety
/// The array's type must be one `accepts_scalar` admits for the target.
unsafe fn scalar_datum(
    target: &mut ScalarTarget,
    array: &dyn Array,
    row: usize,
) -> Result<pg_sys::Datum, OutError> {
    let dt = array.data_type();
    let range = |v: String| OutError::Range(v);
    let d = if is_str(dt) {
        let s = str_value(array, row);
        if s.as_bytes().contains(&0) {
            return Err(OutError::Nul);
        }
        match &mut target.input {
            // SAFETY: s is valid for len bytes; the function copies them into a new
            // text value in the current memory context.
            None => unsafe {
                pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                    s.as_ptr() as *const std::ffi::c_char,
                    s.len() as i32,
                ))
            },
            Some((flinfo, ioparam)) => {
                // No NUL inside (checked above), so this cannot fail.
                let c = std::ffi::CString::new(s).map_err(|_| OutError::Nul)?;
                // SAFETY: the type's own input function with a C string; an invalid
                // value raises the type's own ERROR.
                unsafe {
                    pg_sys::InputFunctionCall(&mut **flinfo, c.as_ptr() as *mut _, *ioparam, -1)
                }
            }
        }
    } else {
        match target.scalar {
            Scalar::Bool => array
                .as_boolean()
                .value(row)
                .into_datum()
                .expect("bool is by value"),
            Scalar::Int2 => int_datum::<i16>(int_value(array, row))?,
            Scalar::Int4 => int_datum::<i32>(int_value(array, row))?,
            Scalar::Int8 => int_datum::<i64>(int_value(array, row))?,
            Scalar::Float4 => {
                let v = float_value(array, row);
                let f = v as f32;
                // Postgres refuses float8 → float4 overflow and underflow; so do we.
                if (v.is_finite() && !f.is_finite()) || (v != 0.0 && f == 0.0) {
                    return Err(range(v.to_string()));
                }
                f.into_datum().expect("float4 is by value")
            }
            Scalar::Float8 => float_value(array, row)
                .into_datum()
                .expect("float8 is by value"),
            Scalar::Numeric => {
                let text = match dt {
                    DataType::Float32 => float_text(float_value(array, row), true),
                    DataType::Float64 => float_text(float_value(array, row), false),
                    DataType::Decimal128(..) => {
                        array.as_primitive::<Decimal128Type>().value_as_string(row)
                    }
                    DataType::Decimal256(..) => {
                        array.as_primitive::<Decimal256Type>().value_as_string(row)
                    }
                    _ => int_value(array, row).to_string(),
                };
                let c = std::ffi::CString::new(text).map_err(|_| OutError::Nul)?;
                let (flinfo, ioparam) = target
                    .input
                    .as_mut()
                    .expect("non-text targets have an input function");
                // SAFETY: numeric_in with a C string it produced or we formatted.
                unsafe {
                    pg_sys::InputFunctionCall(&mut **flinfo, c.as_ptr() as *mut _, *ioparam, -1)
                }
            }
            Scalar::Bytea => bytes_value(array, row)
                .into_datum()
                .expect("bytes always make a bytea"),
            Scalar::Date => {
                let days = match dt {
                    DataType::Date32 => array.as_primitive::<Date32Type>().value(row),
                    _ => {
                        let ms = array.as_primitive::<Date64Type>().value(row);
                        i32::try_from(ms.div_euclid(86_400_000))
                            .map_err(|_| range(format!("{ms} ms")))?
                    }
                };
                let pg = days
                    .checked_sub(EPOCH_DAYS)
                    .filter(|d| (DATE_MIN..DATE_END).contains(d))
                    .ok_or_else(|| range(format!("{days} days from 1970-01-01")))?;
                pg_sys::Datum::from(pg)
            }
            Scalar::Timestamp | Scalar::Timestamptz => {
                let (v, unit) = timestamp_micros(array, row);
                let pg = to_micros(v, unit)
                    .and_then(|us| us.checked_sub(EPOCH_MICROS))
                    .filter(|t| (TIMESTAMP_MIN..TIMESTAMP_END).contains(t))
                    .ok_or_else(|| range(format!("{v} {unit:?}s from 1970-01-01")))?;
                let d = pg_sys::Datum::from(pg);
                let zoned = matches!(dt, DataType::Timestamp(_, Some(_)));
                match (target.scalar, zoned) {
                    // An instant into timestamp: its wall-clock time in the session's
                    // TimeZone, as Postgres casts timestamptz to timestamp.
                    // SAFETY: timestamptz_timestamp takes a timestamptz.
                    (Scalar::Timestamp, true) => unsafe { call1(pg_sys::timestamptz_timestamp, d) },
                    // A wall-clock time into timestamptz: read in the session's TimeZone,
                    // as Postgres reads a literal without a zone.
                    // SAFETY: timestamp_timestamptz takes a timestamp.
                    (Scalar::Timestamptz, false) => unsafe {
                        call1(pg_sys::timestamp_timestamptz, d)
                    },
                    _ => d,
                }
            }
            Scalar::Time => {
                let (v, unit) = time_value(array, row);
                let us = to_micros(v, unit)
                    .filter(|us| (0..=DAY_MICROS).contains(us))
                    .ok_or_else(|| range(format!("{v} {unit:?}s after midnight")))?;
                pg_sys::Datum::from(us)
            }
            Scalar::Interval => {
                let iv = match dt {
                    DataType::Interval(_) => {
                        let v = array.as_primitive::<IntervalMonthDayNanoType>().value(row);
                        pg_sys::Interval {
                            month: v.months,
                            day: v.days,
                            time: to_micros(v.nanoseconds, TimeUnit::Nanosecond)
                                .expect("nanoseconds to microseconds cannot overflow"),
                        }
                    }
                    _ => {
                        let (v, unit) = duration_value(array, row);
                        pg_sys::Interval {
                            month: 0,
                            day: 0,
                            time: to_micros(v, unit)
                                .ok_or_else(|| range(format!("{v} {unit:?}s")))?,
                        }
                    }
                };
                // SAFETY: palloc of an Interval-sized block in the current context; it
                // is fully written before use.
                unsafe {
                    let p = pg_sys::palloc(std::mem::size_of::<pg_sys::Interval>())
                        as *mut pg_sys::Interval;
                    p.write(iv);
                    pg_sys::Datum::from(p)
                }
            }
            Scalar::Uuid => {
                let bytes = bytes_value(array, row);
                // SAFETY: palloc of 16 bytes (pg_uuid_t), fully written from the
                // 16-byte value check_schema admitted.
                unsafe {
                    let p = pg_sys::palloc(16) as *mut u8;
                    std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, 16);
                    pg_sys::Datum::from(p)
                }
            }
            Scalar::Text | Scalar::Json | Scalar::Jsonb => {
                unreachable!("text-like targets accept strings only")
            }
        }
    };
    match target.typmod {
        // SAFETY: the type's length coercion function (typmod, isExplicit = false), as
        // for an assignment; it raises its own ERROR for a value that does not fit.
        Some((func, typmod)) => Ok(unsafe {
            pg_sys::OidFunctionCall3Coll(
                func,
                pg_sys::Oid::INVALID,
                d,
                pg_sys::Datum::from(typmod),
                pg_sys::Datum::from(false),
            )
        }),
        None => Ok(d),
    }
}

// --- Loopback parameters: one Arrow row to typed Datums ------------------------------

/// The `$n` parameters of a loopback statement, ready for SPI.
pub struct Params {
    pub types: Vec<pg_sys::Oid>,
    pub values: Vec<pg_sys::Datum>,
    /// ' ' for a value, 'n' for NULL, as SPI wants them.
    pub nulls: Vec<std::ffi::c_char>,
}

fn scalar_oid(scalar: Scalar) -> pg_sys::Oid {
    match scalar {
        Scalar::Bool => pg_sys::BOOLOID,
        Scalar::Int2 => pg_sys::INT2OID,
        Scalar::Int4 => pg_sys::INT4OID,
        Scalar::Int8 => pg_sys::INT8OID,
        Scalar::Float4 => pg_sys::FLOAT4OID,
        Scalar::Float8 => pg_sys::FLOAT8OID,
        Scalar::Numeric => pg_sys::NUMERICOID,
        Scalar::Text => pg_sys::TEXTOID,
        Scalar::Bytea => pg_sys::BYTEAOID,
        Scalar::Date => pg_sys::DATEOID,
        Scalar::Timestamp => pg_sys::TIMESTAMPOID,
        Scalar::Timestamptz => pg_sys::TIMESTAMPTZOID,
        Scalar::Time => pg_sys::TIMEOID,
        Scalar::Interval => pg_sys::INTERVALOID,
        Scalar::Uuid => pg_sys::UUIDOID,
        Scalar::Json => pg_sys::JSONOID,
        Scalar::Jsonb => pg_sys::JSONBOID,
    }
}

/// The Postgres type a parameter value of Arrow type `dt` binds as, when the runtime
/// did not name one: the natural match, text for a NULL of no type.
fn param_scalar(dt: &DataType) -> Option<Scalar> {
    use DataType as D;
    Some(match dt {
        D::Boolean => Scalar::Bool,
        D::Int8 | D::Int16 | D::UInt8 => Scalar::Int2,
        D::Int32 | D::UInt16 => Scalar::Int4,
        D::Int64 | D::UInt32 => Scalar::Int8,
        D::UInt64 | D::Decimal128(..) | D::Decimal256(..) => Scalar::Numeric,
        D::Float32 => Scalar::Float4,
        D::Float64 => Scalar::Float8,
        D::Utf8 | D::LargeUtf8 | D::Utf8View | D::Null => Scalar::Text,
        D::Binary | D::LargeBinary | D::FixedSizeBinary(_) => Scalar::Bytea,
        D::Date32 | D::Date64 => Scalar::Date,
        D::Timestamp(_, None) => Scalar::Timestamp,
        D::Timestamp(_, Some(_)) => Scalar::Timestamptz,
        D::Time32(_) | D::Time64(_) => Scalar::Time,
        D::Interval(arrow_schema::IntervalUnit::MonthDayNano) | D::Duration(_) => Scalar::Interval,
        _ => return None,
    })
}

/// Converts the runtime's parameter row: column n is `$n+1`, typed by its field's
/// airlock.type metadata or else by its Arrow type.
///
/// # Safety
/// Must run inside a transaction (type lookups, input functions).
pub unsafe fn params_from_batch(batch: &RecordBatch) -> Result<Params, CallError> {
    let bad = |message: String| CallError::BadArgument {
        message,
        hint: None,
    };
    if batch.num_rows() != 1 {
        return Err(bad(format!(
            "loopback parameters must be one row, got {}",
            batch.num_rows()
        )));
    }
    let mut params = Params {
        types: Vec::with_capacity(batch.num_columns()),
        values: Vec::with_capacity(batch.num_columns()),
        nulls: Vec::with_capacity(batch.num_columns()),
    };
    for (i, field) in batch.schema().fields().iter().enumerate() {
        let named = field
            .metadata()
            .get(TYPE_METADATA_KEY)
            .and_then(|t| t.parse::<PgType>().ok());
        let pg = match (named, field.data_type()) {
            (Some(t), _) => Some(t),
            (None, DataType::List(item) | DataType::LargeList(item)) => {
                param_scalar(item.data_type()).map(PgType::array_of)
            }
            (None, dt) => param_scalar(dt).map(PgType::scalar),
        };
        let Some(pg) = pg.filter(|pg| accepts(*pg, field.data_type())) else {
            return Err(bad(format!(
                "loopback parameter ${} is {}, which airlock cannot bind",
                i + 1,
                produced_name(field.data_type())
            )));
        };
        let elem = scalar_oid(pg.scalar);
        let oid = if pg.array {
            // SAFETY: a syscache lookup of a built-in type's array type.
            unsafe { pg_sys::get_array_type(elem) }
        } else {
            elem
        };
        let mut col = OutCol {
            number: i + 1,
            name: format!("${}", i + 1),
            declared: type_name(oid, -1),
            pg,
            target: ScalarTarget::new(pg.scalar, elem, -1),
            layout: pg.array.then(|| ElemLayout::of(elem)),
            domain: None,
        };
        // SAFETY: accepts() admitted the column's Arrow type for pg.
        let value =
            unsafe { column_datum(&mut col, batch.column(i), 0) }.map_err(|e| e.at(&col, 1))?;
        params.types.push(oid);
        params
            .values
            .push(value.unwrap_or(pg_sys::Datum::from(0usize)));
        params
            .nulls
            .push(if value.is_some() { b' ' } else { b'n' } as std::ffi::c_char);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanoseconds_round_to_the_nearest_microsecond() {
        assert_eq!(to_micros(1499, TimeUnit::Nanosecond), Some(1));
        assert_eq!(to_micros(1500, TimeUnit::Nanosecond), Some(2));
        assert_eq!(to_micros(-1, TimeUnit::Nanosecond), Some(0));
        assert_eq!(to_micros(-501, TimeUnit::Nanosecond), Some(-1));
        assert_eq!(to_micros(i64::MAX, TimeUnit::Second), None);
    }

    #[test]
    fn text_is_checked_as_utf8_per_batch_and_repaired_per_value() {
        let offsets = |o: Vec<i32>| OffsetBuffer::new(o.into());
        // Valid: the bytes as they are, NULLs in place.
        let a = text_array(
            offsets(vec![0, 3, 3, 6]),
            "héllo".as_bytes().to_vec(),
            Some(NullBuffer::from(vec![true, false, true])),
        );
        let a = a.as_string::<i32>();
        assert_eq!(a.value(0), "h\u{e9}");
        assert!(a.is_null(1));
        assert_eq!(a.value(2), "llo");
        // A value split inside a character, and an invalid byte: each value repaired on
        // its own, the others untouched.
        let mut data = "é".as_bytes().to_vec();
        data.extend_from_slice(b"ok\xff");
        let a = text_array(offsets(vec![0, 1, 2, 4, 5]), data, None);
        let a = a.as_string::<i32>();
        let got: Vec<&str> = (0..4).map(|i| a.value(i)).collect();
        assert_eq!(got, ["\u{fffd}", "\u{fffd}", "ok", "\u{fffd}"]);
    }

    #[test]
    fn floats_print_as_numeric_reads_them() {
        assert_eq!(float_text(0.1, false), "0.1");
        assert_eq!(float_text(f64::NAN, false), "NaN");
        assert_eq!(float_text(f64::NEG_INFINITY, false), "-Infinity");
        assert_eq!(float_text(0.1f32 as f64, true), "0.1");
        assert_eq!(float_text(1e21, false), "1000000000000000000000");
    }
}
