//! Airlock's R bridge (`libairlock_r.so`): the Rust half of the R runtime.
//!
//! The R shim (`runtimes/r/airlock_runtime.R`) loads this library with `dyn.load` and
//! calls it with `.Call`. The bridge owns everything between R and the Postgres backend:
//!
//! * fd 3, the data socket: reading `Start`, the input Arrow frames and `InputEnd`;
//!   sending `Print`, the output Arrow frames, `Done` and `ScriptError`
//!   (airlock-protocol's framing and message types; crates/airlock-protocol/src/data.rs).
//! * the conversions, by declared Postgres type, both ways (docs/TYPES.md, R column):
//!   input batches → a data.frame (all rows, or chunks of `rows_per_read`), the output
//!   data.frame or output_params values → Arrow batches of at most `output_batch_rows`
//!   rows, split further to stay under `max_frame_bytes`.
//! * `params` (JSON) → R values.
//! * printed output: fds 1 and 2 redirected to a pipe whose lines a Rust thread sends as
//!   `Print` frames, up to `max_print_bytes` (that thread never touches R).
//!
//! The R side keeps what only R can do: evaluating the script, catching its conditions
//! and call stack, and deciding the exit status.
//!
//! Errors never cross into R as a longjmp through Rust frames or as a panic: every
//! function returns either its value or a character scalar of class
//! `airlock_bridge_error` (attribute `kind`: `ProtocolError`, `InputError`,
//! `OutputError`, `RuntimeFailure`), which the shim turns into an R condition.

mod channel;
mod error;
mod input;
mod loopback;
mod output;
mod params;
mod print;
mod rapi;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, OnceLock};

use airlock_protocol::{
    data::{ErrorPhase, FromRuntime, OutputColumn, ToRuntime},
    PROTOCOL_VERSION,
};
use extendr_api::prelude::*;

use crate::channel::Channel;
use crate::error::BridgeError;
use crate::input::Input;
use crate::print::Forwarder;
use crate::rapi::SEXPTYPE;

/// Longest error message or traceback sent; a script can fail with an enormous message.
const MAX_ERROR_TEXT: usize = 1 << 20;

/// The data socket, opened on first use (so that even a failed start can be reported).
static CHANNEL: OnceLock<Arc<Channel>> = OnceLock::new();

/// The call's state after `Start`.
struct Call {
    output_columns: Vec<OutputColumn>,
    output_batch_rows: usize,
    rows_per_read: Option<usize>,
    max_print_bytes: u64,
    input: Input,
    forwarder: Option<Forwarder>,
}

static CALL: Mutex<Option<Call>> = Mutex::new(None);

fn channel() -> Result<Arc<Channel>, BridgeError> {
    if let Some(c) = CHANNEL.get() {
        return Ok(c.clone());
    }
    let c = Arc::new(Channel::open()?);
    // Only R's main thread gets here, so nobody set it in between.
    Ok(CHANNEL.get_or_init(|| c).clone())
}

fn with_call<T>(f: impl FnOnce(&mut Call) -> Result<T, BridgeError>) -> Result<T, BridgeError> {
    let mut guard = CALL
        .lock()
        .map_err(|_| BridgeError::State("call state lock poisoned"))?;
    let call = guard
        .as_mut()
        .ok_or(BridgeError::State("no start message read yet"))?;
    f(call)
}

/// The value R gets back: the result, or an `airlock_bridge_error` value.
fn reply(r: Result<Robj, BridgeError>) -> Robj {
    match r {
        Ok(v) => v,
        Err(e) => error_value(&e).unwrap_or_else(|_| rapi::null()),
    }
}

fn error_value(e: &BridgeError) -> Result<Robj, BridgeError> {
    let msg = e.to_string().replace('\0', "\\0");
    let mut v = rapi::string(&msg)?;
    rapi::set_attr(&mut v, "kind", rapi::string(e.kind())?)?;
    rapi::set_class(&mut v, &["airlock_bridge_error"])?;
    Ok(v)
}

fn named_list(items: Vec<(&str, Robj)>) -> Result<Robj, BridgeError> {
    let mut list = rapi::alloc(SEXPTYPE::VECSXP, items.len())?;
    for (i, (_, v)) in items.iter().enumerate() {
        // SAFETY: v is a live protected Robj; the list references it from now on.
        rapi::set_list_elt(&mut list, i, unsafe { v.get() });
    }
    let names = rapi::strings(
        items.len(),
        items.iter().map(|(n, _)| Some(Cow::Borrowed(*n))),
    )?;
    rapi::set_attr(&mut list, "names", names)?;
    Ok(list)
}

