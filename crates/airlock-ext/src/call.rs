//! One call of `execute_external_script`, from the permission check to the last row.
//!
//! ```text
//! check switch, role, language ─► plan output columns ─► open the input cursor (SPI,
//! as the calling role) ─► airlockd: hello, execute ─► Started + data fd ─► runtime:
//! start, input batches, input_end ─► read prints, output batches, done ─► airlockd: report
//! ```
//! Every wait is interruptible (see `channel`), and every early exit drops both sockets,
//! which makes the daemon kill the sandbox. After `done` the backend reports and returns
//! at once; the daemon lets the runtime exit and tears down without the caller waiting.

use std::{
    ffi::{CStr, CString},
    path::PathBuf,
    time::{Duration, Instant},
};

use airlock_protocol::{
    control::{Caller, Language, Outcome, Reply, Request},
    data::{FromRuntime, QueryMode, ToRuntime},
    encode_control, Frame, FrameKind, PROTOCOL_VERSION,
};
use pgrx::pg_sys;
use sha2::{Digest, Sha256};

use crate::{
    channel::{Channel, Peer},
    convert::{InputEncoder, OutputDecoder},
    error::CallError,
    gucs, loopback, receiver,
};

/// The name of the role that grants the right to run scripts.
pub const EXECUTOR_ROLE: &CStr = c"airlock_script_executor";

/// How long to wait for the daemon's final word once the runtime is done.
const ENDED_WAIT: Duration = Duration::from_secs(10);

/// Flush an input batch early once it holds about this many bytes. Well below the
/// runtime's frame limit, which is the same as ours for its output.
const BATCH_BYTES: usize = 32 << 20;

/// The SQL arguments of one call.
pub struct CallArgs<'a> {
    pub language: Option<&'a str>,
    pub script: Option<&'a str>,
    pub input_query: Option<&'a str>,
    pub input_name: Option<&'a str>,
    pub output_name: Option<&'a str>,
    /// The `params` jsonb, as JSON.
    pub params: Option<serde_json::Value>,
    /// `rows_per_read`: run the script once per chunk of this many input rows.
    pub rows_per_read: Option<i64>,
    /// `output_params`: the output is one row of these script variables.
    pub output_params: Option<Vec<Option<String>>>,
}

/// Runs one call and fills the function's result set (materialize mode).
///
/// # Safety
/// `fcinfo` must be the FunctionCallInfo of the SQL function being executed.
pub unsafe fn execute(fcinfo: pg_sys::FunctionCallInfo, args: CallArgs<'_>) {
    // SAFETY: forwarded from the caller.
    if let Err(e) = unsafe { run(fcinfo, args) } {
        e.report();
    }
}

fn current_role_name() -> String {
    // SAFETY: GetUserId and GetUserNameFromId(noerr = false) are valid in any
    // transaction; the result is a palloc'd NUL-terminated string.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), false);
        CStr::from_ptr(name).to_string_lossy().into_owned()
    }
}

fn current_database_name() -> String {
    // SAFETY: MyDatabaseId is set for every backend running SQL; get_database_name
    // returns a palloc'd string or NULL if the database vanished.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// Superusers may always run scripts. Anyone else needs the privileges of
/// airlock_script_executor (every language, SQL Server's EXECUTE ANY EXTERNAL SCRIPT) or
/// of the language's own role, e.g. airlock_python_executor (SQL Server 2019's EXECUTE
/// EXTERNAL SCRIPT ON EXTERNAL LANGUAGE). The effective role is checked, so SECURITY
/// DEFINER wrappers behave as everywhere else in Postgres.
fn check_permission(language: Language) -> Result<(), CallError> {
    let language_role = CString::new(language_role(language))
        .expect("role names are static identifiers without NUL");
    // SAFETY: plain catalog lookups on the current user; missing_ok = true returns
    // InvalidOid if a role was dropped instead of raising.
    let allowed = unsafe {
        let user = pg_sys::GetUserId();
        if pg_sys::superuser_arg(user) {
            true
        } else {
            [EXECUTOR_ROLE, language_role.as_c_str()]
                .iter()
                .any(|name| {
                    let role = pg_sys::get_role_oid(name.as_ptr(), true);
                    role != pg_sys::Oid::INVALID && pg_sys::has_privs_of_role(user, role)
                })
        }
    };
    if allowed {
        Ok(())
    } else {
        Err(CallError::PermissionDenied {
            role: current_role_name(),
            language,
        })
    }
}

/// The role whose members may run scripts in `language`.
pub fn language_role(language: Language) -> String {
    format!("airlock_{}_executor", language.as_str())
}

fn check_encoding() -> Result<(), CallError> {
    // SAFETY: reading the database encoding has no preconditions.
    let enc = unsafe { pg_sys::GetDatabaseEncoding() };
    if enc == pg_sys::pg_enc::PG_UTF8 as i32 {
        Ok(())
    } else {
        // SAFETY: as above; the name is a static string.
        let name = unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) };
        Err(CallError::NotUtf8Database {
            encoding: name.to_string_lossy().into_owned(),
        })
    }
}

