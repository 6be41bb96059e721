//! Loopback queries: a script's `airlock.query` / `airlock.execute`, run by the backend
//! that is waiting for the script, as the calling role, in the caller's transaction.
//!
//! No network and no login are involved: the statement arrives on the call's own data
//! socket and runs here through SPI, so privileges, row-level security and search_path
//! are exactly the caller's, and a ROLLBACK of the caller's transaction undoes the
//! writes. Each statement runs in a subtransaction (as PL/Python's plpy.execute does):
//! a failed statement is rolled back alone and its error goes to the script, which may
//! catch it. Cancel, statement_timeout and shutdown are never handed to the script; they
//! end the call.
//!
//! airlock.loopback decides what is allowed: off; read_only, where the statement runs
//! with transaction_read_only on, so every write fails, even one inside a function; or
//! read_write.

use std::{
    cell::Cell,
    ffi::{CStr, CString},
};

use airlock_protocol::data::{QueryMode, ToRuntime};
use arrow_array::RecordBatch;
use pgrx::{pg_sys, PgSqlErrorCode};

use crate::{
    channel::Channel,
    convert::{params_from_batch, InputEncoder, Params},
    error::{sqlstate, CallError},
    gucs::{self, Loopback},
};

thread_local! {
    /// Set while a loopback statement runs, so a nested call can be refused.
    static ACTIVE: Cell<bool> = const { Cell::new(false) };
}

/// Whether this backend is running a loopback statement right now.
pub fn active() -> bool {
    ACTIVE.with(Cell::get)
}

/// Clears [`ACTIVE`] when dropped, including when an ERROR unwinds.
struct ActiveGuard;

impl ActiveGuard {
    fn set() -> ActiveGuard {
        ACTIVE.with(|a| a.set(true));
        ActiveGuard
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        ACTIVE.with(|a| a.set(false));
    }
}

/// One loopback statement, as the runtime asked for it.
pub struct Request {
    pub sql: String,
    pub mode: QueryMode,
    pub params: Option<RecordBatch>,
}

/// A loopback error as the script was told it.
#[derive(Debug, Clone)]
pub struct SentError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

/// The loopback state of one call.
pub struct LoopbackState {
    statements: u32,
    batch_rows: i64,
    /// The last error sent to the script: if the script does not catch it, the call
    /// fails with it (the backend's own record, not what the runtime claims).
    pub last_error: Option<SentError>,
}

/// Error classes that end the call instead of reaching the script: operator
/// intervention (cancel, statement_timeout, shutdown), system errors, internal errors.
fn ends_the_call(code: PgSqlErrorCode) -> bool {
    let state = sqlstate(code);
    state.starts_with("57") || state.starts_with("58") || state.starts_with("XX")
}

impl LoopbackState {
    pub fn new(batch_rows: i64) -> LoopbackState {
        LoopbackState {
            statements: 0,
            batch_rows,
            last_error: None,
        }
    }

    /// Runs one statement and sends its answer (QueryBegin, rows, QueryEnd; or
    /// QueryError). Errs only when the call itself must end.
    pub fn serve(&mut self, data: &mut Channel, req: Request) -> Result<(), CallError> {
        let outcome = self.run(data, req);
        let failure = match outcome {
            Ok(rows) => {
                data.send(&encode(&ToRuntime::QueryEnd { rows })?, None)?;
                return Ok(());
            }
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Statement(e)) => e,
        };
        data.send(
            &encode(&ToRuntime::QueryError {
                sqlstate: sqlstate(failure.code),
                message: failure.message.clone(),
                detail: failure.detail.clone(),
                hint: failure.hint.clone(),
            })?,
            None,
        )?;
        self.last_error = Some(failure);
        Ok(())
    }

    fn run(&mut self, data: &mut Channel, req: Request) -> Result<u64, Failure> {
        let mode = gucs::LOOPBACK.get();
        if mode == Loopback::Off {
            return Err(Failure::Statement(SentError {
                code: PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                message: "loopback queries are off (airlock.loopback = off)".into(),
                detail: None,
                hint: Some(
                    "A superuser can allow them: ALTER ROLE … SET airlock.loopback = read_only."
                        .into(),
                ),
            }));
        }
        let max_statements = gucs::LOOPBACK_MAX_STATEMENTS.get().max(0) as u32;
        if self.statements >= max_statements {
            return Err(Failure::Statement(limit(CallError::LoopbackLimit {
                message: format!(
                    "the script ran more than airlock.loopback_max_statements ({max_statements}) loopback statements"
                ),
                hint: "A superuser can raise airlock.loopback_max_statements.".into(),
            })));
        }
        self.statements += 1;
        let sql = CString::new(req.sql).map_err(|_| {
            Failure::Statement(SentError {
                code: PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                message: "the loopback statement contains a NUL character".into(),
                detail: None,
                hint: None,
            })
        })?;
        let read_only = mode == Loopback::ReadOnly;
        let batch_rows = self.batch_rows;
        let max_rows = gucs::LOOPBACK_MAX_ROWS.get().max(0) as u64;
        // SAFETY: runs on the backend's thread inside the call's transaction and SPI
        // connection; the subtransaction is ended on every path below.
        unsafe {
            in_subtransaction(read_only, || {
                let _active = ActiveGuard::set();
                let params = match &req.params {
                    Some(batch) => params_from_batch(batch)?,
                    None => Params {
                        types: vec![],
                        values: vec![],
                        nulls: vec![],
                    },
                };
                execute(data, &sql, req.mode, params, batch_rows, max_rows)
            })
        }
    }
}