fn opt_usize(v: u64, what: &str, min: u64) -> Result<usize, BridgeError> {
    if v < min {
        return Err(BridgeError::Protocol(format!(
            "start message: {what} must be at least {min}"
        )));
    }
    Ok(usize::try_from(v).unwrap_or(usize::MAX))
}

/// Reads `Start`. Returns `list(script, input_name, output_name, has_input,
/// rows_per_read, output_params, params, output_names, output_types)`.
#[extendr]
fn airlock_start() -> Robj {
    reply(start())
}

fn start() -> Result<Robj, BridgeError> {
    let chan = channel()?;
    let Some(frame) = chan.recv()? else {
        return Err(BridgeError::Protocol(
            "the backend closed the connection before sending start".into(),
        ));
    };
    let msg: ToRuntime = frame.control()?;
    let ToRuntime::Start {
        version,
        script,
        input_name,
        output_name,
        has_input,
        max_print_bytes,
        output_batch_rows,
        max_frame_bytes,
        params,
        output_columns,
        output_params,
        rows_per_read,
    } = msg
    else {
        return Err(BridgeError::Protocol(
            "expected a start message, got input_end".into(),
        ));
    };
    if version != PROTOCOL_VERSION {
        return Err(BridgeError::Protocol(format!(
            "unsupported protocol version {version}; this runtime speaks version \
             {PROTOCOL_VERSION}"
        )));
    }
    let output_batch_rows = opt_usize(output_batch_rows, "output_batch_rows", 1)?;
    chan.set_max_frame(opt_usize(max_frame_bytes, "max_frame_bytes", 1024)?);
    let rows_per_read = rows_per_read
        .map(|n| opt_usize(n, "rows_per_read", 1))
        .transpose()?;
    if let Some(names) = &output_params {
        if names.len() != output_columns.len() {
            return Err(BridgeError::Protocol(format!(
                "start message: {} output_params for {} output columns",
                names.len(),
                output_columns.len()
            )));
        }
    }

    let mut param_values = Vec::with_capacity(params.len());
    for (name, v) in &params {
        param_values.push((name.as_str(), params::to_r(v)?));
    }
    let params_r = named_list(param_values)?;
    let output_params_r = match &output_params {
        Some(names) => rapi::strings(
            names.len(),
            names.iter().map(|n| Some(Cow::Borrowed(n.as_str()))),
        )?,
        None => rapi::null(),
    };
    let rows_per_read_r = match rows_per_read {
        Some(n) => Robj::from(n as f64),
        None => rapi::null(),
    };
    let out_names = rapi::strings(
        output_columns.len(),
        output_columns
            .iter()
            .map(|c| Some(Cow::Borrowed(c.name.as_str()))),
    )?;
    let out_types = rapi::strings(
        output_columns.len(),
        output_columns
            .iter()
            .map(|c| Some(Cow::Owned(c.pg_type.to_string()))),
    )?;
    let value = named_list(vec![
        ("script", rapi::string(&script)?),
        ("input_name", rapi::string(&input_name)?),
        ("output_name", rapi::string(&output_name)?),
        ("has_input", Robj::from(has_input)),
        ("rows_per_read", rows_per_read_r),
        ("output_params", output_params_r),
        ("params", params_r),
        ("output_names", out_names),
        ("output_types", out_types),
    ])?;
    let mut guard = CALL
        .lock()
        .map_err(|_| BridgeError::State("call state lock poisoned"))?;
    if guard.is_some() {
        return Err(BridgeError::State("start was already read"));
    }
    *guard = Some(Call {
        output_columns,
        output_batch_rows,
        rows_per_read,
        max_print_bytes,
        input: Input::new(has_input),
        forwarder: None,
    });
    Ok(value)
}

/// The next input data.frame (all rows, or the next chunk of `rows_per_read`), or NULL
/// when the input is used up. The first call always returns a frame.
#[extendr]
fn airlock_next_input() -> Robj {
    reply((|| {
        let chan = channel()?;
        with_call(|call| {
            let chunk = call.rows_per_read;
            Ok(call
                .input
                .next_frame(&chan, chunk)?
                .unwrap_or_else(rapi::null))
        })
    })())
}