/// The materialize-mode plumbing of a set-returning function.
struct ResultSet {
    rsinfo: *mut pg_sys::ReturnSetInfo,
    tupdesc: pg_sys::TupleDesc,
    tupstore: *mut pg_sys::Tuplestorestate,
    per_query: pg_sys::MemoryContext,
}

impl ResultSet {
    /// # Safety
    /// `fcinfo` must be valid.
    unsafe fn new(fcinfo: pg_sys::FunctionCallInfo) -> Result<ResultSet, CallError> {
        // SAFETY: per the caller fcinfo is valid; resultinfo is either NULL or a
        // ReturnSetInfo node when called in a set context.
        unsafe {
            let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
            if rsinfo.is_null()
                || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
                || ((*rsinfo).allowedModes & pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32)
                    == 0
                || (*rsinfo).expectedDesc.is_null()
            {
                return Err(CallError::NoColumnDefinitionList);
            }
            // The tuplestore and its descriptor must outlive this call: allocate them in
            // the per-query context.
            let per_query = (*(*rsinfo).econtext).ecxt_per_query_memory;
            let old = pg_sys::CurrentMemoryContext;
            pg_sys::CurrentMemoryContext = per_query;
            let tupdesc = pg_sys::CreateTupleDescCopy((*rsinfo).expectedDesc);
            let random = ((*rsinfo).allowedModes
                & pg_sys::SetFunctionReturnMode::SFRM_Materialize_Random as i32)
                != 0;
            let tupstore = pg_sys::tuplestore_begin_heap(random, false, pg_sys::work_mem);
            pg_sys::CurrentMemoryContext = old;
            Ok(ResultSet {
                rsinfo,
                tupdesc,
                tupstore,
                per_query,
            })
        }
    }

    fn finish(self) {
        // SAFETY: rsinfo was checked in new() and lives for the whole call.
        unsafe {
            (*self.rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
            (*self.rsinfo).setResult = self.tupstore;
            (*self.rsinfo).setDesc = self.tupdesc;
        }
    }
}

/// The input query, open as a cursor inside an SPI connection.
struct Input {
    portal: pg_sys::Portal,
    encoder: InputEncoder,
    /// Memory of one fetch (detoasted copies, rows past a full batch); reset after each.
    batch_cx: pgrx::PgMemoryContexts,
}

impl Input {
    /// Plans and opens `query` as the current role. Errors in the query (syntax,
    /// permissions, row-level security) are raised by Postgres itself, before any sandbox
    /// exists.
    fn open(query: &str) -> Result<Input, CallError> {
        let q = CString::new(query).map_err(|_| CallError::Internal {
            message: "the input query contains a NUL character".into(),
        })?;
        // SAFETY: SPI is connected by the caller; q is NUL-terminated; the planned
        // statement and portal live until SPI_finish.
        unsafe {
            let plan = pg_sys::SPI_prepare_cursor(
                q.as_ptr(),
                0,
                std::ptr::null_mut(),
                pg_sys::CURSOR_OPT_NO_SCROLL as i32,
            );
            if plan.is_null() {
                return Err(CallError::Protocol {
                    peer: Peer::Runtime,
                    message: format!(
                        "SPI_prepare_cursor failed: {}",
                        std::ptr::addr_of!(pg_sys::SPI_result).read()
                    ),
                });
            }
            let portal = pg_sys::SPI_cursor_open(
                std::ptr::null(),
                plan,
                std::ptr::null_mut(),
                std::ptr::null(),
                false,
            );
            let encoder = InputEncoder::new((*portal).tupDesc, "the input query")?;
            Ok(Input {
                portal,
                encoder,
                batch_cx: pgrx::PgMemoryContexts::new("airlock input batch"),
            })
        }
    }