/// How a statement failed: the script hears about it, or the call ends.
enum Failure {
    Statement(SentError),
    Fatal(CallError),
}

fn limit(e: CallError) -> SentError {
    let (code, message, detail, hint) = e.parts();
    SentError {
        code,
        message,
        detail,
        hint,
    }
}

fn encode(msg: &ToRuntime) -> Result<Vec<u8>, CallError> {
    airlock_protocol::encode_control(msg).map_err(|e| CallError::Internal {
        message: format!("cannot encode a message: {e}"),
    })
}

/// Runs `f` in a subtransaction, with transaction_read_only on if `read_only`, the way
/// PL/Python runs plpy.execute: commit it if `f` succeeds, roll it back if `f` fails or
/// Postgres raises. Errors from `f` and from Postgres go to the script unless they end
/// the call (cancel and friends), which are raised again after the rollback.
///
/// # Safety
/// Must run on the backend thread inside a transaction and an SPI connection.
unsafe fn in_subtransaction(
    read_only: bool,
    f: impl FnOnce() -> Result<u64, CallError>,
) -> Result<u64, Failure> {
    // SAFETY: per the caller. The context and resource owner are restored on both
    // paths, as the subtransaction pattern in Postgres' own PLs does.
    unsafe {
        let old_cx = pg_sys::CurrentMemoryContext;
        let old_owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::CurrentMemoryContext = old_cx;
        let nest = pg_sys::NewGUCNestLevel();
        let result = pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| {
            if read_only {
                pg_sys::set_config_option(
                    c"transaction_read_only".as_ptr(),
                    c"on".as_ptr(),
                    pg_sys::GucContext::PGC_USERSET,
                    pg_sys::GucSource::PGC_S_SESSION,
                    pg_sys::GucAction::GUC_ACTION_SAVE,
                    true,
                    0,
                    false,
                );
            }
            f().map_err(|e| Box::new(Err(e)))
        }))
        .catch_others(|e| Err(Box::new(Ok(e))))
        .execute();
        match result {
            Ok(rows) => {
                // Back to the caller's transaction_read_only before the commit.
                pg_sys::AtEOXact_GUC(true, nest);
                pg_sys::ReleaseCurrentSubTransaction();
                pg_sys::CurrentMemoryContext = old_cx;
                pg_sys::CurrentResourceOwner = old_owner;
                Ok(rows)
            }
            Err(failure) => {
                pg_sys::CurrentMemoryContext = old_cx;
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                pg_sys::CurrentMemoryContext = old_cx;
                pg_sys::CurrentResourceOwner = old_owner;
                match *failure {
                    // Postgres raised.
                    Ok(caught) => match caught {
                        pgrx::pg_sys::panic::CaughtError::PostgresError(ref report)
                        | pgrx::pg_sys::panic::CaughtError::ErrorReport(ref report)
                            if !ends_the_call(report.sql_error_code()) =>
                        {
                            let code = report.sql_error_code();
                            let hint = if read_only
                                && code == PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION
                            {
                                Some("airlock.loopback is read_only: scripts may not write. A superuser can allow it for a role: ALTER ROLE … SET airlock.loopback = read_write.".to_owned())
                            } else {
                                report.hint().map(str::to_owned)
                            };
                            Err(Failure::Statement(SentError {
                                code,
                                message: report.message().to_owned(),
                                detail: report.detail().map(str::to_owned),
                                hint,
                            }))
                        }
                        other => other.rethrow(),
                    },
                    // Our own checks (limits, parameters): the script hears of them; a
                    // broken channel ends the call.
                    Err(
                        e @ (CallError::PeerGone { .. }
                        | CallError::Io { .. }
                        | CallError::PeerTimeout { .. }
                        | CallError::Protocol { .. }),
                    ) => Err(Failure::Fatal(e)),
                    Err(e) => Err(Failure::Statement(limit(e))),
                }
            }
        }
    }
}

