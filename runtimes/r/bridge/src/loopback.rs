//! Loopback queries from R: `airlock_query(sql, params)` and `airlock_execute(sql,
//! params)`. The statement goes to the backend over the data socket; the backend runs it
//! as the calling role in the caller's transaction and answers QueryBegin, the rows,
//! QueryEnd (or QueryError). Input frames that arrive before the answer are kept for the
//! input reader (crates/airlock-protocol/src/data.rs).

use std::io::Cursor;
use std::sync::Arc;

use airlock_protocol::{
    begin_frame,
    data::{FromRuntime, QueryMode, ToRuntime},
    types::TYPE_METADATA_KEY,
    FrameKind,
};
use arrow_array::RecordBatch;
use arrow_ipc::{reader::StreamReader, writer::StreamWriter};
use arrow_schema::{Field, Schema, SchemaRef};
use extendr_api::prelude::*;

use crate::channel::Channel;
use crate::error::BridgeError;
use crate::rapi::{self, SEXPTYPE};

/// What the backend answered.
pub enum Answer {
    /// `query`: the rows as a data.frame; `execute`: the rows affected.
    Value(Robj),
    /// The statement failed: (sqlstate, message, detail, hint).
    Failed(String, String, Option<String>, Option<String>),
}

/// Sends one statement (with `params`, a list of length-1 R values, or NULL) and waits
/// for its answer.
pub fn run(
    chan: &Channel,
    sql: &str,
    mode: QueryMode,
    params: &Robj,
) -> Result<Answer, BridgeError> {
    let params = params_batch(params)?;
    chan.send_control(&FromRuntime::Query {
        sql: sql.to_owned(),
        mode,
        has_params: params.is_some(),
    })?;
    if let Some(batch) = params {
        let mut frame = begin_frame(FrameKind::Arrow, 0);
        {
            let mut w = StreamWriter::try_new(&mut frame, &batch.schema())?;
            w.write(&batch)?;
            w.finish()?;
        }
        chan.send_started_frame(frame)?;
    }
    let mut begun = false;
    let mut schema: Option<SchemaRef> = None;
    let mut batches = Vec::new();
    loop {
        let Some(frame) = chan.recv_wire()? else {
            return Err(BridgeError::Protocol(
                "the backend closed the connection during a loopback query".into(),
            ));
        };
        if frame.kind == FrameKind::Control {
            match frame.control::<ToRuntime>()? {
                ToRuntime::QueryBegin if !begun => begun = true,
                ToRuntime::QueryError {
                    sqlstate,
                    message,
                    detail,
                    hint,
                } => return Ok(Answer::Failed(sqlstate, message, detail, hint)),
                ToRuntime::QueryEnd { rows } if begun => {
                    return match mode {
                        QueryMode::Execute => Ok(Answer::Value(Robj::from(rows as f64))),
                        QueryMode::Query => {
                            let schema = schema.ok_or_else(|| {
                                BridgeError::Protocol(
                                    "a loopback query answered without a schema".into(),
                                )
                            })?;
                            Ok(Answer::Value(crate::input::result_to_frame(
                                &schema, &batches,
                            )?))
                        }
                    };
                }
                ToRuntime::InputEnd if !begun => chan.keep(frame)?,
                other => {
                    return Err(BridgeError::Protocol(format!(
                        "expected a loopback answer, got {other:?}"
                    )))
                }
            }
            continue;
        }
        if !begun {
            // Input sent before the answer: the input reader gets it later, in order.
            chan.keep(frame)?;
            continue;
        }
        let reader = StreamReader::try_new(Cursor::new(frame.payload), None)
            .map_err(|e| BridgeError::Protocol(format!("malformed Arrow frame: {e}")))?;
        schema = Some(reader.schema());
        for b in reader {
            batches
                .push(b.map_err(|e| BridgeError::Protocol(format!("malformed Arrow frame: {e}")))?);
        }
    }
}

/// `$1, $2, …` as one Arrow row, or None without parameters.
fn params_batch(params: &Robj) -> Result<Option<RecordBatch>, BridgeError> {
    if params.is_null() || params.len() == 0 {
        return Ok(None);
    }
    if params.sexptype() != SEXPTYPE::VECSXP {
        return Err(BridgeError::Output(
            "params must be a list of values for $1, $2, …".into(),
        ));
    }
    let mut fields = Vec::with_capacity(params.len());
    let mut arrays = Vec::with_capacity(params.len());
    for i in 0..params.len() {
        let x = rapi::robj(rapi::list_elt(params, i));
        let (array, t) = crate::output::param_column(&x, i)?;
        fields.push(
            Field::new(format!("${}", i + 1), array.data_type().clone(), true).with_metadata(
                [(TYPE_METADATA_KEY.to_string(), t.to_string())]
                    .into_iter()
                    .collect(),
            ),
        );
        arrays.push(array);
    }
    Ok(Some(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        arrays,
    )?))
}