    /// Streams every row to the runtime, `batch_rows` at a time; whatever the runtime
    /// sends meanwhile goes to the conversation.
    fn stream(
        &mut self,
        data: &mut Channel,
        batch_rows: i64,
        conv: &mut Conversation<'_>,
    ) -> Result<u64, CallError> {
        let mut total = 0u64;
        let mut sent_any = false;
        let Input {
            portal,
            encoder,
            batch_cx,
        } = self;
        loop {
            // SAFETY: the portal is open in this SPI connection and the encoder was
            // planned from its descriptor; batch_cx is reset only below, after the
            // overflow rows were encoded.
            let fetched = unsafe {
                receiver::fetch(
                    *portal,
                    encoder,
                    batch_rows,
                    total,
                    BATCH_BYTES,
                    batch_cx.value(),
                )
            }?;
            if !fetched.overflow.is_empty() {
                // Wide rows or huge values: ship what we have before going on, so a
                // batch never outgrows the memory budget or a frame.
                ship(encoder, data, conv)?;
                sent_any = true;
                let first = total + fetched.rows - fetched.overflow.len() as u64;
                for (i, &tuple) in fetched.overflow.iter().enumerate() {
                    if i % 4096 == 4095 {
                        pgrx::check_for_interrupts!();
                    }
                    // SAFETY: the tuple is a copy of a row of the portal, whose
                    // descriptor the encoder was planned from; it lives in batch_cx,
                    // which is current while arrays are deconstructed.
                    unsafe {
                        batch_cx.switch_to(|_| {
                            encoder.append(tuple, (**portal).tupDesc, first + i as u64 + 1)
                        })
                    }?;
                    if encoder.approx_bytes() >= BATCH_BYTES {
                        ship(encoder, data, conv)?;
                    }
                }
            }
            // SAFETY: nothing made in batch_cx is used after this point: the encoder
            // copied every value into its own buffers.
            unsafe { batch_cx.reset() };
            total += fetched.rows;
            let done = fetched.rows < batch_rows as u64;
            if encoder.rows() > 0 || (done && !sent_any) {
                // The last batch may be empty: it still carries the schema.
                ship(encoder, data, conv)?;
                sent_any = true;
            }
            if done {
                return Ok(total);
            }
        }
    }