/// Prepares and runs the statement; sends QueryBegin and, for `query`, the rows.
///
/// # Safety
/// Inside the subtransaction of [`in_subtransaction`].
unsafe fn execute(
    data: &mut Channel,
    sql: &CStr,
    mode: QueryMode,
    mut params: Params,
    batch_rows: i64,
    max_rows: u64,
) -> Result<u64, CallError> {
    let n = params.types.len() as i32;
    // SAFETY: SPI is connected; the arrays hold n entries each and outlive the calls.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), n, params.types.as_mut_ptr());
        if plan.is_null() {
            return Err(CallError::Internal {
                message: format!(
                    "SPI_prepare failed: {}",
                    std::ptr::addr_of!(pg_sys::SPI_result).read()
                ),
            });
        }
        match mode {
            QueryMode::Execute => {
                // SPI's own read_only flag is off: it would refuse writes with a message
                // about volatile functions; transaction_read_only refuses them clearly,
                // functions included. Off also means each statement sees the ones before.
                let rc = pg_sys::SPI_execute_plan(
                    plan,
                    params.values.as_mut_ptr(),
                    params.nulls.as_ptr(),
                    false,
                    0,
                );
                if rc < 0 {
                    return Err(CallError::Internal {
                        message: format!("SPI_execute_plan failed: {rc}"),
                    });
                }
                let rows = pg_sys::SPI_processed;
                if !pg_sys::SPI_tuptable.is_null() {
                    pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
                }
                data.send(&encode(&ToRuntime::QueryBegin)?, None)?;
                Ok(rows)
            }
            QueryMode::Query => {
                if !pg_sys::SPI_is_cursor_plan(plan) {
                    return Err(CallError::BadArgument {
                        message: "airlock.query needs a statement that returns rows".into(),
                        hint: Some("Use airlock.execute for statements without a result.".into()),
                    });
                }
                let portal = pg_sys::SPI_cursor_open(
                    std::ptr::null(),
                    plan,
                    params.values.as_mut_ptr(),
                    params.nulls.as_ptr(),
                    false,
                );
                let mut encoder = InputEncoder::new((*portal).tupDesc, "the loopback query")?;
                data.send(&encode(&ToRuntime::QueryBegin)?, None)?;
                let mut total = 0u64;
                loop {
                    pg_sys::SPI_cursor_fetch(portal, true, batch_rows as _);
                    let (got, tt) = (pg_sys::SPI_processed, pg_sys::SPI_tuptable);
                    if total + got > max_rows {
                        return Err(CallError::LoopbackLimit {
                            message: format!(
                                "the loopback query returned more than airlock.loopback_max_rows ({max_rows}) rows"
                            ),
                            hint: "Aggregate or filter in the query, or ask a superuser to raise airlock.loopback_max_rows.".into(),
                        });
                    }
                    if got > 0 && !tt.is_null() {
                        let vals = std::slice::from_raw_parts((*tt).vals, got as usize);
                        for (i, &tuple) in vals.iter().enumerate() {
                            encoder.append(tuple, (*tt).tupdesc, total + i as u64 + 1)?;
                        }
                    }
                    if !tt.is_null() {
                        pg_sys::SPI_freetuptable(tt);
                    }
                    total += got;
                    let done = got < batch_rows as u64;
                    if encoder.rows() > 0 || (done && total == 0) {
                        data.send(&encoder.finish_frame()?, None)?;
                    }
                    if done {
                        pg_sys::SPI_cursor_close(portal);
                        return Ok(total);
                    }
                }
            }
        }
    }
}
