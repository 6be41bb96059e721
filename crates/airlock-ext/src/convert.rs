//! Postgres values ⇄ Arrow columns, in binary, both ways.
//!
//! Input: tuples from the SPI cursor are appended column by column to Arrow builders and
//! shipped as one IPC stream per batch. Output: Arrow batches from the runtime are checked
//! against the caller's column definition list once, then each value becomes a Datum.
//! The runtime is untrusted: arrow-ipc validates every array it decodes (offsets, UTF-8)
//! before we read it, and every value is range-checked against the declared type.

use std::{ffi::CStr, sync::Arc};

use arrow_array::{
    builder::{
        BooleanBuilder, Float32Builder, Float64Builder, Int16Builder, Int32Builder, Int64Builder,
        StringBuilder,
    },
    cast::AsArray,
    types::{
        Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type,
        UInt32Type, UInt64Type, UInt8Type,
    },
    Array, ArrayRef, RecordBatch,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use pgrx::{pg_sys, IntoDatum};

use crate::error::CallError;

/// The types the data path carries today, for error messages and docs.
pub const SUPPORTED_TYPES: &str =
    "bool, int2, int4, int8, float4, float8, text, varchar, char, name (and domains over them)";

/// A Postgres type the data path knows, after resolving domains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// text, varchar, bpchar: varlena text in the database encoding (UTF8).
    Text,
    /// name: fixed-size NUL-terminated.
    Name,
}