    fn close(self) {
        // SAFETY: the portal is open and owned by this SPI connection.
        unsafe { pg_sys::SPI_cursor_close(self.portal) };
    }
}

/// Sends the encoder's rows as one frame, and gives the frame back to write the next.
fn ship(
    encoder: &mut InputEncoder,
    data: &mut Channel,
    conv: &mut Conversation<'_>,
) -> Result<(), CallError> {
    let frame = encoder.finish_frame()?;
    conv.send(data, &frame)?;
    encoder.reuse_frame(frame);
    Ok(())
}

/// The daemon's side of the call: hello, execute, and the data socket it hands back.
struct Session {
    control: Channel,
    data: Channel,
}

/// Connects to the daemon and exchanges hellos; returns the connection and the
/// deadline (airlock.connect_timeout) for the next exchange.
pub(crate) fn hello_daemon() -> Result<(Channel, Instant), CallError> {
    let path = PathBuf::from(gucs::socket_path());
    let deadline = Instant::now() + Duration::from_millis(gucs::CONNECT_TIMEOUT_MS.get() as u64);
    let mut control = Channel::connect(&path, deadline)?;
    let hello = Request::Hello {
        version: PROTOCOL_VERSION,
        client: concat!("airlock extension ", env!("CARGO_PKG_VERSION")).into(),
    };
    control.send(&encode(&hello)?, Some(deadline))?;
    match recv_reply(&mut control, Some(deadline))? {
        Reply::Hello { .. } => Ok((control, deadline)),
        Reply::Refused { reason, message } => Err(CallError::Refused { reason, message }),
        other => Err(unexpected(Peer::Daemon, &other)),
    }
}

/// Asks the daemon one monitoring question.
pub(crate) fn ask_daemon(request: &Request) -> Result<Reply, CallError> {
    let (mut control, deadline) = hello_daemon()?;
    control.send(&encode(request)?, Some(deadline))?;
    recv_reply(&mut control, Some(deadline))
}

fn start_session(language: Language, script: &str) -> Result<Session, CallError> {
    let (mut control, deadline) = hello_daemon()?;
    let digest = Sha256::digest(script.as_bytes());
    let script_sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
    // SAFETY: MyProcPid is set at backend start.
    let backend_pid = unsafe { pg_sys::MyProcPid };
    let execute = Request::Execute {
        language,
        caller: Caller {
            database: current_database_name(),
            role: current_role_name(),
            backend_pid,
        },
        script_sha256,
    };
    control.send(&encode(&execute)?, Some(deadline))?;
    // No deadline here: the daemon may queue the call for a free worker
    // (workers.queue_timeout_seconds) and answers Refused when that runs out; a cancel
    // or statement_timeout still interrupts the wait.
    match recv_reply(&mut control, None)? {
        Reply::Started { .. } => {
            let fd = control.take_fd().ok_or_else(|| CallError::Protocol {
                peer: Peer::Daemon,
                message: "started without a data socket".into(),
            })?;
            Ok(Session {
                control,
                data: Channel::from_owned(fd, Peer::Runtime),
            })
        }
        Reply::Refused { reason, message } => Err(CallError::Refused { reason, message }),
        other => Err(unexpected(Peer::Daemon, &other)),
    }
}

fn encode<T: serde::Serialize>(msg: &T) -> Result<Vec<u8>, CallError> {
    encode_control(msg).map_err(|e| CallError::Internal {
        message: format!("cannot encode a message: {e}"),
    })
}

fn unexpected(peer: Peer, what: &dyn std::fmt::Debug) -> CallError {
    CallError::Protocol {
        peer,
        message: format!("unexpected message {what:?}"),
    }
}

fn recv_reply(control: &mut Channel, deadline: Option<Instant>) -> Result<Reply, CallError> {
    let frame = control
        .recv(deadline)?
        .ok_or(CallError::PeerGone { peer: Peer::Daemon })?;
    frame.control().map_err(|e| CallError::Protocol {
        peer: Peer::Daemon,
        message: e.to_string(),
    })
}

/// The daemon's final word on how the sandbox ended.
fn ended(control: &mut Channel) -> Result<Outcome, CallError> {
    match recv_reply(control, Some(Instant::now() + ENDED_WAIT))? {
        Reply::Ended { outcome } => Ok(outcome),
        other => Err(unexpected(Peer::Daemon, &other)),
    }
}

/// Tells the daemon the row counts for its audit record. Best effort: the daemon may
/// already have closed the connection, and the call's result does not depend on it.
fn report(control: &mut Channel, rows_in: u64, rows_out: u64) {
    if let Ok(msg) = encode(&Request::Report { rows_in, rows_out }) {
        let _ = control.send(&msg, Some(Instant::now() + ENDED_WAIT));
    }
}

/// Turns an outcome other than a clean exit into the error the user should see.
fn outcome_error(outcome: Outcome) -> CallError {
    match outcome {
        Outcome::TimedOut { limit_ms } => CallError::TimedOut { limit_ms },
        Outcome::MemoryLimit { limit_bytes } => CallError::MemoryLimit { limit_bytes },
        Outcome::CpuLimit { limit_seconds } => CallError::CpuLimit { limit_seconds },
        Outcome::Exited { code } => CallError::RuntimeDied {
            how: format!("it exited with status {code}"),
        },
        Outcome::Signaled { signal } => CallError::RuntimeDied {
            how: format!("it was killed by signal {signal}"),
        },
        Outcome::Cancelled => CallError::RuntimeDied {
            how: "airlockd cancelled it".into(),
        },
    }
}

/// The runtime stopped reading before all input was sent. It may have said why (a bad
/// input frame, say) before exiting: look for that in what it sent, then ask the daemon.
fn failure_after_send(data: &mut Channel, control: &mut Channel) -> CallError {
    let deadline = Some(Instant::now() + Duration::from_secs(2));
    while let Ok(Some(frame)) = data.recv(deadline) {
        if let Ok(FromRuntime::ScriptError {
            phase,
            error_type,
            message,
            traceback,
        }) = frame.control::<FromRuntime>()
        {
            let _ = ended(control);
            return CallError::Script {
                error_type,
                message,
                traceback,
                phase,
            };
        }
    }
    match ended(control) {
        Ok(outcome) => outcome_error(outcome),
        Err(e) => e,
    }
}

/// Relays printed output as NOTICEs, up to the configured limit.
struct Printer {
    limit: usize,
    shown: usize,
    dropped: usize,
}

impl Printer {
    /// One NOTICE per line of printed text.
    fn print(&mut self, text: &str) {
        let text = text.strip_suffix('\n').unwrap_or(text);
        for line in text.split('\n') {
            if self.dropped > 0 || self.shown + line.len() > self.limit {
                self.dropped += line.len() + 1;
                continue;
            }
            self.shown += line.len() + 1;
            pgrx::notice!("{line}");
        }
    }

