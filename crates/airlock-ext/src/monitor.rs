//! The monitoring views: `airlock.active_sessions` and `airlock.execution_stats`, read
//! from the daemon (SQL Server's sys.dm_external_script_requests and
//! sys.dm_external_script_execution_stats). The functions filter what the daemon returns
//! (Postgres checks function privileges as the querying user, even through a view, so
//! the filter must live here): a role sees its own rows, roles with the privileges of
//! pg_monitor and superusers see all.

use airlock_protocol::control::{Reply, Request};
use pgrx::prelude::*;

use crate::{call::ask_daemon, error::CallError};

/// Who may see which rows: the current role's own, or all for pg_monitor and superusers.
struct Visibility {
    role: String,
    all: bool,
}

impl Visibility {
    fn current() -> Visibility {
        // SAFETY: catalog lookups on the current user; missing_ok = true returns
        // InvalidOid if pg_monitor were missing, and the name is a palloc'd C string.
        unsafe {
            let user = pg_sys::GetUserId();
            let monitor = pg_sys::get_role_oid(c"pg_monitor".as_ptr(), true);
            let all = pg_sys::superuser_arg(user)
                || (monitor != pg_sys::Oid::INVALID && pg_sys::has_privs_of_role(user, monitor));
            let name = pg_sys::GetUserNameFromId(user, false);
            Visibility {
                role: std::ffi::CStr::from_ptr(name)
                    .to_string_lossy()
                    .into_owned(),
                all,
            }
        }
    }

    fn sees(&self, role: &str) -> bool {
        self.all || self.role == role
    }
}

fn unexpected(what: &str) -> CallError {
    CallError::Protocol {
        peer: crate::channel::Peer::Daemon,
        message: format!("expected {what}"),
    }
}

/// Every call the daemon is running now.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)] // pgrx spells a SQL table as a tuple of named columns
fn daemon_sessions() -> TableIterator<
    'static,
    (
        name!(session_id, String),
        name!(database, String),
        name!(role, String),
        name!(backend_pid, i32),
        name!(language, String),
        name!(worker_uid, i64),
        name!(started_epoch, f64),
        name!(state, String),
        name!(cpu_ms, i64),
        name!(memory_bytes, i64),
    ),
> {
    let sessions = match ask_daemon(&Request::ListSessions) {
        Ok(Reply::Sessions { sessions }) => sessions,
        Ok(_) => unexpected("a session list").report(),
        Err(e) => e.report(),
    };
    let vis = Visibility::current();
    TableIterator::new(
        sessions
            .into_iter()
            .filter(move |s| vis.sees(&s.caller.role))
            .map(|s| {
                (
                    s.session_id.to_string(),
                    s.caller.database,
                    s.caller.role,
                    s.caller.backend_pid,
                    s.language.as_str().to_owned(),
                    s.worker_uid as i64,
                    s.started_unix_ms as f64 / 1000.0,
                    s.state,
                    s.cpu_ms as i64,
                    s.memory_bytes as i64,
                )
            }),
    )
}

/// The daemon's counters per language and role since it started.
#[pg_extern(volatile, parallel_unsafe)]
#[allow(clippy::type_complexity)] // pgrx spells a SQL table as a tuple of named columns
fn daemon_stats() -> TableIterator<
    'static,
    (
        name!(language, String),
        name!(role, String),
        name!(calls, i64),
        name!(ok, i64),
        name!(script_errors, i64),
        name!(timeouts, i64),
        name!(memory_limits, i64),
        name!(cpu_limits, i64),
        name!(cancelled, i64),
        name!(daemon_errors, i64),
        name!(total_ms, i64),
        name!(max_ms, i64),
        name!(rows_in, i64),
        name!(rows_out, i64),
    ),
> {
    let rows = match ask_daemon(&Request::Stats) {
        Ok(Reply::Stats { rows }) => rows,
        Ok(_) => unexpected("statistics").report(),
        Err(e) => e.report(),
    };
    let vis = Visibility::current();
    TableIterator::new(
        rows.into_iter()
            .filter(move |r| vis.sees(&r.role))
            .map(|r| {
                (
                    r.language,
                    r.role,
                    r.calls as i64,
                    r.ok as i64,
                    r.script_errors as i64,
                    r.timeouts as i64,
                    r.memory_limits as i64,
                    r.cpu_limits as i64,
                    r.cancelled as i64,
                    r.daemon_errors as i64,
                    r.total_wall_ms as i64,
                    r.max_wall_ms as i64,
                    r.rows_in as i64,
                    r.rows_out as i64,
                )
            }),
    )
}

extension_sql!(
    r#"
CREATE VIEW airlock.active_sessions AS
SELECT session_id::uuid AS session_id, database, role, backend_pid, language, worker_uid,
       to_timestamp(started_epoch) AS started, state, cpu_ms, memory_bytes
FROM airlock.daemon_sessions();
COMMENT ON VIEW airlock.active_sessions IS
    'Calls running now: your own, or all for members of pg_monitor and superusers';

CREATE VIEW airlock.execution_stats AS
SELECT language, role, calls, ok, script_errors, timeouts, memory_limits, cpu_limits,
       cancelled, daemon_errors, total_ms, max_ms, rows_in, rows_out
FROM airlock.daemon_stats();
COMMENT ON VIEW airlock.execution_stats IS
    'Calls per language and role since airlockd started: your own, or all for pg_monitor and superusers';

GRANT SELECT ON airlock.active_sessions, airlock.execution_stats TO PUBLIC;
"#,
    name = "monitoring_views",
    requires = [daemon_sessions, daemon_stats]
);