/// Starts forwarding fds 1 and 2 as `Print` frames.
#[extendr]
fn airlock_print_begin() -> Robj {
    reply((|| {
        let chan = channel()?;
        with_call(|call| {
            if call.forwarder.is_none() {
                call.forwarder = Some(Forwarder::start(chan, call.max_print_bytes)?);
            }
            Ok(rapi::null())
        })
    })())
}

/// Sends what is left of the printed output (and the truncation note); fds 1 and 2 go
/// back to /dev/null.
#[extendr]
fn airlock_print_end() -> Robj {
    reply(with_call(|call| {
        if let Some(f) = call.forwarder.take() {
            f.stop()?;
        }
        Ok(rapi::null())
    }))
}

/// Converts `columns` (a data.frame, or a list of one-row columns for output_params) of
/// `rows` rows by the declared output types and sends it; `what` names it in messages.
/// Returns the rows sent.
#[extendr]
fn airlock_send_frame(columns: Robj, rows: f64, what: &str) -> Robj {
    reply((|| {
        let chan = channel()?;
        if !(rows >= 0.0 && rows.fract() == 0.0 && rows <= 2f64.powi(52)) {
            return Err(BridgeError::State("rows must be a count"));
        }
        with_call(|call| {
            let sent = output::send_frame(
                &chan,
                &columns,
                rows as usize,
                &call.output_columns,
                what,
                call.output_batch_rows,
            )?;
            Ok(Robj::from(sent as f64))
        })
    })())
}

/// Sends `Done{rows}`.
#[extendr]
fn airlock_send_done(rows: f64) -> Robj {
    reply((|| {
        let rows = if rows >= 0.0 { rows as u64 } else { 0 };
        channel()?.send_control(&FromRuntime::Done { rows })?;
        Ok(rapi::null())
    })())
}

/// Sends `ScriptError`. `phase` is "script", "output" or "input".
#[extendr]
fn airlock_send_error(phase: &str, error_type: &str, message: &str, traceback: &str) -> Robj {
    reply((|| {
        let phase = match phase {
            "script" => ErrorPhase::Script,
            "output" => ErrorPhase::Output,
            _ => ErrorPhase::Input,
        };
        channel()?.send_control(&FromRuntime::ScriptError {
            phase,
            error_type: clip(error_type),
            message: clip(message),
            traceback: clip(traceback),
        })?;
        Ok(rapi::null())
    })())
}

fn clip(s: &str) -> String {
    if s.len() <= MAX_ERROR_TEXT {
        return s.to_owned();
    }
    let mut cut = MAX_ERROR_TEXT;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!(
        "{}\n[airlock: {} more bytes not shown]",
        &s[..cut],
        s.len() - cut
    )
}

/// Runs a loopback statement (`mode` "query" or "execute") with `params` (a list of
/// length-1 values, or NULL). Returns the data.frame or the row count, or a list of
/// class `airlock_query_failure` (sqlstate, message, detail, hint) when the statement
/// failed, which the shim raises as an `airlock_query_error` condition.
#[extendr]
fn airlock_loopback(sql: &str, mode: &str, params: Robj) -> Robj {
    reply((|| {
        let chan = channel()?;
        let mode = match mode {
            "query" => airlock_protocol::data::QueryMode::Query,
            _ => airlock_protocol::data::QueryMode::Execute,
        };
        match loopback::run(&chan, sql, mode, &params)? {
            loopback::Answer::Value(v) => Ok(v),
            loopback::Answer::Failed(sqlstate, message, detail, hint) => {
                let text = |s: Option<String>| -> Result<Robj, BridgeError> {
                    match s {
                        Some(s) => rapi::string(&s),
                        None => Ok(rapi::null()),
                    }
                };
                let mut v = named_list(vec![
                    ("sqlstate", rapi::string(&sqlstate)?),
                    ("message", rapi::string(&message)?),
                    ("detail", text(detail)?),
                    ("hint", text(hint)?),
                ])?;
                rapi::set_class(&mut v, &["airlock_query_failure"])?;
                Ok(v)
            }
        }
    })())
}

extendr_module! {
    mod airlock_r;
    fn airlock_start;
    fn airlock_next_input;
    fn airlock_print_begin;
    fn airlock_print_end;
    fn airlock_send_frame;
    fn airlock_send_done;
    fn airlock_send_error;
    fn airlock_loopback;
}