    fn finish(&self) {
        if self.dropped > 0 {
            pgrx::notice!(
                "[airlock: {} more bytes of output not shown; airlock.max_print_bytes is {}]",
                self.dropped,
                self.limit
            );
        }
    }
}

/// Where everything the runtime sends goes: prints become NOTICEs, output batches become
/// rows in the result's tuplestore as they arrive. It may be fed while input is still
/// being sent (chunked scripts answer early).
struct OutputSink<'a> {
    printer: Printer,
    decoder: OutputDecoder,
    result: &'a ResultSet,
    rows_out: u64,
    /// Per-batch memory for the Datums of one batch; reset after each.
    batch_cx: pgrx::PgMemoryContexts,
    done: bool,
    /// Loopback statements the runtime asked for, not yet run.
    pending: std::collections::VecDeque<loopback::Request>,
    /// A Query with parameters whose Arrow frame has not arrived yet.
    awaiting_params: Option<(String, QueryMode)>,
}

impl OutputSink<'_> {
    /// Handles one frame from the runtime. A script error comes back as
    /// `Err(CallError::Script)`.
    fn handle(&mut self, frame: Frame) -> Result<(), CallError> {
        if self.done {
            return Err(CallError::Protocol {
                peer: Peer::Runtime,
                message: "a message after done".into(),
            });
        }
        match frame.kind {
            FrameKind::Arrow if self.awaiting_params.is_some() => {
                let (sql, mode) = self.awaiting_params.take().expect("checked by the guard");
                let mut reader = arrow_ipc::reader::StreamReader::try_new(
                    std::io::Cursor::new(frame.payload),
                    None,
                )
                .map_err(|e| CallError::Protocol {
                    peer: Peer::Runtime,
                    message: format!("bad loopback parameters: {e}"),
                })?;
                let params = reader
                    .next()
                    .transpose()
                    .map_err(|e| CallError::Protocol {
                        peer: Peer::Runtime,
                        message: format!("bad loopback parameters: {e}"),
                    })?
                    .ok_or_else(|| CallError::Protocol {
                        peer: Peer::Runtime,
                        message: "loopback parameters without a batch".into(),
                    })?;
                self.pending.push_back(loopback::Request {
                    sql,
                    mode,
                    params: Some(params),
                });
                Ok(())
            }
            FrameKind::Arrow => {
                let reader = arrow_ipc::reader::StreamReader::try_new(
                    std::io::Cursor::new(frame.payload),
                    None,
                )
                .map_err(|e| CallError::Protocol {
                    peer: Peer::Runtime,
                    message: format!("bad output batch: {e}"),
                })?;
                self.decoder.check_schema(&reader.schema())?;
                for batch in reader {
                    pgrx::check_for_interrupts!();
                    let batch = batch.map_err(|e| CallError::Protocol {
                        peer: Peer::Runtime,
                        message: format!("bad output batch: {e}"),
                    })?;
                    let (decoder, result, rows_out) =
                        (&mut self.decoder, self.result, self.rows_out);
                    // SAFETY: tupstore/tupdesc belong to this call's result set; the
                    // Datums made in batch_cx are copied by tuplestore_putvalues, so
                    // resetting it after the batch frees nothing still in use.
                    unsafe {
                        self.batch_cx.switch_to(|_| {
                            decoder.put_batch(&batch, result.tupstore, result.tupdesc, rows_out)
                        })?;
                        self.batch_cx.reset();
                    }
                    self.rows_out += batch.num_rows() as u64;
                }
                Ok(())
            }
            FrameKind::Control => {
                let msg: FromRuntime = frame.control().map_err(|e| CallError::Protocol {
                    peer: Peer::Runtime,
                    message: e.to_string(),
                })?;
                match msg {
                    FromRuntime::Print { text } => {
                        self.printer.print(&text);
                        Ok(())
                    }
                    FromRuntime::ScriptError {
                        phase,
                        error_type,
                        message,
                        traceback,
                    } => Err(CallError::Script {
                        error_type,
                        message,
                        traceback,
                        phase,
                    }),
                    FromRuntime::Done { .. } => {
                        self.done = true;
                        Ok(())
                    }
                    FromRuntime::Query {
                        sql,
                        mode,
                        has_params,
                    } => {
                        if has_params {
                            self.awaiting_params = Some((sql, mode));
                        } else {
                            self.pending.push_back(loopback::Request {
                                sql,
                                mode,
                                params: None,
                            });
                        }
                        Ok(())
                    }
                }
            }
        }
    }
}

