//! Every way a call can fail, and the Postgres ERROR each one becomes.
//!
//! Each variant maps to one SQLSTATE and a message a user can act on; DETAIL and HINT
//! carry the rest. Nothing reaches the client as a panic or a bare "internal error".

use airlock_protocol::{control::RefusalKind, data::ErrorPhase};
use nix::errno::Errno;
use pgrx::{pg_sys::panic::ErrorReport, PgLogLevel, PgSqlErrorCode};

use crate::channel::Peer;

#[derive(Debug)]
pub enum CallError {
    /// The server switch is off.
    Disabled,
    /// The caller lacks airlock_script_executor and the language's role.
    PermissionDenied {
        role: String,
        language: airlock_protocol::control::Language,
    },
    UnknownLanguage {
        language: String,
    },
    /// The input query's column has a type the data path cannot carry.
    UnsupportedInputType {
        /// "the input query" or "the loopback query".
        source: &'static str,
        column: usize,
        name: String,
        type_name: String,
    },
    /// One input value has no lossless equivalent in the script (date infinity, say).
    InputValue {
        source: &'static str,
        column: usize,
        name: String,
        row: u64,
        type_name: String,
        reason: String,
    },
    /// Postgres raised converting one output value (column is the index in the
    /// declared list); turned into [`CallError::Postgres`] with the place in DETAIL.
    AtOutputValue {
        code: PgSqlErrorCode,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
        row: u64,
        column: usize,
    },
    /// An error Postgres raised, raised again with more to say.
    Postgres {
        code: PgSqlErrorCode,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    /// A loopback statement went past a limit (rows per result, statements per call).
    LoopbackLimit {
        message: String,
        hint: String,
    },
    /// execute_external_script inside a loopback statement.
    Nested,
    /// A call argument is wrong (params, output_params, rows_per_read, names).
    BadArgument {
        message: String,
        hint: Option<String>,
    },
    DuplicateInputColumn {
        source: &'static str,
        name: String,
        first: usize,
        second: usize,
    },
    /// The caller's column definition list has a type the data path cannot return.
    UnsupportedOutputType {
        column: usize,
        name: String,
        type_name: String,
    },
    ColumnCount {
        produced: usize,
        declared: usize,
    },
    ColumnType {
        column: usize,
        name: String,
        produced: String,
        declared: String,
    },
    ValueOutOfRange {
        column: usize,
        name: String,
        row: u64,
        value: String,
        declared: String,
    },
    InvalidText {
        column: usize,
        name: String,
        row: u64,
        reason: &'static str,
    },
    NotUtf8Database {
        encoding: String,
    },
    NoColumnDefinitionList,
    DaemonUnavailable {
        path: String,
        source: Errno,
    },
    DaemonTimeout {
        what: &'static str,
    },
    Refused {
        reason: RefusalKind,
        message: String,
    },
    PeerGone {
        peer: Peer,
    },
    PeerTimeout {
        peer: Peer,
        what: &'static str,
    },
    Io {
        peer: Peer,
        source: Errno,
    },
    Protocol {
        peer: Peer,
        message: String,
    },
    /// The script raised, or left no usable output.
    /// The script raised, left no usable output, or its runtime could not read input.
    Script {
        error_type: String,
        message: String,
        traceback: String,
        phase: ErrorPhase,
    },
    /// A failure inside the backend itself, not caused by a peer.
    Internal {
        message: String,
    },
    /// The daemon killed the sandbox at the wall-clock limit.
    TimedOut {
        limit_ms: u64,
    },
    /// The kernel killed the sandbox at its cgroup memory limit.
    MemoryLimit {
        limit_bytes: u64,
    },
    /// The daemon killed the sandbox when its processes used up their CPU time.
    CpuLimit {
        limit_seconds: u64,
    },
    /// The runtime died without finishing.
    RuntimeDied {
        how: String,
    },
}

fn seconds(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

fn mib(bytes: u64) -> String {
    if bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}

impl CallError {
    /// Raises this error as a Postgres ERROR. Never returns.
    pub fn report(self) -> ! {
        let (code, message, detail, hint) = self.parts();
        let mut report = ErrorReport::new(code, message, "airlock");
        if let Some(d) = detail {
            report = report.set_detail(d);
        }
        if let Some(h) = hint {
            report = report.set_hint(h);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }

    /// The SQLSTATE, message, DETAIL and HINT this error is reported with.
    pub fn parts(self) -> (PgSqlErrorCode, String, Option<String>, Option<String>) {
        use PgSqlErrorCode::*;
        match self {
            CallError::Disabled => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "external scripts are disabled on this server".into(),
                Some("airlock.enabled is off.".into()),
                Some("A superuser can enable them with: ALTER SYSTEM SET airlock.enabled = on; SELECT pg_reload_conf();".into()),
            ),
            CallError::PermissionDenied { role, language } => (
                ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to run {language} scripts as role \"{role}\""),
                None,
                Some(format!(
                    "GRANT {} TO \"{role}\"; allows {language} scripts, GRANT airlock_script_executor TO \"{role}\"; allows every language.",
                    crate::call::language_role(language)
                )),
            ),
            CallError::UnknownLanguage { language } => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("unknown script language \"{language}\""),
                None,
                Some(format!(
                    "Supported languages: {}.",
                    airlock_protocol::control::Language::ALL
                        .iter()
                        .map(|l| l.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            ),
            CallError::UnsupportedInputType { source, column, name, type_name } => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("column {column} (\"{name}\") of {source} has type {type_name}, which airlock cannot pass to a script"),
                Some(format!("Supported input types: {}.", crate::convert::SUPPORTED_TYPES)),
                Some(format!("Cast the column to a supported type in {source}.")),
            ),
            CallError::InputValue { source, column, name, row, type_name, reason } => (
                ERRCODE_DATETIME_FIELD_OVERFLOW,
                format!("row {row} of {source} cannot be passed to the script: its column {column} (\"{name}\", {type_name}) holds a value that {reason}"),
                None,
                Some(format!("Filter or convert the value in {source}.")),
            ),
            CallError::AtOutputValue { code, message, detail, hint, .. }
            | CallError::Postgres { code, message, detail, hint } => (code, message, detail, hint),
            CallError::LoopbackLimit { message, hint } => {
                (ERRCODE_PROGRAM_LIMIT_EXCEEDED, message, None, Some(hint))
            }
            CallError::Nested => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "airlock.execute_external_script cannot run inside a script's loopback query".into(),
                Some("Scripts do not nest: a loopback statement may not start another script.".into()),
                None,
            ),
            CallError::BadArgument { message, hint } => (
                ERRCODE_INVALID_PARAMETER_VALUE,
                message,
                None,
                hint,
            ),
            CallError::DuplicateInputColumn { source, name, first, second } => (
                ERRCODE_DUPLICATE_COLUMN,
                format!("{source} returns more than one column named \"{name}\" (columns {first} and {second})"),
                None,
                Some("Give each column a distinct name with AS.".into()),
            ),
            CallError::UnsupportedOutputType { column, name, type_name } => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("column {column} (\"{name}\") of the column definition list has type {type_name}, which airlock cannot return"),
                Some(format!("Supported output types: {}.", crate::convert::SUPPORTED_TYPES)),
                None,
            ),
            CallError::ColumnCount { produced, declared } => (
                ERRCODE_DATATYPE_MISMATCH,
                format!("the script's output has {produced} column{}, the column definition list declares {declared}", if produced == 1 { "" } else { "s" }),
                None,
                None,
            ),
            CallError::ColumnType { column, name, produced, declared } => (
                ERRCODE_DATATYPE_MISMATCH,
                format!("column {column} (\"{name}\") of the script's output is {produced}, the column definition list says {declared}"),
                None,
                Some("Convert the column in the script, or change the column definition list.".into()),
            ),
            CallError::ValueOutOfRange { column, name, row, value, declared } => (
                ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE,
                format!("value {value} in row {row} of column {column} (\"{name}\") is out of range for {declared}"),
                None,
                None,
            ),
            CallError::InvalidText { column, name, row, reason } => (
                ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
                format!("text in row {row} of column {column} (\"{name}\") {reason}"),
                None,
                None,
            ),
            CallError::NotUtf8Database { encoding } => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("airlock needs a UTF8 database, this one is {encoding}"),
                None,
                None,
            ),
            CallError::NoColumnDefinitionList => (
                ERRCODE_FEATURE_NOT_SUPPORTED,
                "airlock.execute_external_script must be called in FROM with a column definition list".into(),
                None,
                Some("SELECT * FROM airlock.execute_external_script(...) AS r(id int8, x float8)".into()),
            ),
            CallError::DaemonUnavailable { path, source } => (
                ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
                format!("cannot reach the airlock launcher daemon at \"{path}\": {}", source.desc()),
                None,
                Some("Start it with `airlockd --config /etc/airlock/airlockd.toml` (or `airlock local start` for a local setup); airlock.socket_path must match the daemon's socket_path.".into()),
            ),
            CallError::DaemonTimeout { what } => (
                ERRCODE_CONNECTION_FAILURE,
                format!("the airlock launcher daemon did not {what} in time"),
                Some(format!("airlock.connect_timeout is {} ms.", crate::gucs::CONNECT_TIMEOUT_MS.get())),
                Some("The daemon may be overloaded; see its log. airlock.connect_timeout sets the wait.".into()),
            ),
            CallError::Refused { reason, message } => (
                match reason {
                    RefusalKind::Busy => ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                    RefusalKind::Language => ERRCODE_FEATURE_NOT_SUPPORTED,
                    _ => ERRCODE_CONNECTION_FAILURE,
                },
                format!("airlockd refused the call: {message}"),
                None,
                None,
            ),
            CallError::PeerGone { peer } => (
                ERRCODE_CONNECTION_FAILURE,
                format!("{} closed the connection unexpectedly", peer.name()),
                None,
                None,
            ),
            CallError::PeerTimeout { peer, what } => (
                ERRCODE_CONNECTION_FAILURE,
                format!("{} did not {what} in time", peer.name()),
                None,
                None,
            ),
            CallError::Io { peer, source } => (
                ERRCODE_CONNECTION_FAILURE,
                format!("i/o error talking to {}: {}", peer.name(), source.desc()),
                None,
                None,
            ),
            CallError::Protocol { peer, message } => (
                ERRCODE_PROTOCOL_VIOLATION,
                format!("{} broke the protocol: {message}", peer.name()),
                None,
                None,
            ),
            CallError::Script { error_type, message, traceback, phase } => (
                ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                match phase {
                    ErrorPhase::Output => message,
                    ErrorPhase::Input => format!("the script's runtime could not read its input: {message}"),
                    ErrorPhase::Script if message.is_empty() => format!("script raised {error_type}"),
                    ErrorPhase::Script => format!("script raised {error_type}: {message}"),
                },
                (!traceback.is_empty()).then_some(traceback),
                None,
            ),
            CallError::Internal { message } => (
                ERRCODE_INTERNAL_ERROR,
                format!("airlock: {message}"),
                None,
                None,
            ),
            CallError::TimedOut { limit_ms } => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("script exceeded its wall-clock limit of {}", seconds(limit_ms)),
                Some("airlockd killed the script's sandbox.".into()),
                Some("The limit is limits.wall_clock_seconds in the airlockd config.".into()),
            ),
            CallError::MemoryLimit { limit_bytes } => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("script exceeded its memory limit of {}", mib(limit_bytes)),
                Some("The kernel killed the script's processes.".into()),
                Some("The limit is limits.memory_mib in the airlockd config.".into()),
            ),
            CallError::CpuLimit { limit_seconds } => (
                ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("script exceeded its CPU-time limit of {limit_seconds} s"),
                Some("airlockd killed the script's sandbox.".into()),
                Some("The limit is limits.cpu_seconds in the airlockd config.".into()),
            ),
            CallError::RuntimeDied { how } => (
                ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                format!("the script's runtime ended without finishing: {how}"),
                None,
                None,
            ),
        }
    }
}

/// The five-character SQLSTATE of a code, e.g. "42501".
pub fn sqlstate(code: PgSqlErrorCode) -> String {
    // Postgres packs each of the five characters into six bits (MAKE_SQLSTATE).
    let packed = code as i32;
    (0..5)
        .map(|i| (((packed >> (6 * i)) & 0x3F) as u8 + b'0') as char)
        .collect()
}