fn kind_of(typoid: pg_sys::Oid) -> Option<Kind> {
    // SAFETY: getBaseType only reads the syscache; any oid is valid input (an unknown
    // oid is returned unchanged).
    let base = unsafe { pg_sys::getBaseType(typoid) };
    Some(match base {
        pg_sys::BOOLOID => Kind::Bool,
        pg_sys::INT2OID => Kind::Int2,
        pg_sys::INT4OID => Kind::Int4,
        pg_sys::INT8OID => Kind::Int8,
        pg_sys::FLOAT4OID => Kind::Float4,
        pg_sys::FLOAT8OID => Kind::Float8,
        pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => Kind::Text,
        pg_sys::NAMEOID => Kind::Name,
        _ => return None,
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

enum InBuilder {
    Bool(BooleanBuilder),
    I16(Int16Builder),
    I32(Int32Builder),
    I64(Int64Builder),
    F32(Float32Builder),
    F64(Float64Builder),
    Text(StringBuilder),
    Name(StringBuilder),
}

/// Accumulates input rows into Arrow builders.
pub struct InputEncoder {
    schema: SchemaRef,
    cols: Vec<(i32, InBuilder)>,
    rows: usize,
    text_bytes: usize,
    /// Bytes per row of the fixed-width parts (values, offsets, validity).
    fixed_row_bytes: usize,
}

impl InputEncoder {
    /// Plans the encoding of the input query's columns.
    ///
    /// # Safety
    /// `tupdesc` must be a valid tuple descriptor.
    pub unsafe fn new(tupdesc: pg_sys::TupleDesc) -> Result<InputEncoder, CallError> {
        // SAFETY: forwarded from the caller.
        let attrs = unsafe { attributes(tupdesc) };
        let mut fields = Vec::with_capacity(attrs.len());
        let mut cols = Vec::with_capacity(attrs.len());
        for (i, a) in attrs.iter().enumerate() {
            if let Some(prev) = attrs[..i].iter().find(|p| p.name == a.name) {
                return Err(CallError::DuplicateInputColumn {
                    name: a.name.clone(),
                    first: prev.number,
                    second: a.number,
                });
            }
            let Some(kind) = kind_of(a.typoid) else {
                return Err(CallError::UnsupportedInputType {
                    column: a.number,
                    name: a.name.clone(),
                    type_name: type_name(a.typoid, a.typmod),
                });
            };
            let (dt, b) = match kind {
                Kind::Bool => (DataType::Boolean, InBuilder::Bool(BooleanBuilder::new())),
                Kind::Int2 => (DataType::Int16, InBuilder::I16(Int16Builder::new())),
                Kind::Int4 => (DataType::Int32, InBuilder::I32(Int32Builder::new())),
                Kind::Int8 => (DataType::Int64, InBuilder::I64(Int64Builder::new())),
                Kind::Float4 => (DataType::Float32, InBuilder::F32(Float32Builder::new())),
                Kind::Float8 => (DataType::Float64, InBuilder::F64(Float64Builder::new())),
                Kind::Text => (DataType::Utf8, InBuilder::Text(StringBuilder::new())),
                Kind::Name => (DataType::Utf8, InBuilder::Name(StringBuilder::new())),
            };
            fields.push(Field::new(a.name.clone(), dt, true));
            cols.push((a.number as i32, b));
        }
        let fixed_row_bytes = cols
            .iter()
            .map(|(_, b)| match b {
                InBuilder::Bool(_) => 1,
                InBuilder::I16(_) => 3,
                InBuilder::I32(_) | InBuilder::F32(_) => 5,
                InBuilder::I64(_) | InBuilder::F64(_) => 9,
                InBuilder::Text(_) | InBuilder::Name(_) => 5,
            })
            .sum();
        Ok(InputEncoder {
            schema: Arc::new(Schema::new(fields)),
            cols,
            rows: 0,
            text_bytes: 0,
            fixed_row_bytes,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// About how many bytes the buffered rows take; callers flush early past a
    /// threshold.
    pub fn approx_bytes(&self) -> usize {
        self.text_bytes + self.rows * self.fixed_row_bytes
    }

    /// Appends one tuple.
    ///
    /// # Safety
    /// `tuple` must be a valid heap tuple described by `tupdesc`, the descriptor this
    /// encoder was planned from.
    pub unsafe fn append(&mut self, tuple: pg_sys::HeapTuple, tupdesc: pg_sys::TupleDesc) {
        for (attno, b) in &mut self.cols {
            let mut isnull = false;
            // SAFETY: tuple and tupdesc are valid per the caller; attno is a live column
            // of tupdesc.
            let d = unsafe { pg_sys::SPI_getbinval(tuple, tupdesc, *attno, &mut isnull) };
            if isnull {
                match b {
                    InBuilder::Bool(b) => b.append_null(),
                    InBuilder::I16(b) => b.append_null(),
                    InBuilder::I32(b) => b.append_null(),
                    InBuilder::I64(b) => b.append_null(),
                    InBuilder::F32(b) => b.append_null(),
                    InBuilder::F64(b) => b.append_null(),
                    InBuilder::Text(b) | InBuilder::Name(b) => b.append_null(),
                }
                continue;
            }
            // By-value types are read straight from the Datum's bits, as Postgres'
            // DatumGet* macros do.
            match b {
                InBuilder::Bool(b) => b.append_value(d.value() != 0),
                InBuilder::I16(b) => b.append_value(d.value() as i16),
                InBuilder::I32(b) => b.append_value(d.value() as i32),
                InBuilder::I64(b) => b.append_value(d.value() as i64),
                InBuilder::F32(b) => b.append_value(f32::from_bits(d.value() as u32)),
                InBuilder::F64(b) => b.append_value(f64::from_bits(d.value() as u64)),
                InBuilder::Text(b) => {
                    // SAFETY: d is a non-null varlena of a text-like type.
                    let text = unsafe { Detoasted::new(d) };
                    let bytes = text.bytes();
                    self.text_bytes += bytes.len();
                    // The database is UTF8 (checked before the call), so text is valid
                    // UTF-8; from_utf8 still guards against a corrupt value.
                    match std::str::from_utf8(bytes) {
                        Ok(s) => b.append_value(s),
                        Err(_) => b.append_value(String::from_utf8_lossy(bytes)),
                    }
                    // The detoasted copy (if one was made) is freed here, so a batch
                    // of huge values never holds more than one of them.
                }
                InBuilder::Name(b) => {
                    // SAFETY: a name Datum points at a NUL-terminated NameData.
                    let s = unsafe { CStr::from_ptr(d.cast_mut_ptr::<std::ffi::c_char>()) };
                    b.append_value(s.to_string_lossy());
                }
            }
        }
        self.rows += 1;
    }

    /// Emits the buffered rows as one Arrow frame (schema, batch, end marker) and resets.
    pub fn finish_frame(&mut self) -> Result<Vec<u8>, CallError> {
        let arrays: Vec<ArrayRef> = self
            .cols
            .iter_mut()
            .map(|(_, b)| -> ArrayRef {
                match b {
                    InBuilder::Bool(b) => Arc::new(b.finish()),
                    InBuilder::I16(b) => Arc::new(b.finish()),
                    InBuilder::I32(b) => Arc::new(b.finish()),
                    InBuilder::I64(b) => Arc::new(b.finish()),
                    InBuilder::F32(b) => Arc::new(b.finish()),
                    InBuilder::F64(b) => Arc::new(b.finish()),
                    InBuilder::Text(b) | InBuilder::Name(b) => Arc::new(b.finish()),
                }
            })
            .collect();
        let options = arrow_array::RecordBatchOptions::new().with_row_count(Some(self.rows));
        let batch = RecordBatch::try_new_with_options(self.schema.clone(), arrays, &options)
            .map_err(|e| internal(format!("building an input batch: {e}")))?;
        self.rows = 0;
        self.text_bytes = 0;
        encode_batch(&batch)
    }
}

fn internal(message: String) -> CallError {
    CallError::Internal { message }
}

/// Encodes a batch as a complete Arrow frame, written in place after the frame header.
pub fn encode_batch(batch: &RecordBatch) -> Result<Vec<u8>, CallError> {
    let buf = airlock_protocol::begin_frame(
        airlock_protocol::FrameKind::Arrow,
        batch.get_array_memory_size() + 1024,
    );
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
        // SAFETY: per the caller, d is a varlena; pg_detoast_datum_packed returns it
        // unchanged or a palloc'd detoasted copy.
        let value = unsafe { pg_sys::pg_detoast_datum_packed(original) };
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

/// How one output column becomes Datums.
#[derive(Debug, Clone, Copy)]
enum Target {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// text or varchar without a length limit: built directly.
    PlainText,
    /// Any other text-like type (varchar(n), char(n), name): through its input function,
    /// which applies the type's own checks.
    TypedText {
        typoid: pg_sys::Oid,
        typmod: i32,
    },
}

struct OutCol {
    number: usize,
    name: String,
    declared: String,
    target: Target,
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
}

/// Arrow type names as a pandas user knows them.
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
        DataType::Null => "all missing (None)".into(),
        DataType::Timestamp(_, _) => "datetime64".into(),
        other => other.to_string(),
    }
}

fn accepts(target: Target, dt: &DataType) -> bool {
    use DataType as D;
    let int = matches!(
        dt,
        D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64
    );
    matches!(dt, D::Null)
        || match target {
            Target::Bool => matches!(dt, D::Boolean),
            Target::Int2 | Target::Int4 | Target::Int8 => int,
            Target::Float4 | Target::Float8 => int || matches!(dt, D::Float32 | D::Float64),
            Target::PlainText | Target::TypedText { .. } => {
                matches!(dt, D::Utf8 | D::LargeUtf8 | D::Utf8View)
            }
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
            let target = match kind_of(a.typoid) {
                Some(Kind::Bool) => Target::Bool,
                Some(Kind::Int2) => Target::Int2,
                Some(Kind::Int4) => Target::Int4,
                Some(Kind::Int8) => Target::Int8,
                Some(Kind::Float4) => Target::Float4,
                Some(Kind::Float8) => Target::Float8,
                Some(Kind::Text)
                    if a.typmod < 0 && matches!(a.typoid, pg_sys::TEXTOID | pg_sys::VARCHAROID) =>
                {
                    Target::PlainText
                }
                Some(Kind::Text) | Some(Kind::Name) => Target::TypedText {
                    typoid: a.typoid,
                    typmod: a.typmod,
                },
                None => {
                    return Err(CallError::UnsupportedOutputType {
                        column: a.number,
                        name: a.name,
                        type_name: declared,
                    })
                }
            };
            // SAFETY: getBaseType reads the syscache for a valid oid.
            let is_domain = unsafe { pg_sys::getBaseType(a.typoid) } != a.typoid;
            cols.push(OutCol {
                number: a.number,
                name: a.name,
                declared,
                target,
                domain: is_domain.then_some((a.typoid, std::ptr::null_mut())),
            });
        }
        Ok(OutputDecoder {
            cols,
            checked: false,
            max_batch_rows,
            cache_cx,
        })
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
            if !accepts(col.target, field.data_type()) {
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
        let n = self.cols.len();
        let mut values = vec![pg_sys::Datum::from(0usize); n];
        let mut nulls = vec![false; n];
        let cache_cx = self.cache_cx;
        for row in 0..batch.num_rows() {
            if row % 4096 == 4095 {
                pgrx::check_for_interrupts!();
            }
            for (c, col) in self.cols.iter_mut().enumerate() {
                let array = batch.column(c);
                let value = datum(col, array, row, first_row + row as u64 + 1)?;
                (values[c], nulls[c]) = match value {
                    Some(d) => (d, false),
                    None => (pg_sys::Datum::from(0usize), true),
                };
                if let Some((domain, extra)) = col.domain.as_mut() {
                    // SAFETY: the Datum is of the domain's base type (or NULL); the
                    // cache pointer starts NULL and domain_check keeps its cache in
                    // cache_cx, which outlives the decoder. A violated constraint raises
                    // the domain's own ERROR.
                    unsafe { pg_sys::domain_check(values[c], nulls[c], *domain, extra, cache_cx) };
                }
            }
            // SAFETY: values/nulls have one entry per attribute of tupdesc, each Datum
            // of that attribute's type; tuplestore_putvalues copies the tuple.
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
    }
}

fn int_value(array: &ArrayRef, row: usize) -> i128 {
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
        // check_schema admitted only integer types for integer targets.
        other => unreachable!("integer target fed {other}"),
    }
}

/// An integer as the declared integer type's Datum; Err(the value, printed) if it does not
/// fit.
fn int_datum<T: TryFrom<i128> + IntoDatum>(v: i128) -> Result<Option<pg_sys::Datum>, String> {
    T::try_from(v)
        .map(IntoDatum::into_datum)
        .map_err(|_| v.to_string())
}

fn float_value(array: &ArrayRef, row: usize) -> f64 {
    match array.data_type() {
        DataType::Float32 => array.as_primitive::<Float32Type>().value(row) as f64,
        DataType::Float64 => array.as_primitive::<Float64Type>().value(row),
        // Integers into a float column: the nearest float, as Postgres' int8::float8.
        _ => int_value(array, row) as f64,
    }
}

fn str_value(array: &ArrayRef, row: usize) -> &str {
    match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(row),
        DataType::LargeUtf8 => array.as_string::<i64>().value(row),
        DataType::Utf8View => array.as_string_view().value(row),
        // check_schema admitted only string types for text targets.
        other => unreachable!("text target fed {other}"),
    }
}

fn datum(
    col: &OutCol,
    array: &ArrayRef,
    row: usize,
    row_number: u64,
) -> Result<Option<pg_sys::Datum>, CallError> {
    if array.is_null(row) || *array.data_type() == DataType::Null {
        return Ok(None);
    }
    let out_of_range = |value: String| CallError::ValueOutOfRange {
        column: col.number,
        name: col.name.clone(),
        row: row_number,
        value,
        declared: col.declared.clone(),
    };
    Ok(match col.target {
        Target::Bool => array.as_boolean().value(row).into_datum(),
        Target::Int2 => int_datum::<i16>(int_value(array, row)).map_err(out_of_range)?,
        Target::Int4 => int_datum::<i32>(int_value(array, row)).map_err(out_of_range)?,
        Target::Int8 => int_datum::<i64>(int_value(array, row)).map_err(out_of_range)?,
        Target::Float4 => {
            let v = float_value(array, row);
            let f = v as f32;
            // Postgres refuses float8 → float4 overflow and underflow; so do we.
            if (v.is_finite() && !f.is_finite()) || (v != 0.0 && f == 0.0) {
                return Err(out_of_range(v.to_string()));
            }
            f.into_datum()
        }
        Target::Float8 => float_value(array, row).into_datum(),
        Target::PlainText | Target::TypedText { .. } => {
            let s = str_value(array, row);
            if s.as_bytes().contains(&0) {
                return Err(CallError::InvalidText {
                    column: col.number,
                    name: col.name.clone(),
                    row: row_number,
                    reason: "contains a NUL character, which Postgres text cannot hold",
                });
            }
            match col.target {
                Target::PlainText => {
                    // SAFETY: s is valid for len bytes; the function copies them into a
                    // new text value in the current memory context.
                    Some(unsafe {
                        pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                            s.as_ptr() as *const std::ffi::c_char,
                            s.len() as i32,
                        ))
                    })
                }
                Target::TypedText { typoid, typmod } => {
                    // No NUL inside (checked above), so this cannot fail.
                    let c = std::ffi::CString::new(s).expect("NUL checked above");
                    let mut input = pg_sys::Oid::INVALID;
                    let mut ioparam = pg_sys::Oid::INVALID;
                    // SAFETY: getTypeInputInfo and OidInputFunctionCall take any valid
                    // type oid (ours came from the tuple descriptor) and a C string; an
                    // invalid value raises the type's own ERROR.
                    Some(unsafe {
                        pg_sys::getTypeInputInfo(typoid, &mut input, &mut ioparam);
                        pg_sys::OidInputFunctionCall(input, c.as_ptr() as *mut _, ioparam, typmod)
                    })
                }
                _ => unreachable!("outer match admits text targets only"),
            }
        }
    })
}