/// Both directions of the data socket once the runtime runs: what it sends goes to the
/// sink, and its loopback statements are run between our own frames (never inside one).
struct Conversation<'a> {
    sink: OutputSink<'a>,
    loopback: loopback::LoopbackState,
}

impl Conversation<'_> {
    /// Sends one frame while taking whatever the runtime sends, then serves the loopback
    /// statements that arrived.
    fn send(&mut self, data: &mut Channel, bytes: &[u8]) -> Result<(), CallError> {
        let sink = &mut self.sink;
        data.send_reading(bytes, &mut |frame| sink.handle(frame))?;
        self.serve(data)
    }

    /// Handles one frame received from the runtime, then serves loopback statements.
    fn receive(&mut self, data: &mut Channel, frame: Frame) -> Result<(), CallError> {
        self.sink.handle(frame)?;
        self.serve(data)
    }

    fn serve(&mut self, data: &mut Channel) -> Result<(), CallError> {
        while let Some(req) = self.sink.pending.pop_front() {
            self.loopback.serve(data, req)?;
        }
        Ok(())
    }

    /// The error a failed script ends the call with: a loopback error the script did not
    /// catch is raised as itself (from the backend's own record), with the script's
    /// traceback in DETAIL.
    fn script_error(&self, e: CallError) -> CallError {
        match (e, &self.loopback.last_error) {
            (
                CallError::Script {
                    error_type,
                    traceback,
                    ..
                },
                Some(sent),
            ) if error_type == "airlock.QueryError" || error_type == "airlock_query_error" => {
                let detail = [
                    sent.detail.clone(),
                    (!traceback.is_empty()).then_some(traceback),
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("\n");
                CallError::Postgres {
                    code: sent.code,
                    message: sent.message.clone(),
                    detail: (!detail.is_empty()).then_some(detail),
                    hint: sent.hint.clone(),
                }
            }
            (e, _) => e,
        }
    }
}

/// A script variable name: ASCII letters, digits and underscores, not starting with a
/// digit — an identifier in both Python and R (with backticks for a leading underscore).
fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 63
}

/// Names the runtime sets itself, which params must not shadow.
const RESERVED_NAMES: &[&str] = &[
    "airlock_chunk",
    "airlock",
    "airlock_query",
    "airlock_execute",
];

/// Checks params, output_params and rows_per_read; returns them as the start message
/// carries them.
#[allow(clippy::type_complexity)]
fn check_arguments(
    args: &CallArgs<'_>,
    input_name: &str,
    output_name: &str,
    declared_columns: usize,
) -> Result<
    (
        serde_json::Map<String, serde_json::Value>,
        Option<Vec<String>>,
        Option<u64>,
    ),
    CallError,
> {
    let bad = |message: String, hint: Option<&str>| CallError::BadArgument {
        message,
        hint: hint.map(str::to_owned),
    };
    for (what, name) in [
        ("input_data_1_name", input_name),
        ("output_data_1_name", output_name),
    ] {
        if !is_variable_name(name) {
            return Err(bad(
                format!("{what} \"{name}\" is not a valid variable name"),
                Some("Use letters, digits and underscores, not starting with a digit."),
            ));
        }
    }
    let params = match &args.params {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(map)) => map.clone(),
        Some(other) => {
            return Err(bad(
                format!(
                    "params must be a JSON object, got {}",
                    match other {
                        serde_json::Value::Array(_) => "an array",
                        serde_json::Value::String(_) => "a string",
                        serde_json::Value::Number(_) => "a number",
                        _ => "a boolean",
                    }
                ),
                Some(r#"params => '{"alpha": 0.5, "n": 10}'"#),
            ))
        }
    };
    for name in params.keys() {
        if !is_variable_name(name) {
            return Err(bad(
                format!("params member \"{name}\" is not a valid variable name"),
                Some("Use letters, digits and underscores, not starting with a digit."),
            ));
        }
        if name == input_name || name == output_name || RESERVED_NAMES.contains(&name.as_str()) {
            return Err(bad(
                format!("params member \"{name}\" would replace a variable airlock sets"),
                None,
            ));
        }
    }
    let output_params = match &args.output_params {
        None => None,
        Some(names) => {
            if names.is_empty() {
                return Err(bad(
                    "output_params must name at least one script variable".into(),
                    Some("output_params => ARRAY['model', 'rmse']"),
                ));
            }
            let mut out = Vec::with_capacity(names.len());
            for (i, name) in names.iter().enumerate() {
                let Some(name) = name else {
                    return Err(bad(
                        format!("output_params element {} is NULL", i + 1),
                        None,
                    ));
                };
                if !is_variable_name(name) {
                    return Err(bad(
                        format!(
                            "output_params element {} (\"{name}\") is not a valid variable name",
                            i + 1
                        ),
                        None,
                    ));
                }
                if out.contains(name) {
                    return Err(bad(format!("output_params names \"{name}\" twice"), None));
                }
                out.push(name.clone());
            }
            if out.len() != declared_columns {
                return Err(bad(
                    format!(
                        "output_params names {} variable{}, the column definition list declares {} column{}",
                        out.len(),
                        if out.len() == 1 { "" } else { "s" },
                        declared_columns,
                        if declared_columns == 1 { "" } else { "s" },
                    ),
                    Some("Declare one column per output parameter, in the same order."),
                ));
            }
            Some(out)
        }
    };
    let rows_per_read = match args.rows_per_read {
        None => None,
        Some(n) if n >= 1 => Some(n as u64),
        Some(n) => {
            return Err(bad(
                format!("rows_per_read must be at least 1, got {n}"),
                None,
            ))
        }
    };
    Ok((params, output_params, rows_per_read))
}

/// # Safety
/// `fcinfo` must be valid.
unsafe fn run(fcinfo: pg_sys::FunctionCallInfo, args: CallArgs<'_>) -> Result<(), CallError> {
    // 1. Is this allowed at all? Switch, nesting, role, language: cheapest checks first.
    if !gucs::ENABLED.get() {
        return Err(CallError::Disabled);
    }
    if loopback::active() {
        return Err(CallError::Nested);
    }
    let language_name = args.language.unwrap_or("");
    let language = Language::parse(language_name).ok_or_else(|| CallError::UnknownLanguage {
        language: language_name.to_owned(),
    })?;
    check_permission(language)?;
    check_encoding()?;
    let script = args.script.unwrap_or("");
    let input_name = args.input_name.unwrap_or("InputDataSet");
    let output_name = args.output_name.unwrap_or("OutputDataSet");
    let input_query = args.input_query.filter(|q| !q.trim().is_empty());

    // 2. The caller's column definition list decides the output; check it and the
    //    other arguments before any work is done.
    // SAFETY: forwarded from the caller.
    let result = unsafe { ResultSet::new(fcinfo)? };
    let batch_rows = gucs::BATCH_ROWS.get().max(1) as i64;
    // SAFETY: result.tupdesc is a valid copy of the expected descriptor, and the
    // per-query context outlives this call.
    let decoder =
        unsafe { OutputDecoder::new(result.tupdesc, batch_rows as usize, result.per_query)? };
    let output_columns = decoder.columns();
    let (params, output_params, rows_per_read) =
        check_arguments(&args, input_name, output_name, output_columns.len())?;

    // The sink's batch context is made here, before SPI_connect: a context made inside
    // the SPI connection would be deleted by SPI_finish under the sink's feet.
    let max_print = gucs::MAX_PRINT_BYTES.get().max(0) as usize;
    let mut conv = Conversation {
        sink: OutputSink {
            printer: Printer {
                limit: max_print,
                shown: 0,
                dropped: 0,
            },
            decoder,
            result: &result,
            rows_out: 0,
            batch_cx: pgrx::PgMemoryContexts::new("airlock output batch"),
            done: false,
            pending: std::collections::VecDeque::new(),
            awaiting_params: None,
        },
        loopback: loopback::LoopbackState::new(batch_rows),
    };

    // 3. Plan the input query as the calling role, before a sandbox exists.
    // SAFETY: SPI_connect has no preconditions inside a function call. Every early
    // return below ends in CallError::report, an ERROR, and transaction abort
    // (AtEOXact_SPI) disconnects; the success path calls SPI_finish.
    if unsafe { pg_sys::SPI_connect() } != pg_sys::SPI_OK_CONNECT as i32 {
        return Err(CallError::Internal {
            message: "SPI_connect failed".into(),
        });
    }
    let mut input = match input_query {
        Some(q) => Some(Input::open(q)?),
        None => None,
    };

    // 4. Ask the daemon for a sandbox.
    let Session {
        mut control,
        mut data,
    } = start_session(language, script)?;

    // 5. Hand the runtime the script, then the input rows; whatever it sends meanwhile
    //    (prints, rows of finished chunks) is taken as it comes.
    let start = ToRuntime::Start {
        version: PROTOCOL_VERSION,
        script: script.to_owned(),
        input_name: input_name.to_owned(),
        output_name: output_name.to_owned(),
        has_input: input.is_some(),
        max_print_bytes: max_print as u64,
        output_batch_rows: batch_rows as u64,
        max_frame_bytes: crate::channel::RUNTIME_MAX_FRAME as u64,
        params,
        output_columns,
        output_params,
        rows_per_read,
    };
    let sent = (|| -> Result<u64, CallError> {
        conv.send(&mut data, &encode(&start)?)?;
        let rows_in = match input.as_mut() {
            Some(inp) => inp.stream(&mut data, batch_rows, &mut conv)?,
            None => 0,
        };
        conv.send(&mut data, &encode(&ToRuntime::InputEnd)?)?;
        Ok(rows_in)
    })();
    let rows_in = match sent {
        Ok(rows_in) => rows_in,
        Err(e @ CallError::Script { .. }) => {
            let e = conv.script_error(e);
            return Err(script_failed(e, &conv.sink, &mut control, 0));
        }
        Err(CallError::PeerGone { .. }) => {
            conv.sink.printer.finish();
            return Err(failure_after_send(&mut data, &mut control));
        }
        Err(e) => return Err(e),
    };
    if conv.sink.done {
        return Err(CallError::Protocol {
            peer: Peer::Runtime,
            message: "done before all input was sent".into(),
        });
    }
    if let Some(inp) = input.take() {
        inp.close();
    }

    // 6. Read the rest of what the script printed and produced, and serve its loopback
    //    statements (SPI stays connected for them until the runtime is done).
    while !conv.sink.done {
        let Some(frame) = data.recv(None)? else {
            // The runtime ended without saying it was done.
            conv.sink.printer.finish();
            return Err(outcome_error(ended(&mut control)?));
        };
        match conv.receive(&mut data, frame) {
            Ok(()) => {}
            Err(e @ CallError::Script { .. }) => {
                let e = conv.script_error(e);
                return Err(script_failed(e, &conv.sink, &mut control, rows_in));
            }
            Err(e) => return Err(e),
        }
    }
    // SAFETY: balanced with the SPI_connect above.
    unsafe { pg_sys::SPI_finish() };
    conv.sink.printer.finish();
    // 7. Done: every row arrived and was checked. The report tells the daemon the call
    //    finished (not cancelled); it lets the runtime exit and tears the sandbox down
    //    without the caller waiting for that.
    report(&mut control, rows_in, conv.sink.rows_out);
    drop(control);
    drop(conv);
    result.finish();
    Ok(())
}

/// The script failed: flush its printed output, tell the daemon, and let it see the
/// runtime exit before the call fails.
fn script_failed(
    error: CallError,
    sink: &OutputSink<'_>,
    control: &mut Channel,
    rows_in: u64,
) -> CallError {
    sink.printer.finish();
    report(control, rows_in, 0);
    let _ = ended(control);
    error
}
